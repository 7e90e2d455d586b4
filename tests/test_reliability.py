"""Bad or unusual input: one clear ``error:`` line before any work, no traceback, and nothing that existed is changed.

Each case runs a script's ``main`` the way its command line does (``run_cli``) on tiny local data, and compares the
whole test folder (every file, byte for byte) before and after.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import accelerate
import pytest
import torch
from accelerate.utils import DistributedType
from conftest import TINY_UNET_CONFIG, as_argv, digits_run_args

import train_text_to_image_cm  # noqa: E402
import train_unet_cm  # noqa: E402
from capman_peft.errors import ConfigError, run_cli
from capman_peft.evaluation import evaluate_pipeline
from capman_peft.evaluation.cli import main as eval_main
from capman_peft.families import stable_diffusion
from capman_peft.testing import build_tiny_sd


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def assert_refused(capsys, main, argv: list[str], root: Path, expected: str) -> str:
    """`main` exits non-zero with exactly one ``error:`` line naming `expected`, no traceback, and `root` unchanged."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(root) == before
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Data loss
# ---------------------------------------------------------------------------------------------------------


def test_empty_output_dir_is_refused_and_the_working_folder_keeps_its_readme(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("the user's own readme")
    assert_refused(capsys, train_unet_cm.main, digits_run_args(tmp_path, output_dir=""), tmp_path, "--output_dir")
    assert (tmp_path / "README.md").read_text() == "the user's own readme"


def test_a_non_empty_output_dir_is_refused_unless_resuming_or_overwriting(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("notes")
    line = assert_refused(capsys, train_unet_cm.main, digits_run_args(tmp_path), tmp_path, "is not empty (README.md)")
    assert "--overwrite_output_dir" in line and "--resume_from_checkpoint latest" in line
    train_unet_cm.main(digits_run_args(tmp_path, overwrite_output_dir=True))
    assert (out / "model_index.json").is_file()


def test_resume_latest_never_writes_into_a_folder_without_this_runs_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("the user's notes")
    args = digits_run_args(tmp_path, resume_from_checkpoint="latest")
    assert_refused(capsys, train_unet_cm.main, args, tmp_path, "--resume_from_checkpoint latest: ")
    # a finished run folder without checkpoints (a baseline run with no checkpoint step reached)
    shutil.rmtree(out)
    train_unet_cm.main(
        digits_run_args(tmp_path, objective="ddpm", no_capacity_manipulation=True, checkpointing_steps=9)
    )
    assert not list(out.glob("checkpoint-*"))
    again = digits_run_args(tmp_path, objective="ddpm", no_capacity_manipulation=True, resume_from_checkpoint="latest")
    assert_refused(capsys, train_unet_cm.main, again, tmp_path, "has no checkpoint to continue")
    # latest into a new folder starts from scratch, as diffusers' scripts do
    train_unet_cm.main(digits_run_args(tmp_path, output_dir=tmp_path / "new", resume_from_checkpoint="latest"))
    assert (tmp_path / "new" / "model_index.json").is_file()


def test_resume_from_a_checkpoint_of_another_folder_never_writes_into_a_used_one(tmp_path, capsys):
    train_unet_cm.main(digits_run_args(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    args = digits_run_args(tmp_path, output_dir=other, resume_from_checkpoint=checkpoint, max_train_steps=4)
    assert_refused(capsys, train_unet_cm.main, args, tmp_path, "continues a run in")


def test_overwriting_an_earlier_run_removes_its_checkpoints_so_the_new_ones_are_kept(tmp_path, caplog):
    train_unet_cm.main(digits_run_args(tmp_path, max_train_steps=6, checkpointing_steps=6))
    out = tmp_path / "out"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]
    with caplog.at_level(logging.INFO, logger="capman_peft"):
        train_unet_cm.main(
            digits_run_args(tmp_path, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1,
                            overwrite_output_dir=True)
        )  # fmt: skip
    assert "removed the earlier run's checkpoint-6" in caplog.text
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    new_run = json.loads((out / "training_summary.json").read_text())["run_id"]
    state = json.loads((out / "checkpoint-4" / "state.json").read_text())
    assert state["run"]["id"] == new_run


def test_a_second_run_into_a_folder_in_use_stops_at_once(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(out / ".capman-training.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = digits_run_args(tmp_path, overwrite_output_dir=True)
        assert_refused(capsys, train_unet_cm.main, args, tmp_path, "another training run is writing to it")
    finally:
        holder.kill()
        holder.wait()
    train_unet_cm.main(digits_run_args(tmp_path, overwrite_output_dir=True))
    assert not (out / ".capman-training.lock").exists()  # released and removed at the end of a run


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.update(step=-5), "the step counter is -5"),
        (lambda s: s.update(step=7), "the step counter (the folder says 2) is 7"),
        (lambda s: s["lr_scheduler"].update(last_epoch=-3), "lr_scheduler.last_epoch is -3"),
        (lambda s: s["ema"].update(decay=4.0), "ema.decay is 4.0"),
    ],
)
def test_numbers_read_back_from_a_checkpoint_are_validated(tmp_path, capsys, edit, expected):
    train_unet_cm.main(digits_run_args(tmp_path, use_ema=True))
    state_file = tmp_path / "out" / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))
    args = digits_run_args(tmp_path, use_ema=True, resume_from_checkpoint="checkpoint-2", max_train_steps=4)
    assert_refused(capsys, train_unet_cm.main, args, tmp_path, expected)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--resolution", "-8"], "--resolution: got '-8'"),
        (["--resolution", "0"], "--resolution: got '0'"),
        (["--device", "cuda"], "no CUDA device is available here"),
        (["--reference_images_per_class", "0"], "--reference_images_per_class: got '0'"),
        (["--seed", "-1"], "--seed: got '-1'"),
    ],
)
def test_capman_eval_flags_are_typed(digits_pipeline, tmp_path, capsys, monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--pipeline", str(digits_pipeline), "--output_dir", str(tmp_path / "eval"), *flags]
    assert_refused(capsys, eval_main, argv, digits_pipeline, expected)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda out: (out / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "missing; the pipeline folder"),
        (lambda out: truncate(out / "training_summary.json"), "training_summary.json: is not valid JSON"),
        (lambda out: truncate(out / "model_index.json"), "model_index.json: is not valid JSON"),
    ],
    ids=["no unet weights", "cut-off summary", "cut-off index"],
)
def test_capman_eval_names_a_half_written_run_folder(digits_pipeline, tmp_path, capsys, damage, expected):
    out = tmp_path / "run"
    shutil.copytree(digits_pipeline, out)
    damage(out)
    argv = ["--pipeline", str(out), "--output_dir", str(tmp_path / "eval")]
    assert_refused(capsys, eval_main, argv, tmp_path, expected)


