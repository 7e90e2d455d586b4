"""Test helpers; the tiny models themselves are built by :mod:`capman_peft.testing`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from capman_peft.testing import make_tiny_sd_unet, make_tiny_unet2d

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Scripts the tests start in subprocesses (torchrun), not test modules: nothing here imports them.
collect_ignore = ["distributed_cm_step.py", "distributed_fault_step.py"]

# Experts in the up path only, on convs and attention projections (the paper's from-scratch setting).
UP_TARGETS = r"up_blocks\..*\.(conv1|conv2|to_q|to_k|to_v|to_out\.0)"
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# A UNet2DModel config for train_unet_cm.py's tests: 8x8 digits, dropout on.
TINY_UNET_CONFIG = {
    "_class_name": "UNet2DModel",
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 4,
    "dropout": 0.1,
}


def as_argv(values: dict) -> list[str]:
    """``{"flag": value}`` as command-line tokens: True is a bare flag, False and None are left out."""
    argv = []
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            argv += [f"--{key}", str(value)]
    return argv


# A tiny train_text_to_image_cm.py run: 16 px, batch 4, 2 steps, adapter rank 4 + expert rank 2, no validation.
TINY_TEXT_TO_IMAGE_RUN = {
    "resolution": 16,
    "train_batch_size": 4,
    "max_train_steps": 2,
    "rank": 4,
    "expert_rank": 2,
    "learning_rate": 1e-3,
    "num_inference_steps": 2,
    "num_validation_images": 1,
    "validation_epochs": 0,
    "report_to": "none",
    "checkpointing_steps": 100,
}


def text_to_image_args(base: Path | str, out: Path, **overrides) -> list[str]:
    """train_text_to_image_cm.py on the tiny base model `base` into `out`; `overrides` change or add flags (False or
    None leaves one out)."""
    return as_argv({"pretrained_model_name_or_path": base, **TINY_TEXT_TO_IMAGE_RUN, "output_dir": out, **overrides})


def artbench_assets(root: Path, base: Path) -> SimpleNamespace:
    """A tiny base model and the ArtBench mirror (`write_artbench_mirror`) under `root`: what the text-to-image tests
    train on, with `args` giving the named dataset's flags."""
    from capman_peft.testing import write_artbench_mirror

    data = write_artbench_mirror(root / "artbench")
    cache = root / "hf"
    args = {"dataset": "imb-artbench10", "dataset_name": data, "cache_dir": cache, "imbalance_ratio": 4}
    return SimpleNamespace(base=base, data=data, cache=cache, args=args)


def evaluable_artbench_assets(root: Path, base: Path) -> SimpleNamespace:
    """`artbench_assets` with a test split (the same images) for capman-eval to compare with."""
    import shutil

    assets = artbench_assets(root, base)
    data = assets.data / "data"
    shutil.copy(data / "train-00000-of-00001.parquet", data / "test-00000-of-00001.parquet")
    return assets


def digits_run_args(tmp_path: Path, **overrides) -> list[str]:
    """train_unet_cm.py on the bundled digits (IR 10, 8x8, the tiny UNet written to `tmp_path`), 2 steps, into
    `tmp_path/out`, checkpoint at step 2; `overrides` change or add flags."""
    config = tmp_path / "unet.json"
    if not config.exists():
        config.write_text(json.dumps(TINY_UNET_CONFIG))
    values = {
        "dataset": "imb-digits",
        "capacity_manipulation": True,  # the script's default is off; these tests exercise CM unless told otherwise
        "imbalance_ratio": 10,
        "resolution": 8,
        "model_config_name_or_path": config,
        "train_batch_size": 8,
        "max_train_steps": 2,
        "learning_rate": 1e-3,
        "num_inference_steps": 2,
        "num_validation_images": 1,
        "report_to": "none",
        "checkpointing_steps": 2,
        "output_dir": tmp_path / "out",
    }
    return as_argv({**values, **overrides})


@pytest.fixture
def tiny_unet2d() -> UNet2DModel:
    return make_tiny_unet2d()


@pytest.fixture
def tiny_sd_unet() -> UNet2DConditionModel:
    return make_tiny_sd_unet()


