#!/usr/bin/env python
"""One prepared check for a GPU machine: both training scripts in every precision, CM on and off.

    python bench/gpu_check.py                  # on a GPU: fp32, bf16, fp16; about 5 minutes on one H200
    python bench/gpu_check.py --steps 3 --small --batch_size 2   # the same flow on a CPU, in seconds (a test)

Rows: train_unet_cm.py with the paper's UNet (ch 128, mult [1,2,2,2], attention at 16x16) on 32 px images (the
bundled digits, upscaled), batch 64; train_text_to_image_cm.py on the tiny Stable Diffusion and the tiny SDXL of
`capman_peft.testing` (no network on the GPU machine), 64 px, batch 8. Each run is its own process. Printed per run:
seconds per optimizer step (median of the steps after the first five), peak GPU memory, CM on ÷ CM off, whether
every logged loss is finite, and how far the mean loss is from the fp32 run's (same seed, same data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TIMED_FROM = 5
# The tests' UNet (8/16 channels) for --small, instead of the paper's
SMALL_UNET = {
    "_class_name": "UNet2DModel", "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4, "attention_head_dim": 8, "dropout": 0.1,
}  # fmt: skip


def run_flags(script: str, assets: Path, args: argparse.Namespace) -> list[str]:
    if script == "unet":
        flags = ["--dataset", "imb-digits", "--imbalance_ratio", "10", "--resolution", "32"]
        if args.small:
            config = assets / "small_unet.json"
            config.write_text(json.dumps(SMALL_UNET))
            flags += ["--model_config_name_or_path", str(config)]
        batch = args.batch_size or 64
        return [*flags, "--train_batch_size", str(batch), "--learning_rate", "2e-4", "--lr_warmup_steps", "0"]
    base = assets / script / "base"
    return [
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(assets / "images"), "--resolution", "64",
        "--center_crop", "--train_batch_size", str(args.batch_size or 8), "--rank", "16", "--expert_rank", "4",
    ]  # fmt: skip


def child(script: str, assets: Path, precision: str, cm: bool, args: argparse.Namespace) -> dict:
    """One run in this process: step times, peak memory and the logged losses."""
    import torch

    from capman_peft.training.loop import TrainingCallbacks

    module = __import__("train_unet_cm" if script == "unet" else "train_text_to_image_cm")
    stamps: list[float] = []
    losses: list[float] = []

    def on_step_end(step: int, values: dict[str, float]) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        losses.append(values["loss"])

    out = Path(tempfile.mkdtemp(prefix="capman-gpu-check-")) / "out"
    flags = [*run_flags(script, assets, args), "--max_train_steps", str(args.steps), "--mixed_precision", precision]
    flags += ["--validation_epochs", "0", "--num_validation_images", "1", "--num_inference_steps", "2"]
    flags += ["--checkpointing_steps", "100000", "--report_to", "none", "--output_dir", str(out), "--seed", "0"]
    flags += ["--capacity_manipulation"] if cm else ["--no_capacity_manipulation"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    module.main(flags, TrainingCallbacks(on_step_end=on_step_end))
    gaps = [b - a for a, b in zip(stamps[TIMED_FROM - 1 :], stamps[TIMED_FROM:], strict=False)]
    gaps = gaps or [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"seconds_per_step": statistics.median(gaps), "peak_gib": peak, "losses": losses}


def make_assets(root: Path) -> None:
    import numpy as np
    from PIL import Image

    from capman_peft.testing import build_tiny_sd, build_tiny_sdxl

    build_tiny_sd(root / "sd")
    build_tiny_sdxl(root / "sdxl")
    rng = np.random.default_rng(0)
    for c, n in enumerate([48, 24, 12, 6]):
        folder = root / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per run.")
    parser.add_argument("--batch_size", type=int, default=None, help="Batch size (default: 64 UNet, 8 SD/SDXL).")
    parser.add_argument("--small", action="store_true", help="The tests' tiny UNet instead of the paper's.")
    parser.add_argument("--child", nargs=4, metavar=("SCRIPT", "ASSETS", "PRECISION", "CM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        script, assets, precision, cm = args.child
        print(json.dumps(child(script, Path(assets), precision, cm == "on", args)))
        return
    import torch

    on_gpu = torch.cuda.is_available()
    precisions = ["no", "bf16", "fp16"] if on_gpu else ["no", "bf16"]
    assets = Path(tempfile.mkdtemp(prefix="capman-gpu-check-assets-"))
    make_assets(assets)
    device = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    print(f"gpu_check on {device}, torch {torch.__version__}, {args.steps} steps per run")
    print("| script | precision | CM | s/step | peak GiB | CM ÷ off | losses finite | mean loss vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for script in ("unet", "sd", "sdxl"):
        fp32_loss = {}
        for precision in precisions:
            results = {}
            for cm in ("off", "on"):
                cmd = [sys.executable, __file__, "--child", script, str(assets), precision, cm]
                cmd += ["--steps", str(args.steps)] + (["--small"] if args.small else [])
                cmd += ["--batch_size", str(args.batch_size)] if args.batch_size else []
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    print(f"| {script} | {precision} | {cm} | FAILED: {done.stderr.strip().splitlines()[-1:]} |")
                    ok = False
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results[cm] = result
                losses = result["losses"]
                finite = all(v == v and abs(v) != float("inf") for v in losses)
                mean = sum(losses) / len(losses)
                fp32_loss.setdefault(cm, mean)
                drift = abs(mean / fp32_loss[cm] - 1)
                ok &= finite and drift < 0.1
                ratio = (
                    f"{result['seconds_per_step'] / results['off']['seconds_per_step']:.2f}"
                    if cm == "on" and "off" in results
                    else "–"
                )
                print(
                    f"| {script} | {precision} | {cm} | {result['seconds_per_step']:.4f} | {result['peak_gib']:.2f} | "
                    f"{ratio} | {finite} | {100 * drift:.1f}% |",
                    flush=True,
                )
    print("all runs finite and within 10% of fp32" if ok else "CHECK FAILED: see the rows above")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