def test_a_full_disk_is_refused_before_training_and_before_evaluation(digits_pipeline, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module

    full = shutil_module.disk_usage(tmp_path)._replace(free=1024)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: full)
    assert_refused(capsys, train_unet_cm.main, digits_run_args(tmp_path), tmp_path, "only 0 MiB free on its disk")
    argv = ["--pipeline", str(digits_pipeline), "--output_dir", str(tmp_path / "eval")]
    assert_refused(capsys, eval_main, argv, digits_pipeline, "only 0 MiB free on its disk")


def test_a_full_disk_during_export_keeps_the_earlier_export_whole_and_says_so(tmp_path, capsys, monkeypatch):
    train_unet_cm.main(digits_run_args(tmp_path))
    out = tmp_path / "out"
    earlier = {p: snapshot(out)[p] for p in ("model_index.json", "unet/diffusion_pytorch_model.safetensors")}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_unet_cm, "save_trained_pipeline", disk_full)
    with pytest.raises(SystemExit):
        run_cli(train_unet_cm.main, digits_run_args(tmp_path, overwrite_output_dir=True, max_train_steps=4))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "writing the exported pipeline failed (No space left on device)" in lines[0]
    assert "Traceback" not in err
    assert {p: snapshot(out)[p] for p in earlier} == earlier  # the earlier pipeline is still whole
    assert not (out / ".export.incomplete").exists() and not (out / ".capman-training.lock").exists()
    assert (out / "checkpoint-4").is_dir()  # this run's checkpoints are kept


def test_capman_eval_never_writes_into_the_pipeline_folder(digits_pipeline, tmp_path, capsys):
    argv = ["--pipeline", str(digits_pipeline), "--output_dir", str(digits_pipeline)]
    assert_refused(capsys, eval_main, argv, digits_pipeline, "is the pipeline folder being evaluated")


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(
    digits_pipeline, tmp_path, capsys, monkeypatch
):
    import tempfile

    def read_only(*args, dir=None, **kwargs):
        if Path(dir).resolve() in (tmp_path.resolve(), digits_pipeline.resolve()):
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert_refused(capsys, train_unet_cm.main, digits_run_args(tmp_path), tmp_path, "cannot be written (Read-only")
    argv = ["--pipeline", str(digits_pipeline), "--output_dir", str(tmp_path / "eval")]
    assert_refused(capsys, eval_main, argv, digits_pipeline, "cannot be written (Read-only")
    argv = ["--pipeline", str(digits_pipeline), "--output_dir", str(tmp_path.parent / "elsewhere-eval")]
    assert_refused(capsys, eval_main, argv, digits_pipeline, "or pass --no_model_card")


@pytest.mark.parametrize("limit", [-1, 0])
def test_checkpoint_limits_below_one_are_refused(tmp_path, capsys, limit):
    assert_refused(
        capsys,
        train_unet_cm.main,
        digits_run_args(tmp_path, checkpoints_total_limit=limit),
        tmp_path,
        "--checkpoints_total_limit",
    )


def test_an_adapter_left_over_from_another_run_is_never_evaluated_as_this_pipelines(tmp_path, capsys):
    """A CM run, then a baseline written over it (--overwrite_output_dir): adapter/ is the old run's, and capman-eval
    --expert off must refuse it instead of scoring a stale model."""
    train_unet_cm.main(digits_run_args(tmp_path))
    train_unet_cm.main(digits_run_args(tmp_path, overwrite_output_dir=True, no_capacity_manipulation=True))
    argv = ["--pipeline", str(tmp_path / "out"), "--expert", "off", "--num_images_per_class", "2", "--steps", "2"]
    assert_refused(capsys, eval_main, argv, tmp_path, "does not belong to the pipeline")


def test_resume_refuses_a_checkpoint_of_another_configuration_by_name(tmp_path, capsys):
    train_unet_cm.main(digits_run_args(tmp_path))
    line = assert_refused(
        capsys,
        train_unet_cm.main,
        digits_run_args(tmp_path, resume_from_checkpoint="latest", max_train_steps=4, objective="ddpm"),
        tmp_path,
        "checkpoint-2: was written by a run with other settings",
    )
    assert "--objective oc (now ddpm)" in line


def test_resume_with_cm_turned_off_names_the_flag_before_the_weights_that_no_longer_fit(tmp_path, capsys):
    """Without CM the model has no adapter, so the checkpoint's weights do not fit it either; the changed flag is
    what the user can act on."""
    train_unet_cm.main(digits_run_args(tmp_path))
    argv = digits_run_args(tmp_path, resume_from_checkpoint="latest", max_train_steps=4, capacity_manipulation=False)
    line = assert_refused(
        capsys, train_unet_cm.main, argv, tmp_path, "checkpoint-2: was written by a run with other settings"
    )
    assert "--capacity_manipulation True (now False)" in line


def test_a_checkpoint_from_before_a_setting_existed_still_resumes(tmp_path):
    train_unet_cm.main(digits_run_args(tmp_path))
    state_file = tmp_path / "out" / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    del state["run"]["config"]["cm_relative_margin"]  # written by a release without that flag
    state_file.write_text(json.dumps(state))
    train_unet_cm.main(digits_run_args(tmp_path, resume_from_checkpoint="latest", max_train_steps=4))
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["steps"] == 4


def test_a_setting_recorded_under_its_earlier_name_is_compared_under_the_current_one(tmp_path, capsys):
    train_unet_cm.main(digits_run_args(tmp_path))
    state_file = tmp_path / "out" / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    state["run"]["config"]["cm_diversity"] = state["run"]["config"].pop("cm_form")  # the flag's earlier name
    state_file.write_text(json.dumps(state))
    line = assert_refused(
        capsys,
        train_unet_cm.main,
        digits_run_args(tmp_path, resume_from_checkpoint="latest", max_train_steps=4, cm_form="hinge_general"),
        tmp_path,
        "checkpoint-2: was written by a run with other settings",
    )
    assert "--cm_form relative (now hinge_general)" in line
    train_unet_cm.main(digits_run_args(tmp_path, resume_from_checkpoint="latest", max_train_steps=4))
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["steps"] == 4