# Prepended to code run by `run_python_without_capman`: any import of capman_peft fails, as for a user who only has
# diffusers installed.
_BLOCK_CAPMAN = """
import sys

class _BlockCapman:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "capman_peft":
            raise ImportError("capman_peft is blocked in this test")

sys.meta_path.insert(0, _BlockCapman())
"""


def run_python_without_capman(code: str, args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where capman_peft cannot be imported (custom-pipeline loading)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_CAPMAN + code, *map(str, args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_samples_without_capman(folder: Path, class_labels: list[int], tmp_path: Path, check: str = "") -> None:
    """The class-conditional pipeline in `folder` loads as a diffusers custom pipeline where capman_peft cannot be
    imported, passes `check` (Python run on `pipe`), and samples 8x8 images of `class_labels`."""
    code = (
        "import torch\nfrom diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline='pipeline', trust_remote_code=True)\n"
        f"{check}\nimages = pipe(class_labels={class_labels}, num_inference_steps=2, output_type='np').images\n"
        f"assert images.shape == ({len(class_labels)}, 8, 8, 3)\nprint('ok')\n"
    )
    result = run_python_without_capman(code, [folder], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def run_two_processes(script: Path, args: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`script args` under torchrun: 2 CPU processes (gloo), one thread each so 2 cores are not oversubscribed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run([*cmd, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_resume_is_exact(args_of: Callable[..., list[str]], tmp_path: Path) -> None:
    """4 straight steps of train_text_to_image_cm.py give the adapter that 2 steps, a checkpoint and a resume for 2
    more give, bit for bit (`args_of(out, **flags)`: a family's tiny run)."""
    import train_text_to_image_cm

    train_text_to_image_cm.main(args_of(tmp_path / "straight", max_train_steps=4))
    train_text_to_image_cm.main(args_of(tmp_path / "resumed", max_train_steps=2, checkpointing_steps=2))
    train_text_to_image_cm.main(
        args_of(tmp_path / "resumed", max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest")
    )
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_unet_resume_is_exact(args_of: Callable[..., list[str]], tmp_path: Path) -> None:
    """4 straight steps of train_unet_cm.py give the UNet that 2 steps, a checkpoint at step 2 and a resume for 2 more
    give, bit for bit (`args_of(name, **flags)`: a digits run into `tmp_path/name` that checkpoints at step 2)."""
    import train_unet_cm

    train_unet_cm.main(args_of("straight", max_train_steps=4))
    train_unet_cm.main(args_of("resumed", max_train_steps=2))
    train_unet_cm.main(args_of("resumed", max_train_steps=4, resume_from_checkpoint="latest"))
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_accumulation_equals_one_batch(args_of: Callable[..., list[str]], tmp_path: Path) -> None:
    """2 accumulated half batches train what one full batch trains (dropout off, θ^g on every row, the paper form)."""
    import train_text_to_image_cm

    same = dict(
        max_train_steps=2, lora_dropout=0, caption_dropout=0, cm_general_fraction=1, cm_form="paper",
        allow_unbounded_cm=True,
    )  # fmt: skip
    train_text_to_image_cm.main(args_of(tmp_path / "full", train_batch_size=4, **same))
    train_text_to_image_cm.main(
        args_of(tmp_path / "accumulated", train_batch_size=2, gradient_accumulation_steps=2, **same)
    )
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "accumulated" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def tiny_capman_eval(pipeline: Path, data: Path, out: Path, expert: str, cache: Path, images: int = 1) -> dict:
    """capman-eval on a tiny text-to-image output with the tiny feature extractor: FID per split, `images` per class
    on both sides, 2 DDIM steps; the metrics.json it writes."""
    from test_evaluation import TINY  # registers the tiny feature extractor

    from capman_peft.evaluation.cli import main as evaluate

    evaluate([
        "--pipeline", str(pipeline), "--dataset_name", str(data), "--num_images_per_class", str(images),
        "--reference_images_per_class", str(images), "--steps", "2", "--batch_size", "10", "--cache_dir", str(cache),
        "--feature_extractor", TINY, "--metrics", "fid", "--expert", expert, "--output_dir", str(out),
    ])  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def assert_prompted_output_samples_without_capman(out: Path, pipeline_class: str, tmp_path: Path) -> None:
    """``DiffusionPipeline.from_pretrained(out)``, in an interpreter where capman_peft cannot be imported, is a
    `pipeline_class` that samples a finite 16 px image."""
    code = f"""
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert type(pipe).__name__ == "{pipeline_class}", type(pipe)
image = pipe("a baroque painting", num_inference_steps=2, height=16, width=16, output_type="pt").images
assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
print("ok")
"""
    result = run_python_without_capman(code, [out], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def assert_lora_files_give_the_merged_transformer(
    out: Path, base: Path, tmp_path: Path, pipeline_class: str, transformer_class: str, call: str
) -> None:
    """Without capman_peft: base + ``load_lora_weights(out)``, with and without ``fuse_lora``, computes what the merged
    transformer computes (max abs < 1e-4), the base alone does not, and the general file gives another model (θ^g).
    `call` is code defining ``run(model)``: the transformer's output on fixed inputs."""
    code = f"""
import torch
from diffusers import {pipeline_class}, {transformer_class}
out, base = sys.argv[1], sys.argv[2]
merged = {transformer_class}.from_pretrained(out + "/transformer").eval()
torch.manual_seed(1)
{call}
expected = run(merged)
pipe = {pipeline_class}.from_pretrained(base)
plain = run(pipe.transformer)
pipe.load_lora_weights(out)
assert (run(pipe.transformer) - expected).abs().max() < 1e-4
pipe.fuse_lora()
assert (run(pipe.transformer) - expected).abs().max() < 1e-4
assert (plain - expected).abs().max() > 1e-6
general = {pipeline_class}.from_pretrained(base)
general.load_lora_weights(out, weight_name="pytorch_lora_weights_general.safetensors")
assert (run(general.transformer) - expected).abs().max() > 1e-7
print("ok")
"""
    result = run_python_without_capman(code, [out, base], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def family_args(assets: SimpleNamespace, out: Path, **overrides) -> list[str]:
    """train_text_to_image_cm.py on a family's tiny base (`family_fixtures`) and the ArtBench mirror, centre crop,
    into `out`; `overrides` change or add flags."""
    return text_to_image_args(assets.base, out, **{**assets.args, "center_crop": True, **overrides})


def family_fixtures(build: Callable[[Path], Path]) -> tuple[Any, Any]:
    """A family test module's module-scoped fixtures: ``assets`` (the tiny base `build` writes, the ArtBench mirror
    with a test split) and ``trained`` (its output after 3 CM steps). Use: ``assets, trained =
    family_fixtures(build_tiny_flux)``."""

    @pytest.fixture(scope="module")
    def assets(tmp_path_factory) -> SimpleNamespace:
        root = tmp_path_factory.mktemp("assets")
        return evaluable_artbench_assets(root, build(root))

    @pytest.fixture(scope="module")
    def trained(assets, tmp_path_factory) -> Path:
        import train_text_to_image_cm

        out = tmp_path_factory.mktemp("run") / "out"
        train_text_to_image_cm.main(family_args(assets, out, max_train_steps=3))
        return out

    return assets, trained


def assert_capman_eval_and_analyze_run(trained: Path, assets: SimpleNamespace, tmp_path: Path) -> None:
    """On a tiny text-to-image output: capman-eval measures θ and θ^g per split, and capman-analyze's capacity and
    held-out analyses encode the class prompts and run."""
    from capman_peft.analysis.cli import main as analyze

    for expert in ("on", "off"):
        metrics = tiny_capman_eval(trained, assets.data, tmp_path / expert, expert, tmp_path, images=2)
        assert metrics["expert"] == expert and metrics["num_classes"] == 10 and metrics["kind"] == "text-to-image"
        assert all(math.isfinite(metrics["splits"][split]["fid"]) for split in ("many", "medium", "few"))
    data = ["--pipeline", str(trained), "--dataset_name", str(assets.data)]
    analyze(["capacity", *data, "--num_batches", "1", "--batch_size", "2", "--output_dir", str(tmp_path / "cap")])
    usage = json.loads((tmp_path / "cap" / "capacity.json").read_text())["expert_usage"]
    assert len(usage) == 10 and all(value >= 0 for value in usage)
    analyze(["heldout", *data, "--images_per_class", "2", "--timesteps", "2", "--output_dir", str(tmp_path / "held")])
    assert (tmp_path / "held" / "heldout.json").is_file()
