"""The README and docs pages as tests (a pytest plugin, ``-p doc_snippets`` in pyproject.toml, so that the pages
outside tests/ are seen).

* Python snippets run through pytest-markdown-docs, with the fixtures below: a snippet names what it needs in its
  fence, e.g. ``{ .python fixture:demo_output_cwd }``; ``notest`` marks one that needs the Hub.
* Shell commands run through Sybil: a ```` ```bash ```` block preceded by ``<!-- run on CPU: FLAGS -->`` runs each of
  its command lines with FLAGS in place of the same flags of the line (the others appended), in a scratch folder
  shared by the page (``{tmp}``) that holds links to the scripts and recipes. A block that needs the Hub, a GPU or
  hours says so in ``<!-- not run: WHY -->`` instead; test_docs.py checks that every block says one or the other and
  that every command's flags exist in its parser.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from sybil import Example, Region, Sybil

ROOT = Path(__file__).resolve().parent.parent
RUN_ON_CPU = re.compile(r"<!-- run on CPU: (?P<flags>[^>]*?) -->\n+```bash\n(?P<source>.*?)```", re.DOTALL)
LINKED = ("configs", "bench", "train_unet_cm.py", "train_text_to_image_cm.py")


def command_lines(source: str) -> list[str]:
    """The command lines of a bash block: continuation lines joined, comments dropped."""
    lines = (line.split("  #")[0].strip() for line in source.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def with_flags(tokens: list[str], flags: list[str]) -> list[str]:
    """`tokens` with every flag of `flags` (and its values) in place of the same flag there, the rest appended."""
    replaced = {token for token in flags if token.startswith("--")}
    kept, skipping = [], False
    for token in tokens:
        if token.startswith("--"):
            skipping = token in replaced
        if not skipping:
            kept.append(token)
    return kept + flags


def run_commands(example: Example) -> None:
    flags, source = example.parsed
    scratch = example.namespace["tmp"]
    for line in command_lines(source):
        tokens = with_flags(shlex.split(line), shlex.split(flags.replace("{tmp}", str(scratch))))
        installed = Path(sys.executable).parent / tokens[0]  # accelerate, capman-eval, ...: the venv's
        tokens[0] = str(installed) if installed.is_file() else tokens[0]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(tokens, cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(tokens)}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"


def parse_cpu_commands(document: Any) -> Any:
    for match in RUN_ON_CPU.finditer(document.text):
        yield Region(match.start(), match.end(), (match["flags"], match["source"]), run_commands)


def scratch_folder(namespace: dict[str, Any]) -> None:
    namespace["tmp"] = scratch = Path(tempfile.mkdtemp(prefix="capman-docs-"))
    for name in LINKED:
        (scratch / name).symlink_to(ROOT / name)


def remove_scratch_folder(namespace: dict[str, Any]) -> None:
    shutil.rmtree(namespace["tmp"], ignore_errors=True)


pytest_collect_file = Sybil(
    parsers=[parse_cpu_commands],
    patterns=["README.md", "docs/*.md"],
    path=str(ROOT),
    setup=scratch_folder,
    teardown=remove_scratch_folder,
).pytest()


@pytest.fixture
def scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A snippet "run from the repository root", in a scratch folder: the recipes are there, what it writes stays out
    of the checkout."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    return tmp_path


@pytest.fixture
def demo_output_cwd(scratch_cwd: Path) -> Path:
    """`scratch_cwd` holding a `demo_output/` as `make demo` writes it, trained for 2 steps instead of 2000."""
    import train_unet_cm

    fast = ["--max_train_steps", "2", "--num_inference_steps", "2", "--num_validation_images", "1"]
    train_unet_cm.main(["--config", "configs/demo_digits.yaml", *fast])
    return scratch_cwd


@pytest.fixture
def registry_restored():
    """The family table as it was before the snippet registered a family of its own."""
    from capman_peft.families import FAMILIES

    before = dict(FAMILIES)
    yield
    FAMILIES.clear()
    FAMILIES.update(before)