# ---------------------------------------------------------------------------------------------------------
# Errors found before any work, one line each
# ---------------------------------------------------------------------------------------------------------

UNET_CASES = {
    "huge cm margin": (dict(cm_margin=1e300), "--cm_margin: got '1e+300'; allowed: a number in (0, 10]"),
    "named dataset and a folder": (dict(train_data_dir="elsewhere"), "--train_data_dir elsewhere: given together"),
    "tracker not installed": (dict(report_to="wandb"), "--report_to wandb: needs wandb, which is not installed"),
    "invalid expert regex": (dict(expert_target_modules="("), "--expert_target_modules: got '('"),
    "experts in the down path with shared_prefix": (
        dict(expert_target_modules=r"down_blocks\..*conv1", cm_forward="shared_prefix"),
        "puts experts before the up path (down_blocks.0.resnets.0.conv1",
    ),
    "seed beyond 32 bits": (dict(seed=200000000000000), "--seed: got '200000000000000'; allowed: an integer in"),
    "data seed beyond 32 bits": (dict(data_seed=4294967296), "--data_seed: got '4294967296'"),
    "accumulation beyond an epoch": (
        dict(gradient_accumulation_steps=1000),
        "--gradient_accumulation_steps 1000: an epoch has only",
    ),
    "zero steps": (dict(max_train_steps=0), "--max_train_steps: got '0'"),
    "negative steps": (dict(max_train_steps=-3), "--max_train_steps: got '-3'"),
    "zero inference steps": (dict(num_inference_steps=0), "--num_inference_steps"),
    "zero validation images": (dict(num_validation_images=0), "--num_validation_images"),
    "resolution not divisible": (dict(resolution=9), "--resolution 9: the UNet downsamples by 2"),
    "ema decay above one": (dict(ema_decay=2), "--ema_decay: got '2'"),
    "nan learning rate": (dict(learning_rate="nan"), "--learning_rate: got 'nan'"),
    "negative learning rate": (dict(learning_rate=-1), "--learning_rate"),
    "fp16 on the cpu": (dict(mixed_precision="fp16"), "--mixed_precision fp16: needs a CUDA device"),
    "imbalance ratio below one": (dict(imbalance_ratio=0.5), "--imbalance_ratio"),
    "label dropout of one": (dict(label_dropout=1), "--label_dropout"),
    "general fraction zero": (dict(cm_general_fraction=0), "--cm_general_fraction"),
    "partial general pass in sequential mode": (
        dict(cm_general_fraction=0.5, cm_forward="sequential"),
        "--cm_general_fraction 0.5: needs --cm_forward fused or shared_prefix",
    ),
    "unbounded paper form": (dict(cm_form="paper"), "--cm_form paper"),
    "zero margin": (dict(cm_margin=0), "--cm_margin: got '0'"),
    "unknown dataset": (dict(dataset="imb-nope"), "--dataset"),
    "missing data folder": (dict(dataset=None, train_data_dir="no-such-dir"), "--train_data_dir no-such-dir"),
    "missing model config": (dict(model_config_name_or_path="no-such.json"), "--model_config_name_or_path"),
    "expert targets matching nothing": (dict(expert_target_modules=r"nothing\.here"), "--expert_target_modules"),
    "push without repo id": (dict(push_to_hub=True), "--hub_model_id"),
    "no_consistency and no_diversity": (dict(no_consistency=True, no_diversity=True), "--no_diversity"),
}


@pytest.mark.parametrize("overrides, expected", list(UNET_CASES.values()), ids=list(UNET_CASES))
def test_bad_flags_are_one_error_line_and_touch_nothing(tmp_path, capsys, overrides, expected):
    (tmp_path / "keep.txt").write_text("unrelated")
    assert_refused(capsys, train_unet_cm.main, digits_run_args(tmp_path, **overrides), tmp_path, expected)


def test_a_fourier_time_embedding_is_refused_with_shared_prefix_and_trains_fused(tmp_path, capsys):
    config = tmp_path / "fourier.json"
    config.write_text(json.dumps({**TINY_UNET_CONFIG, "time_embedding_type": "fourier", "flip_sin_to_cos": False}))
    argv = digits_run_args(tmp_path, model_config_name_or_path=config)
    assert_refused(
        capsys, train_unet_cm.main, argv, tmp_path, "--cm_forward shared_prefix: does not work with a Fourier"
    )
    train_unet_cm.main(digits_run_args(tmp_path, model_config_name_or_path=config, cm_forward="fused"))
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    assert_refused(capsys, train_unet_cm.main, digits_run_args(tmp_path), tmp_path, "is a file")


def test_sharded_distributed_types_are_refused_at_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    assert_refused(capsys, train_unet_cm.main, digits_run_args(tmp_path), tmp_path, "distributed_type FSDP")


RECIPE_CASES = {
    "yaml syntax error": ("max_train_steps: [2\n", "not valid YAML"),
    "top level is a list": ("- max_train_steps: 2\n", "the top level is a list"),
    "quoted boolean": ('use_ema: "false"\n', "use_ema: got 'false'; allowed: true or false"),
    "fractional step count": ("max_train_steps: 3.7\n", "max_train_steps: --max_train_steps: got '3.7'"),
    "unknown key": ("max_train_step: 2\n", "unknown key 'max_train_step'"),
    "unquoted no": ("mixed_precision: no\n", "mixed_precision: got false"),
    "wrong choice": ("objective: focal\n", "objective: --objective: invalid choice"),
    "base cycle": ("base: recipe.yaml\n", "makes a cycle"),
    "duplicate key": ("max_train_steps: 2\nmax_train_steps: 3\n", "key 'max_train_steps' is given twice"),
}


@pytest.mark.parametrize("text, expected", list(RECIPE_CASES.values()), ids=list(RECIPE_CASES))
def test_bad_recipes_are_read_like_the_command_line_and_named_by_file(tmp_path, capsys, text, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    line = assert_refused(capsys, train_unet_cm.main, ["--config", str(recipe)], tmp_path, expected)
    assert f"--config {recipe}" in line


@pytest.mark.parametrize(
    "line, capacity_manipulation, use_ema",
    [
        ("no_capacity_manipulation: true", False, True),
        ("capacity_manipulation: false", False, True),
        ("capacity_manipulation: true", True, True),
        ("no_use_ema: true", False, False),  # CM is off unless asked for in train_unet_cm.py
        ("no_use_ema: false", False, True),
        ("use_ema: false", False, False),
    ],
)
def test_a_recipe_key_means_what_the_flag_of_that_name_means(tmp_path, line, capacity_manipulation, use_ema):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"use_ema: true\n{line}\n" if "use_ema" not in line else f"{line}\n")
    settings = train_unet_cm.parse_args(["--config", str(recipe), "--output_dir", str(tmp_path / "o")])
    assert (settings.objective.capacity_manipulation, settings.optimization.use_ema) == (capacity_manipulation, use_ema)


