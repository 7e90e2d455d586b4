"""The package's layers (docs/architecture.md): every import, at module level or inside a function, runs
to the same layer or a lower one, and no module imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "capman_peft"

# Bottom to top; a module belongs to the first entry that is it or a package holding it.
LAYERS = [
    ["errors", "randomness", "settings"],
    ["hub", "data", "tuner", "objective", "checkpointing"],
    ["families", "denoiser", "pipelines", "run_folder", "expert_use"],
    ["training", "evaluation", "classification"],
    ["analysis"],
    ["flags", "recipes", "evaluation.cli", "evaluation.downstream_cli", "evaluation.__main__", "analysis.cli"]
    + ["analysis.__main__", ""],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of `module` (relative to the package); the most specific entry wins."""
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".") or name == "") and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (relative and absolute)."""
    current = module_name(path)
    package = current.split(".") if path.name == "__init__.py" else current.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("capman_peft.")]
            found.update(n.removeprefix("capman_peft.") for n in names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "capman_peft":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                candidate = ".".join([*base, alias.name])
                found.add(candidate if candidate in modules else ".".join(base))
    return found - {current}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) & modules for p in paths}


def test_every_module_has_a_layer_and_the_graph_is_not_empty():
    graph = import_graph()
    assert len(graph) > 30 and sum(map(len, graph.values())) > 50
    assert layer_of("objective.cm") == 1 and layer_of("evaluation.cli") == 5 and layer_of("evaluation.report") == 3
    assert layer_of("") == 5


def test_imports_run_downward():
    upward = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target] if target in path else [*path, module, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_upward_and_local_imports(tmp_path, monkeypatch):
    """The checks above can fail: a function-local import from the objective up to training is found."""
    fake = tmp_path / "capman_peft"
    (fake / "objective").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "training" / "__init__.py").write_text("")
    (fake / "objective" / "__init__.py").write_text("def f():\n    from ..training import loop\n")
    (fake / "training" / "loop.py").write_text("from ..objective import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = import_graph()
    assert graph["objective"] == {"training.loop"} and graph["training.loop"] == {"objective"}
    assert layer_of("training.loop") > layer_of("objective")


def test_only_the_entry_points_read_parsed_flags():
    """The library takes typed settings: argparse appears only in the entry-point layer, which builds them."""
    readers = sorted(
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if "argparse" in path.read_text() and layer_of(module_name(path)) < len(LAYERS) - 1
    )
    assert not readers, readers


def test_settings_cannot_change_once_built(tmp_path):
    import dataclasses

    from capman_peft.flags import script_parser, training_settings

    parser = script_parser(
        "t", dataset="imb-digits", resolution=8, objective="oc", validation_epochs=0, guidance_scale=1,
        capacity_manipulation=True, capacity_manipulation_help="CM",
    )  # fmt: skip
    parser.add_argument("--config", default=None)
    argv = [
        "--max_train_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--output_dir",
        str(tmp_path / "o"),
        "--cm_lambda",
        "0",
    ]
    settings = training_settings(parser.parse_args(argv))
    assert settings.data.dataset == "imb-digits" and settings.data.imbalance_ratio == 100.0  # resolved when built
    assert settings.objective.capacity_manipulation is False  # λ = 0 is training without CM
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.objective.cm_lambda = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.data = None
    flags = settings.flags()
    assert flags["cm_form"] == "relative" and flags["output_dir"] == str(tmp_path / "o") and "hub_token" not in flags


def test_a_flag_that_lands_in_no_settings_section_is_an_error(tmp_path):
    """A parser flag without a settings field would be accepted and do nothing; the scripts check every run."""
    import argparse

    from conftest import digits_run_args

    import train_unet_cm
    from capman_peft.flags import check_every_flag_placed

    settings = train_unet_cm.parse_args(digits_run_args(tmp_path))
    placed = {**settings.flags(), "config": None, "default_dataset": "imb-cifar10"}
    check_every_flag_placed(argparse.Namespace(**placed), settings)
    with pytest.raises(RuntimeError, match="--cm_typo"):
        check_every_flag_placed(argparse.Namespace(**placed, cm_typo=1.0), settings)


def test_the_run_identity_is_what_a_resume_must_match(tmp_path):
    """The fields marked as identity: data, model, objective and CM settings and whether there is an EMA model;
    learning rate, steps, logging and how θ^g is computed (forward mode, general fraction) are not."""
    from conftest import digits_run_args

    import train_unet_cm

    identity = train_unet_cm.parse_args(digits_run_args(tmp_path)).identity()
    for name in ("dataset", "imbalance_ratio", "resolution", "unet_config", "objective", "cm_form", "use_ema"):
        assert name in identity, name
    for name in ("learning_rate", "max_train_steps", "report_to", "cm_forward", "cm_general_fraction", "seed"):
        assert name not in identity, name


def test_finishing_a_training_run_loads_no_evaluation_code():
    """The training scripts' library imports (export included) pull in neither evaluation, analysis nor
    torch-fidelity."""
    code = (
        "import sys\n"
        "import capman_peft.training.export, capman_peft.training.setup, capman_peft.expert_use\n"
        "bad = [m for m in sys.modules if m.startswith(('capman_peft.evaluation', 'capman_peft.analysis', "
        "'torch_fidelity'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_modules_and_functions_stay_small():
    """No library module over 450 lines, no function over 90 (one job each, readable in one screen), and the
    fine-tuning script within 300: its flags and parts live in the library."""
    too_long = []
    for path in [*sorted(PACKAGE.rglob("*.py")), *PACKAGE.parent.glob("train_*.py")]:
        source = path.read_text()
        limit = 300 if path.name == "train_text_to_image_cm.py" else 450
        if len(source.splitlines()) > limit:
            too_long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 90:
                too_long.append(f"{path.name}: {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
