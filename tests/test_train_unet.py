"""train_unet_cm.py end to end on the bundled digits: export, resume, checkpoints, recipes, errors, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
import yaml
from conftest import assert_samples_without_capman, digits_run_args, run_two_processes
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from peft import PeftModel
from safetensors.torch import load_file

import capman_peft.checkpointing as checkpointing
import capman_peft.training.loop as training_loop
from capman_peft import ClassConditionalPipeline
from capman_peft.errors import ConfigError, run_cli
from capman_peft.training.loop import TrainingCallbacks

ROOT = Path(__file__).resolve().parent.parent
import train_unet_cm  # noqa: E402


def tiny_args(tmp_path: Path, out: str = "out", **overrides) -> list[str]:
    """The shared digits run, 4 steps with warm-up and an EMA decay of 0.9, into `tmp_path/out`."""
    defaults = dict(max_train_steps=4, lr_warmup_steps=2, ema_decay=0.9, output_dir=tmp_path / out)
    return digits_run_args(tmp_path, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    train_unet_cm.main(tiny_args(tmp))
    return tmp / "out"


def test_output_is_a_complete_pipeline_that_samples_with_ddim_and_dpm(trained):
    names = sorted(p.name for p in trained.iterdir())
    for expected in (
        "model_index.json",
        "unet",
        "scheduler",
        "adapter",
        "pipeline.py",
        "README.md",
        "training_summary.json",
        "samples.png",
    ):
        assert expected in names
    pipe = ClassConditionalPipeline.from_pretrained(trained)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.class_names == [str(d) for d in range(10)]
    for scheduler in (DDIMScheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        for guidance in (1.0, 1.5):
            images = pipe(
                class_labels=[0, "9"],
                num_inference_steps=3,
                guidance_scale=guidance,
                generator=torch.manual_seed(0),
                output_type="np",
            ).images
            assert images.shape == (2, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["class_counts"][0] / summary["class_counts"][-1] == pytest.approx(10, rel=0.1)
    assert len(summary["omega_con"]) == 10 and "base_loss" in summary["final_losses"]
    # where it ran: the versions its numbers depend on and the kernels torch picked on this CPU
    environment = summary["environment"]
    assert environment["versions"]["torch"] == torch.__version__
    assert environment["versions"]["diffusers"] == diffusers.__version__
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not list(trained.rglob("*.bin")) and not list(trained.rglob("*.pkl"))


def test_merged_unet_equals_the_unmerged_model_and_has_the_plain_parameter_count(trained):
    merged = UNet2DModel.from_pretrained(trained / "unet").eval()
    plain = UNet2DModel.from_config(UNet2DModel.load_config(trained / "unet"))
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in plain.parameters())
    unmerged = PeftModel.from_pretrained(plain, trained / "adapter").eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(x, t, class_labels=y).sample, unmerged(x, t, class_labels=y).sample, atol=1e-5, rtol=1e-5
        )


@pytest.mark.slow
def test_custom_pipeline_loading_without_capman_peft(trained, tmp_path):
    assert_samples_without_capman(trained, [1, 2], tmp_path)


@pytest.mark.slow
def test_resume_is_exact_and_checkpoint_limit_prunes(tmp_path):
    straight = tiny_args(tmp_path, "straight", max_train_steps=6, checkpointing_steps=3, use_ema=True)
    train_unet_cm.main(straight)
    first = tiny_args(tmp_path, "resumed", max_train_steps=3, checkpointing_steps=3, use_ema=True)
    train_unet_cm.main(first)
    train_unet_cm.main(
        tiny_args(
            tmp_path,
            "resumed",
            max_train_steps=6,
            checkpointing_steps=3,
            use_ema=True,
            resume_from_checkpoint="latest",
            checkpoints_total_limit=1,
        )
    )
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "resumed")] == ["checkpoint-6"]


def test_callbacks_see_every_step_and_every_checkpoint(tmp_path):
    """The extension points of the loop: one call per optimizer step with its averaged values, one per checkpoint
    after it is on disk."""
    steps, checkpoints = [], []

    def on_step_end(step: int, values: dict[str, float]) -> None:
        assert set(values) >= {"loss", "base_loss", "lr"} and all(isinstance(v, float) for v in values.values())
        steps.append(step)

    def on_checkpoint(step: int, path: Path) -> None:
        assert path.is_dir() and any(path.iterdir())
        checkpoints.append((step, path.name))

    callbacks = TrainingCallbacks(on_step_end=on_step_end, on_checkpoint=on_checkpoint)
    train_unet_cm.main(digits_run_args(tmp_path, max_train_steps=4, checkpointing_steps=2), callbacks)
    assert steps == [1, 2, 3, 4]
    assert checkpoints == [(2, "checkpoint-2"), (4, "checkpoint-4")]


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    train_unet_cm.main(tiny_args(tmp_path, max_train_steps=2, checkpointing_steps=2))
    good = tmp_path / "out" / "checkpoint-2"
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real_save = checkpointing.save_file
    calls = []

    def crash_on_state(tensors, path):
        calls.append(path)
        if Path(path).name == "state.safetensors":
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(checkpointing, "save_file", crash_on_state)
    with pytest.raises(ConfigError, match=r"writing checkpoint-4 failed \(disk full\); .*checkpoint-2 is kept"):
        train_unet_cm.main(
            tiny_args(tmp_path, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest")
        )
    assert calls, "the checkpoint writer was not reached"
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert checkpointing.resolve_checkpoint(tmp_path / "out", "latest") == [good]


def test_config_file_with_cli_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"objective": "cbdm", "cm_lambda": 0.5, "imbalance_ratio": 50}))
    settings = train_unet_cm.parse_args(["--config", str(recipe), "--cm_lambda", "0.25"])
    objective = settings.objective
    assert (objective.objective, objective.cm_lambda, settings.data.imbalance_ratio) == ("cbdm", 0.25, 50)
    no_cm = train_unet_cm.parse_args(["--cm_lambda", "0"])
    assert no_cm.objective.capacity_manipulation is False  # lambda 0 = no CM pass
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "r.yaml", "objective": "oc"}))
    settings = train_unet_cm.parse_args(["--config", str(child)])
    objective = settings.objective
    assert (objective.objective, objective.cm_lambda, settings.data.imbalance_ratio) == ("oc", 0.5, 50)
    recipe.write_text(yaml.safe_dump({"cm_lamda": 1}))
    with pytest.raises(SystemExit):
        train_unet_cm.parse_args(["--config", str(recipe)])


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_parses_and_builds_its_model(recipe, tmp_path):
    # An output folder of the recipe's that exists (`make demo` ran) must not matter.
    settings = train_unet_cm.parse_args(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    data = settings.data
    num_classes = {"imb-cifar10": 10, "imb-cifar100": 100, "imb-celebahq": 2, "imb-digits": 10}
    num_classes = {**num_classes, "imb-imagenet-lt": 1000, "imb-inaturalist": 8142}[data.dataset]
    with torch.device("meta"):
        unet = train_unet_cm.build_unet(settings.model.unet_config, data.resolution, num_classes)
    assert unet.config.num_class_embeds == num_classes + 1
    assert unet.config.sample_size == data.resolution


def test_cm_is_opt_in_from_scratch_and_on_in_the_lora_script(tmp_path, capsys):
    """docs/study.md: no CM form has passed the study's rule on every testbed, so the from-scratch script
    trains the plain base unless asked; its --help says why. The text-to-image script keeps CM on when fine-tuning,
    saying it is unmeasured, and off from scratch, where testbed 5 measured it (tests/test_latent_from_scratch.py)."""
    import train_text_to_image_cm

    plain = train_unet_cm.parse_args(digits_run_args(tmp_path, capacity_manipulation=False))
    assert plain.objective.capacity_manipulation is False
    assert train_unet_cm.parse_args(digits_run_args(tmp_path)).objective.capacity_manipulation is True
    for script, words in (
        (train_unet_cm, "Off by default: on the study's 16-px MNIST"),
        (train_text_to_image_cm, "Default: on when fine-tuning"),
        (train_text_to_image_cm, "the LoRA mode has no quality testbed yet"),
        (train_text_to_image_cm, "off from scratch (--model_config_name_or_path), where the study's latent testbed"),
    ):
        with pytest.raises(SystemExit):
            script.parse_args(["--help"])
        assert words in " ".join(capsys.readouterr().out.split())


def test_paper_recipes_follow_the_authors_code():
    """docs/method.md "Fidelity to the authors' code": the OC and CBDM codes sample with eps_c + w' (eps_c - eps_u)
    (OC --w 1.5, CBDM --omega 1.6, CBDM's DDPM 0.8), i.e. w = 2.5 / 2.6 / 1.8 here (a consistency model samples
    without guidance); they flip CIFAR horizontally
    (ADA flips by itself); OC transfers label-dropped samples by their true class; CORAL's recipes use its authors'
    weights."""
    scales = {"oc": 2.5, "cbdm": 2.6, "ddpm": 1.8}
    recipes = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.stem != "demo_digits"]
    assert len(recipes) > 40
    for recipe in recipes:
        settings = train_unet_cm.parse_args(["--config", str(recipe), "--output_dir", "unused"])
        objective, flags = settings.objective.objective, settings.flags()
        assert objective == "consistency" or flags["guidance_scale"] == scales[objective], recipe.stem  # no guidance
        assert flags["random_flip"] == (not flags["ada_probability"]), recipe.stem
        assert flags["oc_transfer_label_dropped"] == (objective == "oc"), recipe.stem
        coral = (flags["coral_weight"], flags["coral_time_temperature"], flags["coral_temperature"])
        assert flags["coral"] == ("coral" in recipe.stem) and coral == (0.5, 0.3, 0.1), recipe.stem


@pytest.mark.parametrize(
    "form, margin", [("hinge_general", "0.1"), ("relative", "0.5"), ("band", "0.5, band_upper=1.0")]
)
def test_each_push_form_trains_and_is_recorded(tmp_path, form, margin):
    train_unet_cm.main(tiny_args(tmp_path, cm_form=form, max_train_steps=2))
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["args"]["cm_form"] == form
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["final_losses"].values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"form={form}, margin={margin}," in card
    assert "| split | mean (ε_θ − ε_θg)² |" in card and summary["expert_use"]["prediction_type"] == "epsilon"
    assert "Compare with a `--no_capacity_manipulation` run" in " ".join(card.split())


def test_push_warmup_ramps_the_push_from_zero_by_optimizer_step(tmp_path):
    """The first optimizer step pushes with weight 0, the second with 1/1000; without warm-up the first pushes.
    θ^g on the whole batch, so every step has pushed rows."""
    seen: dict[str, list[float]] = {"warm": [], "plain": []}
    for name, warmup in (("warm", 1000), ("plain", 0)):
        callbacks = TrainingCallbacks(on_step_end=lambda step, values, name=name: seen[name].append(values))
        args = tiny_args(tmp_path, name, max_train_steps=2, cm_push_warmup_steps=warmup, cm_general_fraction=1)
        train_unet_cm.main(args, callbacks)
    assert seen["warm"][0]["cm_diversity"] == 0 and seen["warm"][1]["cm_diversity"] > 0
    assert seen["plain"][0]["cm_diversity"] > 0
    assert seen["warm"][0]["cm_consistency"] == seen["plain"][0]["cm_consistency"]
    summary = json.loads((tmp_path / "warm" / "training_summary.json").read_text())
    assert summary["args"]["cm_push_warmup_steps"] == 1000


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dataset": "imb-nope"}, "imb-nope"),
        ({"dataset": False, "train_data_dir": "/no/such/dir"}, "/no/such/dir"),
        ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
        ({"cm_form": "paper", "imbalance_ratio": 100}, "unbounded"),
        ({"cm_form": "band", "cm_band_upper": 0.4}, "--cm_band_upper 0.4"),
    ],
)
def test_bad_input_exits_with_one_clear_line(tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_unet_cm.main, tiny_args(tmp_path, **overrides))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err


def test_non_finite_loss_stops_with_the_term_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    train_unet_cm.main(tiny_args(tmp_path, max_train_steps=2, checkpointing_steps=2))
    good = tmp_path / "out" / "checkpoint-2"
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real_loss = training_loop.diffusion_loss

    def poisoned(*args, **kwargs):
        loss, logs = real_loss(*args, **kwargs)
        logs["cm_diversity"] = torch.tensor(float("nan"))
        return loss, logs

    monkeypatch.setattr(training_loop, "diffusion_loss", poisoned)
    with pytest.raises(SystemExit):
        run_cli(
            train_unet_cm.main,
            tiny_args(tmp_path, max_train_steps=4, checkpointing_steps=1, resume_from_checkpoint="latest"),
        )
    err = capsys.readouterr().err
    assert "step 3" in err and "cm_diversity" in err
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_stops_both_at_the_same_step(tmp_path):
    """Process 1 gets a NaN at step 2: both processes stop there with the same error line instead of process 0
    waiting forever in the gradient all-reduce (the timeout would catch that)."""
    args = tiny_args(tmp_path, max_train_steps=4, checkpointing_steps=100)
    result = run_two_processes(ROOT / "tests" / "distributed_fault_step.py", ["nan", *args], ROOT, timeout=240)
    assert result.returncode != 0
    printed = [(tmp_path / f"out.stderr-{rank}").read_text() for rank in (0, 1)]
    errors = [line[line.index("error:") :] for text in printed for line in text.splitlines() if "error:" in line]
    assert len(errors) == 2 and errors[0] == errors[1], printed
    assert "Non-finite loss at step 2: base_loss = nan" in errors[0] and "on process 1" in errors[0]


@pytest.mark.slow
def test_a_signal_to_one_process_saves_and_stops_both_at_the_same_step(tmp_path):
    """Process 1 alone gets SIGTERM after step 3: both processes agree, save checkpoint-3 once and print the same
    line; resumed, the run finishes."""
    args = tiny_args(tmp_path, max_train_steps=5, checkpointing_steps=100)
    result = run_two_processes(ROOT / "tests" / "distributed_fault_step.py", ["sigterm", *args], ROOT, timeout=240)
    assert result.returncode != 0
    printed = [(tmp_path / f"out.stderr-{rank}").read_text() for rank in (0, 1)]
    stops = [line for text in printed for line in text.splitlines() if line.startswith("stopped:")]
    expected = f"stopped: SIGTERM after step 3: saved {tmp_path / 'out' / 'checkpoint-3'}; continue with "
    assert len(stops) == 2 and all(line.startswith(expected) for line in stops), printed
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-3"]
    train_unet_cm.main(tiny_args(tmp_path, max_train_steps=5, resume_from_checkpoint="latest"))
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["steps"] == 5


@pytest.mark.slow
def test_two_machines_of_two_processes_train_what_one_machine_of_four_trains(tmp_path):
    """The multi-node recipe (docs/recipes.md), with both "machines" on this one: two launchers with --num_machines 2
    and two processes each (gloo on CPU) train bit-identically what one launcher of four processes trains, and one
    process with 4 accumulated micro-batches trains the same model (the step's draws are sliced per process; the
    gradients are summed in another order, so to float precision)."""
    import socket

    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    common = digits_run_args(
        tmp_path, lr_warmup_steps=2, max_train_steps=3, train_batch_size=2, checkpointing_steps=100, output_dir=None
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4"]
    script = [str(ROOT / "train_unet_cm.py"), *common, "--output_dir"]

    def start(*extra: str, out: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*launch, *extra, *script, str(tmp_path / out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    port = str(free_port())
    machines = [
        start("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
              "--main_process_port", port, out="nodes")
        for rank in (0, 1)
    ]  # fmt: skip
    logs = [machine.communicate(timeout=400)[0] for machine in machines]
    one = start("--main_process_port", str(free_port()), out="one")
    logs.append(one.communicate(timeout=400)[0])
    assert all(run.returncode == 0 for run in (*machines, one)), "\n".join(log[-2000:] for log in logs)
    assert "batch 2 x 4 processes x 1 accumulation" in logs[0]
    train_unet_cm.main([*common, "--gradient_accumulation_steps", "4", "--output_dir", str(tmp_path / "accumulated")])
    for name in ("unet/diffusion_pytorch_model.safetensors", "adapter/adapter_model.safetensors"):
        nodes, single = load_file(tmp_path / "nodes" / name), load_file(tmp_path / "one" / name)
        assert nodes.keys() == single.keys() and all(torch.equal(nodes[k], single[k]) for k in nodes), name
        accumulated = load_file(tmp_path / "accumulated" / name)
        moved = max((single[k] - accumulated[k]).abs().max().item() for k in single)
        assert moved < 2e-4, (name, moved)  # float summation order (threads); 2.8e-3 with per-process draws


def test_two_process_launch_writes_one_output(tmp_path):
    args = tiny_args(tmp_path, max_train_steps=3, checkpointing_steps=3)
    result = run_two_processes(ROOT / "train_unet_cm.py", args, ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "2 processes" in result.stdout


def test_splits_follow_class_sizes_not_folder_name_order(tmp_path, caplog):
    """A folder keeping its counts, whose name order (bird, cat, dog) is not its size order (cat 9 > bird 6 > dog 2):
    cat is Many, bird Medium, dog Few in the log table, the CM stats and the expert-use report."""
    import numpy as np
    from PIL import Image

    from capman_peft.data import class_splits
    from capman_peft.objective import cm_weights

    rng = np.random.default_rng(0)
    for name, count in {"bird": 6, "cat": 9, "dog": 2}.items():
        (tmp_path / "zoo" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "zoo" / name / f"{i}.png")
    assert class_splits([6, 9, 2]) == {"many": [1], "medium": [0], "few": [2]}
    assert class_splits([5, 5, 1, 5]) == {"many": [0], "medium": [1], "few": [2, 3]}  # ties rank by class id
    assert cm_weights([6, 9, 2]).split.tolist() == [1, 0, 2]
    with caplog.at_level("INFO", logger="capman_peft"):
        train_unet_cm.main(
            digits_run_args(
                tmp_path, dataset=None, train_data_dir=tmp_path / "zoo", imbalance_ratio=None, train_batch_size=4
            )
        )
    table = {line.split()[1]: line.split()[-1] for line in caplog.text.splitlines() if line.strip()[:1].isdigit()}
    assert (table["bird"], table["cat"], table["dog"]) == ("medium", "many", "few"), caplog.text
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["class_names"] == ["bird", "cat", "dog"] and summary["class_counts"] == [6, 9, 2]
    report = summary["expert_use"]
    for split, class_id in (("many", 1), ("medium", 0), ("few", 2)):
        assert report["splits"][split]["distance"] == report["per_class_distance"][class_id]