def test_a_folder_as_recipe_and_a_home_relative_output_dir(tmp_path, capsys, monkeypatch):
    assert_refused(capsys, train_unet_cm.main, ["--config", str(tmp_path)], tmp_path, "is a folder")
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: ~/runs/x\n")
    settings = train_unet_cm.parse_args(["--config", "~/recipe.yaml"])
    assert settings.output.output_dir == str(tmp_path / "runs" / "x")


def test_recipe_values_are_typed_like_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("use_ema: false\nmax_train_steps: 7\nlearning_rate: 2.0e-3\nmixed_precision: 'no'\n")
    optimization = train_unet_cm.parse_args(["--config", str(recipe), "--output_dir", str(tmp_path / "o")]).optimization
    assert (optimization.use_ema, optimization.max_train_steps, optimization.learning_rate) == (False, 7, 2e-3)
    assert optimization.mixed_precision == "no"


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: corrupt files are named; `latest` falls back to the newest valid one
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    train_unet_cm.main(digits_run_args(root, max_train_steps=4, checkpointing_steps=2))
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", truncate, "model.safetensors: cannot be read"),
    "truncated state": ("state.safetensors", truncate, "state.safetensors: cannot be read"),
    "broken state.json": ("state.json", lambda p: p.write_text("{not json"), "state.json: cannot be read"),
    "missing weights": ("model.safetensors", Path.unlink, "model.safetensors: missing"),
}


@pytest.mark.parametrize("name, corrupt, expected", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_named_when_asked_for(two_checkpoints, tmp_path, capsys, name, corrupt, expected):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    corrupt(tmp_path / "out" / "checkpoint-4" / name)
    argv = digits_run_args(tmp_path, max_train_steps=6, resume_from_checkpoint="checkpoint-4")
    assert_refused(capsys, train_unet_cm.main, argv, tmp_path, f"checkpoint-4/{expected}")


def test_a_checkpoint_of_another_shape_is_named(two_checkpoints, tmp_path, capsys):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    (tmp_path / "unet.json").write_text(json.dumps({**TINY_UNET_CONFIG, "block_out_channels": [8, 24]}))
    argv = digits_run_args(tmp_path, max_train_steps=6, resume_from_checkpoint="latest")
    # by the flag and the config key that changed
    line = assert_refused(capsys, train_unet_cm.main, argv, tmp_path, "checkpoint-4: was written by a run with other")
    assert "--model_config_name_or_path block_out_channels [8, 16] (now [8, 24]);" in line
    # a checkpoint from before runs recorded their settings: by the weights that do not fit
    state_file = tmp_path / "out" / "checkpoint-4" / "state.json"
    state = json.loads(state_file.read_text())
    del state["run"]["config"]
    state_file.write_text(json.dumps(state))
    assert_refused(capsys, train_unet_cm.main, argv, tmp_path, "checkpoint-4/model.safetensors: ")


def test_latest_skips_a_corrupt_checkpoint_and_resumes_from_the_newest_valid_one(two_checkpoints, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="capman_peft")
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    truncate(tmp_path / "out" / "checkpoint-4" / "model.safetensors")
    train_unet_cm.main(digits_run_args(tmp_path, max_train_steps=3, resume_from_checkpoint="latest"))
    log = caplog.text
    assert "Skipping checkpoint-4" in log and "cannot be read" in log and "Resumed from" in log
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["steps"] == 3


def test_checkpoint_files_are_flushed_before_the_rename(tmp_path, monkeypatch):
    """fsync of each file and of the folder happens before the temporary folder becomes checkpoint-N."""
    import capman_peft.checkpointing as checkpointing

    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(checkpointing.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(Path, "rename", lambda self, target: events.append("rename") or real_rename(self, target))
    train_unet_cm.main(digits_run_args(tmp_path))
    first_rename = events.index("rename")
    assert events[:first_rename].count("fsync") >= 4  # three files and the folder


# ---------------------------------------------------------------------------------------------------------
# The Hub without network: one line, quickly
# ---------------------------------------------------------------------------------------------------------


def test_a_hub_dataset_without_network_is_one_line_and_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    line = assert_refused(
        capsys,
        train_unet_cm.main,
        digits_run_args(tmp_path, dataset="imb-cifar10", resolution=32),
        tmp_path,
        "--dataset",
    )
    assert "cannot reach the Hugging Face Hub for 'uoft-cs/cifar10' (offline?)" in line and "local path" in line
    assert time.time() - start < 20


def test_push_to_hub_is_checked_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = digits_run_args(tmp_path, push_to_hub=True, hub_model_id="someone/x")
    assert_refused(capsys, train_unet_cm.main, args, tmp_path, "--push_to_hub: cannot reach the Hugging Face Hub")
    args = digits_run_args(tmp_path, push_to_hub=True, hub_model_id="someone/x y")
    assert_refused(capsys, train_unet_cm.main, args, tmp_path, "--hub_model_id someone/x y: not a Hub repository id")


def test_a_missing_local_path_is_named_as_such_not_as_the_hub(tmp_path, capsys):
    missing = "configs/models/nope.json"
    args = digits_run_args(tmp_path, model_config_name_or_path=missing)
    assert_refused(capsys, train_unet_cm.main, args, tmp_path, f"{missing}: no such file or folder")


def sd_args(tmp_path: Path, base: Path | str) -> list[str]:
    """train_text_to_image_cm.py on two tiny class folders, one step."""
    data = make_class_folders(tmp_path / "data", [3, 3])
    values = {"pretrained_model_name_or_path": base, "train_data_dir": data, "resolution": 16, "max_train_steps": 1}
    return as_argv({**values, "report_to": "none", "output_dir": tmp_path / "out"})


def test_a_hub_base_model_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = sd_args(tmp_path, "someone/not-cached-sd")
    line = assert_refused(capsys, train_text_to_image_cm.main, argv, tmp_path, "--pretrained_model_name_or_path")
    assert "cannot reach the Hugging Face Hub for 'someone/not-cached-sd' (offline?)" in line


def test_a_cached_hub_model_loads_offline_from_its_snapshot(tmp_path, monkeypatch):
    """The real Hub cache layout (models--org--name/snapshots/<rev> + refs/main): offline, hub_source finds it."""
    from capman_peft.hub import hub_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    snapshot_dir = cache / "models--someone--cached" / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    (snapshot_dir / "model_index.json").write_text("{}")
    (cache / "models--someone--cached" / "refs").mkdir()
    (cache / "models--someone--cached" / "refs" / "main").write_text("abc123")
    assert Path(hub_source("someone/cached", "--flag", cache_dir=str(cache))) == snapshot_dir


# ---------------------------------------------------------------------------------------------------------
# A user's own class folders keep their counts
# ---------------------------------------------------------------------------------------------------------


def make_class_folders(root: Path, counts: list[int]) -> Path:
    from PIL import Image

    for c, n in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (40 * c, 7 * i, 100)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_a_truncated_jpeg_is_named_before_training_and_unused_files_are_counted(tmp_path, capsys, caplog):
    import numpy as np
    from PIL import Image

    data = make_class_folders(tmp_path / "data", [4, 4])
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "class1" / "cut.jpg", quality=95)
    whole = (data / "class1" / "cut.jpg").read_bytes()
    (data / "class1" / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # the header still reads
    args = digits_run_args(tmp_path, dataset=False, imbalance_ratio=False, train_data_dir=data, resolution=8)
    assert_refused(capsys, train_unet_cm.main, args, tmp_path, "cut.jpg: corrupt image")

    (data / "class1" / "cut.jpg").unlink()
    (data / "class0" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(data / "class0" / "more" / "x.png")
    (data / "class0" / "notes.txt").write_text("notes")
    caplog.set_level(logging.WARNING, logger="capman_peft")
    train_unet_cm.main(
        digits_run_args(tmp_path, dataset=False, imbalance_ratio=False, train_data_dir=data, resolution=8)
    )
    assert "class 'class0': 1 images in sub-folders and 1 other files are not used" in caplog.text


def test_cm_with_one_class_is_refused(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", [3])
    args = digits_run_args(tmp_path, dataset=False, imbalance_ratio=False, train_data_dir=data, resolution=8)
    assert_refused(capsys, train_unet_cm.main, args, tmp_path, "the data has 1 class ('class0')")


def test_settings_that_do_nothing_are_named_in_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="capman_peft")
    train_unet_cm.main(
        digits_run_args(
            tmp_path, no_capacity_manipulation=True, cm_margin=0.3, cm_lambda=0.5, logging_dir="../elsewhere",
            class_order="9, 8, 7, 6, 5, 4, 3, 2, 1, 0",
        )
    )  # fmt: skip
    assert "--no_capacity_manipulation: --cm_lambda, --cm_margin have no effect without CM" in caplog.text
    assert "--logging_dir ../elsewhere: the tracker logs go to" in caplog.text and "outside --output_dir" in caplog.text
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["class_names"][0] == "9"  # --class_order with spaces after the commas
    data = make_class_folders(tmp_path / "data", [6, 3])
    args = digits_run_args(
        tmp_path, dataset=False, imbalance_ratio=1, train_data_dir=data, resolution=8, output_dir=tmp_path / "ir1"
    )
    train_unet_cm.main(args)
    assert "--imbalance_ratio 1: the classes have 6 ... 3 images (ratio 2)" in caplog.text


def test_a_folder_run_is_evaluated_against_its_own_folder_with_a_caveat_on_small_sets(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", [6, 4, 3])
    args = digits_run_args(tmp_path, dataset=False, imbalance_ratio=False, train_data_dir=data, resolution=8)
    train_unet_cm.main(args)
    capsys.readouterr()
    eval_main(["--pipeline", str(tmp_path / "out"), "--num_images_per_class", "2", "--steps", "2", "--metrics", "fid",
               "--feature_extractor", "digits-classifier",
               "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    err = capsys.readouterr().err
    assert "caution: FID split few rests on 2 generated and 3 real images" in err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["dataset"] is None and metrics["reference_images_per_class"] == 3 and metrics["caveats"]
    from capman_peft.analysis import heldout_loss

    with pytest.raises(ConfigError, match="no held-out images"):  # the folder's own counts: every image trained on
        heldout_loss(tmp_path / "out")


def test_too_many_reference_images_per_class_names_the_flag(digits_pipeline, tmp_path, capsys):
    argv = ["--pipeline", str(digits_pipeline), "--reference_images_per_class", "100000"]
    argv += ["--output_dir", str(tmp_path / "eval"), "--cache_dir", str(tmp_path / "c"), "--steps", "2"]
    assert_refused(capsys, eval_main, argv, digits_pipeline, "--reference_images_per_class 100000: classes")


class _FailingData(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        from capman_peft.errors import ConfigError

        raise ConfigError("some/image.png: corrupt image (broken data stream); allowed: an image PIL can read")


def test_an_error_in_a_dataloader_worker_is_one_line(capsys):
    def main(argv):
        next(iter(torch.utils.data.DataLoader(_FailingData(), num_workers=1)))

    with pytest.raises(SystemExit):
        run_cli(main, [])
    err = capsys.readouterr().err
    assert err.strip() == "error: some/image.png: corrupt image (broken data stream); allowed: an image PIL can read"


def test_a_train_data_dir_keeps_its_counts_unless_a_ratio_is_given(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="capman_peft")
    data = make_class_folders(tmp_path / "data", [6, 6, 6])
    base = dict(dataset=None, train_data_dir=data, imbalance_ratio=None, train_batch_size=2, max_train_steps=1)
    train_unet_cm.main(digits_run_args(tmp_path, **base, output_dir=tmp_path / "kept"))
    assert json.loads((tmp_path / "kept" / "training_summary.json").read_text())["class_counts"] == [6, 6, 6]
    assert "the folder's own counts" in caplog.text
    train_unet_cm.main(digits_run_args(tmp_path, **{**base, "imbalance_ratio": 3}, output_dir=tmp_path / "cut"))
    assert json.loads((tmp_path / "cut" / "training_summary.json").read_text())["class_counts"] == [6, 3, 2]


# ---------------------------------------------------------------------------------------------------------
# Evaluation: no pickles, and a truncated feature cache is recomputed
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_pipeline(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    train_unet_cm.main(digits_run_args(root))
    return root / "out"


def test_evaluation_never_unpickles_and_caches_features_as_safetensors(digits_pipeline, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    kw = dict(num_images_per_class=3, steps=2, expert="off", cache_dir=tmp_path, progress=False)
    first = evaluate_pipeline(digits_pipeline, "imb-digits", **kw)
    second = evaluate_pipeline(digits_pipeline, "imb-digits", **kw)  # reads the cache
    assert second["overall"]["fid"] == first["overall"]["fid"]
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(name.endswith(".safetensors") for name in written), written


class _Marker:
    """Unpickling this writes a file: the proof that a loader ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


@pytest.mark.parametrize(
    "extractor, suffix, expected",
    [
        ("vgg16", ".pkl", "torch's restricted loader refused it"),
        ("inception-v3-compat", ".pth", "torch's restricted loader refused it"),
        ("digits-classifier", ".pkl", "digits-classifier weights are read from safetensors only"),
        ("digits-classifier", ".safetensors", "cannot be read as safetensors"),
        ("clip-rn50", ".pt", "--feature_extractor clip-rn50: its weights load as a TorchScript archive"),
        ("dinov2-vit-s-14", None, "through torch.hub code"),
    ],
)
def test_feature_extractor_weights_never_run_code_and_are_checked_before_sampling(
    digits_pipeline, tmp_path, capsys, monkeypatch, extractor, suffix, expected
):
    marker = tmp_path / "marker"
    argv = ["--pipeline", str(digits_pipeline), "--feature_extractor", extractor, "--cache_dir", str(tmp_path / "c")]
    if suffix is not None:
        evil = tmp_path / f"evil{suffix}"
        evil.write_bytes(pickle.dumps(_Marker(marker)))
        argv += ["--feature_extractor_weights_path", str(evil)]
    monkeypatch.setattr(
        "capman_peft.evaluation.evaluate.load_pipeline", lambda *a, **k: pytest.fail("sampling began before the check")
    )
    with warnings.catch_warnings(record=True) as caught:  # nothing of the libraries' comes before the error line
        warnings.simplefilter("always")
        assert_refused(capsys, eval_main, argv + ["--output_dir", str(tmp_path / "eval")], digits_pipeline, expected)
    assert not [str(w.message) for w in caught if "pickle" in str(w.message)]
    assert not marker.exists()


def test_extractor_weights_of_the_wrong_network_are_named(digits_pipeline, tmp_path, capsys):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(wrong))
    argv = ["--pipeline", str(digits_pipeline), "--feature_extractor_weights_path", str(wrong)]
    argv += ["--output_dir", str(tmp_path / "eval"), "--cache_dir", str(tmp_path / "c")]
    assert_refused(capsys, eval_main, argv, digits_pipeline, f"{wrong}: not digits-classifier weights")


def test_a_truncated_feature_cache_is_named_and_recomputed(digits_pipeline, tmp_path, capsys):
    kw = dict(num_images_per_class=3, steps=2, cache_dir=tmp_path, progress=False)
    first = evaluate_pipeline(digits_pipeline, "imb-digits", **kw)
    (cache_file,) = (tmp_path / "fidelity").glob("*.safetensors")
    truncate(cache_file)
    second = evaluate_pipeline(digits_pipeline, "imb-digits", **kw)
    err = capsys.readouterr().err
    assert f"{cache_file}: cannot be used" in err and "recomputing" in err
    assert second["overall"]["fid"] == pytest.approx(first["overall"]["fid"], rel=1e-6)
    assert len(cache_file.read_bytes()) > 0 and list((tmp_path / "fidelity").glob("*")) == [cache_file]


def test_sd_base_weights_load_only_from_safetensors(tmp_path, capsys):
    """A base model holding only pickled weights (diffusion_pytorch_model.bin) is refused, not unpickled."""
    base = build_tiny_sd(tmp_path / "sd")
    unet_dir = base / "unet"
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    weights.rename(unet_dir / "diffusion_pytorch_model.bin.bak")
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle either")
    argv = sd_args(tmp_path, base)
    line = assert_refused(capsys, train_text_to_image_cm.main, argv, tmp_path, "--pretrained_model_name_or_path")
    assert "cannot load unet" in line


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"prompt_template": "a {} in the style of {}"}, "--prompt_template: got 'a {} in the style of {}' with 2"),
        ({"cm_forward": "shared_prefix"}, "--cm_forward shared_prefix: computes the down path once"),
        ({"expert_target_modules": "("}, "--expert_target_modules: got '(': '(' is not a valid regex"),
        ({"target_modules": "to_q,["}, "'[' is not a valid regex"),
    ],
    ids=["two placeholders", "shared_prefix", "expert regex", "target regex"],
)
def test_text_to_image_refusals_come_before_the_base_model_loads(tmp_path, capsys, monkeypatch, overrides, expected):
    """Refused with nothing of the base read but its model_index.json (which names the family)."""
    monkeypatch.setattr(stable_diffusion, "load_component", lambda *a, **k: pytest.fail("the base model began to load"))
    index_only = tmp_path / "index-only"
    index_only.mkdir()
    (index_only / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    argv = sd_args(tmp_path, index_only) + as_argv(overrides)
    assert_refused(capsys, train_text_to_image_cm.main, argv, tmp_path, expected)


def test_a_text_to_image_baseline_has_no_expert_to_switch_off(tmp_path, capsys):
    base = build_tiny_sd(tmp_path / "sd")
    train_text_to_image_cm.main(sd_args(tmp_path, base) + ["--no_capacity_manipulation", "--train_batch_size", "2"])
    out = tmp_path / "out"
    assert not (out / "adapter").exists() and (out / "pytorch_lora_weights.safetensors").is_file()
    argv = ["--pipeline", str(out), "--expert", "off", "--output_dir", str(tmp_path / "eval")]
    assert_refused(capsys, eval_main, argv, tmp_path, "has no adapter/adapter_config.json")


def test_float_images_in_zero_one_are_fractions_of_white(tmp_path):
    import numpy as np
    from PIL import Image

    from capman_peft.data import to_rgb

    image = Image.fromarray(np.full((4, 4), 128 / 255, dtype=np.float32), "F")
    image.save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as reread:
        assert np.asarray(to_rgb(reread)).tolist() == [[[128, 128, 128]] * 4] * 4  # not rounded to 0 (black)


def test_tracker_logs_are_averaged_over_processes_and_absent_groups_are_left_out():
    """Two processes: each logs its own losses; a group missing on one process (NaN) is the other's value, and a
    group missing everywhere is dropped."""
    from types import SimpleNamespace

    from capman_peft.training.loop import reduce_logs

    other = {"loss": 0.5, "cm_distance_few": 0.25, "cm_distance_medium": float("nan")}

    def gather(local):
        return torch.cat([local, torch.tensor([[other[k] for k in sorted(other)]])])

    accelerator = SimpleNamespace(device="cpu", num_processes=2, gather=gather)
    mine = {
        "loss": torch.tensor(0.25),
        "cm_distance_few": torch.tensor(float("nan")),
        "cm_distance_medium": torch.tensor(float("nan")),
    }
    assert reduce_logs(accelerator, mine) == {"loss": 0.375, "cm_distance_few": 0.25}


def test_capman_eval_without_a_dataset_to_use_names_the_choices(tmp_path, capsys):
    """A pipeline folder without training_summary.json and no --dataset: one line listing the known datasets."""
    from diffusers import DDPMScheduler

    from capman_peft import save_class_conditional_pipeline
    from capman_peft.testing import make_tiny_unet2d

    save_class_conditional_pipeline(make_tiny_unet2d(num_classes=10), DDPMScheduler(), None, tmp_path / "bare")
    line = assert_refused(capsys, eval_main, ["--pipeline", str(tmp_path / "bare")], tmp_path, "no --dataset given")
    assert "imb-digits" in line


def test_two_classes_report_expert_use_for_the_larger_and_the_smaller_class(tmp_path):
    """CelebA-HQ has two classes, so the class-index thirds leave Many empty: the end-of-training report compares
    the larger class (Many) with the smaller (Few) instead of failing."""
    data = make_class_folders(tmp_path / "data", [12, 3])
    overrides = dict(dataset=None, train_data_dir=data, imbalance_ratio=None, train_batch_size=4)
    train_unet_cm.main(digits_run_args(tmp_path, **overrides))
    report = json.loads((tmp_path / "out" / "training_summary.json").read_text())["expert_use"]
    assert set(report["splits"]) == {"many", "few"} and len(report["per_class_distance"]) == 2


def test_a_prefix_of_a_flag_is_refused_not_guessed(tmp_path, capsys):
    """`--cm_diversity paper` once meant --cm_diversity_weight (argparse's abbreviations): every parser refuses it."""
    argv = digits_run_args(tmp_path) + ["--cm_diversity", "paper"]
    assert_refused(capsys, train_unet_cm.main, argv, tmp_path, "--cm_diversity: replaced by --cm_form")
    argv = digits_run_args(tmp_path) + ["--cm_diversity_w", "0.5"]
    assert_refused(capsys, train_unet_cm.main, argv, tmp_path, "unrecognized arguments: --cm_diversity_w 0.5")
    argv = sd_args(tmp_path, tmp_path / "no-base-needed") + ["--pretrained_model", "x"]
    assert_refused(capsys, train_text_to_image_cm.main, argv, tmp_path, "unrecognized arguments: --pretrained_model")
    argv = ["--pipeline", str(tmp_path), "--metr", "fid"]
    assert_refused(capsys, eval_main, argv, tmp_path, "unrecognized arguments: --metr fid")
    from capman_peft.analysis.cli import main as analyze_main

    argv = ["prune", "--pipe", str(tmp_path)]  # not taken for --pipeline, which is then missing
    assert_refused(capsys, analyze_main, argv, tmp_path, "the following arguments are required: --pipeline")


def test_the_lora_script_names_its_expert_flags_as_doing_nothing_without_cm(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="capman_peft")
    base = build_tiny_sd(tmp_path / "sd")
    train_text_to_image_cm.parse_args(sd_args(tmp_path, base) + ["--no_capacity_manipulation", "--expert_rank", "2"])
    assert "--no_capacity_manipulation: --expert_rank have no effect without CM" in caplog.text


def test_images_in_sub_folders_follow_one_rule(tmp_path, caplog):
    """A class is the images directly in its folder, whether some or all of its images are nested."""
    from PIL import Image

    from capman_peft.data import load_imbalanced_dataset

    for name, direct in (("some", 2), ("none", 0)):
        for i in range(direct):
            Image.new("RGB", (8, 8)).save(make_dir(tmp_path / "data" / name) / f"{i}.png")
        Image.new("RGB", (8, 8)).save(make_dir(tmp_path / "data" / name / "deeper") / "x.png")
    with pytest.raises(ConfigError, match=r"class 'none' has no images directly in its folder \(1 in sub-folders "):
        load_imbalanced_dataset(None, imbalance_ratio=None, train_data_dir=tmp_path / "data", resolution=8)
    shutil.rmtree(tmp_path / "data" / "none")
    Image.new("RGB", (8, 8)).save(make_dir(tmp_path / "data" / "other") / "y.png")
    caplog.set_level(logging.WARNING, logger="capman_peft")
    data = load_imbalanced_dataset(None, imbalance_ratio=None, train_data_dir=tmp_path / "data", resolution=8)
    assert data.class_counts == [1, 2] and "class 'some': 1 images in sub-folders" in caplog.text


def make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_step_out_of_memory_stops_with_what_to_try_and_the_checkpoint_intact(tmp_path, capsys, monkeypatch):
    """Simulated: the step after the checkpoint raises torch's out-of-memory error inside the backward pass."""
    import capman_peft.training.loop as training_loop

    real, calls = training_loop.backward_and_step, []

    def out_of_memory_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(training_loop, "backward_and_step", out_of_memory_at_step_3)
    argv = digits_run_args(tmp_path, max_train_steps=4, checkpointing_steps=2)
    with pytest.raises(SystemExit) as stopped:
        run_cli(train_unet_cm.main, argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert lines[0].startswith("error: step 3: out of accelerator memory with --train_batch_size 8; try ")
    assert "--gradient_checkpointing" in lines[0] and f"the last checkpoint, {checkpoint}, is intact" in lines[0]
    monkeypatch.setattr(training_loop, "backward_and_step", real)
    train_unet_cm.main(argv + ["--resume_from_checkpoint", "latest"])  # the checkpoint loads and the run finishes
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["steps"] == 4


def test_a_run_stopped_by_signals_and_resumed_each_time_ends_where_an_uninterrupted_run_ends(tmp_path, capsys):
    """SIGTERM (SIGINT alike) at random steps: the step finishes, a checkpoint is saved, one line says where and how to
    go on, the exit status is the shell's for the signal; SIGUSR1 saves and trains on. Resumed each time, the run
    ends bit-identical to the uninterrupted one."""
    import functools
    import random
    import signal

    from safetensors.torch import load_file

    from capman_peft.training.loop import TrainingCallbacks

    steps = 9
    train_unet_cm.main(digits_run_args(tmp_path, max_train_steps=steps, output_dir=tmp_path / "straight"))
    stops = sorted(random.Random(0).sample(range(1, steps), 3))
    signals = {step: signal.SIGTERM for step in stops} | {stops[0] + 1: signal.SIGUSR1}

    def send(step: int, values: dict) -> None:
        if step in signals:
            os.kill(os.getpid(), signals[step])

    main = functools.partial(train_unet_cm.main, callbacks=TrainingCallbacks(on_step_end=send))
    out = tmp_path / "stopped"
    argv = digits_run_args(tmp_path, max_train_steps=steps, checkpointing_steps=100, output_dir=out)
    for round_, stop in enumerate(stops):
        with pytest.raises(SystemExit) as stopped:
            run_cli(main, argv + (["--resume_from_checkpoint", "latest"] if round_ else []))
        assert stopped.value.code == 128 + signal.SIGTERM
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line == (
            f"stopped: SIGTERM after step {stop}: saved {out / f'checkpoint-{stop}'}; continue with "
            "--resume_from_checkpoint latest"
        )
        if round_ == 1:  # stops are [4, 7, 8]: round 1 resumed at 4, saved at 5 on SIGUSR1, went on to 7
            assert stops == [4, 7, 8] and (out / "checkpoint-5").is_dir()
    run_cli(main, argv + ["--resume_from_checkpoint", "latest"])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are the caller's again
    for name in ("unet/diffusion_pytorch_model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# Set in a test's rerun inside a user and mount namespace (`small_disk`), so that the rerun does not rerun again.
IN_MOUNT_NAMESPACE = "CAPMAN_TEST_IN_MOUNT_NAMESPACE"


@pytest.fixture
def small_disk(tmp_path, request):
    """A 20 MiB tmpfs (more than the 16 MiB the start check asks for), unmounted afterwards.

    Mounting needs CAP_SYS_ADMIN. Without it, the test runs again in a new user and mount namespace (``unshare``),
    where an unprivileged user may mount a tmpfs; that run is the test, and the fixture gives None."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        rerun_in_mount_namespace(request, mounted.stderr.decode().strip())
        yield None
        return
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def rerun_in_mount_namespace(request: pytest.FixtureRequest, why: str) -> None:
    """Run the requesting test in a pytest of its own under ``unshare --user --map-root-user --mount``; fail with its
    output unless it passed there, skip where no namespace can be made either."""
    unshare = ["unshare", "--user", "--map-root-user", "--mount"]
    if (
        os.environ.get(IN_MOUNT_NAMESPACE)
        or shutil.which("unshare") is None
        or subprocess.run([*unshare, "true"], capture_output=True).returncode
    ):
        pytest.skip(f"cannot mount a tmpfs here ({why}): needs CAP_SYS_ADMIN or unprivileged user namespaces")
    done = subprocess.run(
        [*unshare, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
        cwd=request.config.rootpath, env={**os.environ, IN_MOUNT_NAMESPACE: "1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-6000:] + done.stderr[-2000:]


def fill(disk: Path, leave: int = 16 * 2**10) -> None:
    """Fill `disk` so that only about `leave` bytes stay free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def test_a_disk_that_fills_mid_run_stops_it_with_one_line_and_keeps_what_was_whole(small_disk, tmp_path, capsys):
    """On a real small filesystem: the checkpoint that does not fit stops the run with one line, the earlier
    checkpoint and export stay whole and loadable, and nothing half-written is left on the next start."""
    import functools

    from capman_peft.training.loop import TrainingCallbacks

    if small_disk is None:
        return  # it ran, and passed, in a mount namespace of its own
    out = small_disk / "out"
    argv = digits_run_args(tmp_path, max_train_steps=4, checkpointing_steps=2, output_dir=out)
    train_unet_cm.main(argv)  # a complete run: checkpoints 2 and 4 and an export
    earlier = {p: snapshot(out)[p] for p in ("model_index.json", "unet/diffusion_pytorch_model.safetensors")}
    filled = TrainingCallbacks(on_step_end=lambda step, values: fill(small_disk) if step == 5 else None)
    more = argv + ["--resume_from_checkpoint", "latest", "--max_train_steps", "8"]
    with pytest.raises(SystemExit):
        run_cli(functools.partial(train_unet_cm.main, callbacks=filled), more)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: --output_dir {out}: writing checkpoint-6 failed (No space left on device)")
    assert f"{out / 'checkpoint-4'} is kept" in lines[0]
    assert {p: snapshot(out)[p] for p in earlier} == earlier
    assert not list(out.glob(".*incomplete")) and not (out / "checkpoint-6").exists()
    # the disk fills again just before the export: the earlier export stays whole
    (small_disk / "filler").unlink()
    filled = TrainingCallbacks(on_step_end=lambda step, values: fill(small_disk) if step == 8 else None)
    argv_8 = more[:-2] + ["--max_train_steps", "8", "--checkpointing_steps", "100"]
    with pytest.raises(SystemExit):
        run_cli(functools.partial(train_unet_cm.main, callbacks=filled), argv_8)
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "writing the exported pipeline failed (No space left on device)" in lines[0], lines
    assert {p: snapshot(out)[p] for p in earlier} == earlier and not list(out.glob(".*incomplete"))
    (small_disk / "filler").unlink()
    (out / ".checkpoint-9.incomplete").mkdir()  # what a killed save would leave
    train_unet_cm.main(argv_8[:-4] + ["--max_train_steps", "8"])  # resumes from checkpoint-4 and finishes
    assert not list(out.glob(".*incomplete"))
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 8
    from capman_peft import ClassConditionalPipeline

    assert ClassConditionalPipeline.from_pretrained(out).unet is not None


@pytest.mark.parametrize(
    ("flag", "replacement"),
    [("--cm_diversity", "--cm_form"), ("--allow_unstable_cm", "--allow_unbounded_cm"),
     ("--validation_images_per_class", "--num_validation_images")],
)  # fmt: skip
def test_a_replaced_flag_names_its_replacement(tmp_path, capsys, flag, replacement):
    argv = digits_run_args(tmp_path) + [flag, "1"]
    assert_refused(capsys, train_unet_cm.main, argv, tmp_path, f"{flag}: replaced by {replacement}")
