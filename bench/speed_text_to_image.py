#!/usr/bin/env python
"""What CM costs a Stable Diffusion user: train_text_to_image_cm.py step time with CM ÷ without, in one run.

    python bench/speed_text_to_image.py              # 3 rounds x 3 variants, about 5 min on 2 CPU cores

The tiny Stable Diffusion of `capman_peft.testing` (its VAE halves the image side: 64 px images give 32 x 32
latents, the latent size of SD at 256 px), 256 images at 64 px in 10 class folders, batch 8, LoRA rank 16 + expert
rank 4, fp32. Each variant is its own process (one model in memory, as in a real run), the variants alternate over
`--rounds` rounds, and each process reports the median time of steps 6-30 (the first steps warm up caches).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "CM off (plain LoRA, rank 16)": ["--no_capacity_manipulation"],
    "CM on, general pass on 25% of the batch (default)": [],
    "CM on, general pass on the whole batch": ["--cm_general_fraction", "1"],
}
COUNTS = [64, 48, 36, 28, 22, 18, 14, 11, 8, 7]  # 256 images, imbalance ratio ~9
STEPS, TIMED_FROM = 30, 6


def make_assets(root: Path) -> tuple[Path, Path]:
    """The tiny SD pipeline and a class-folder dataset of random 64 px images."""
    import numpy as np
    from PIL import Image

    from capman_peft.testing import build_tiny_sd

    rng = np.random.default_rng(0)
    for c, n in enumerate(COUNTS):
        folder = root / "data" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return build_tiny_sd(root), root / "data"


def measure(base: Path, data: Path, flags: list[str], out: Path) -> float:
    """Median seconds per optimizer step of steps TIMED_FROM..STEPS of one training run in this process."""
    import train_text_to_image_cm
    from capman_peft.training.loop import TrainingCallbacks

    stamps: list[float] = []
    timed = TrainingCallbacks(on_step_end=lambda step, values: stamps.append(time.perf_counter()))
    train_text_to_image_cm.main(
        [
            "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--resolution", "64",
            "--center_crop", "--train_batch_size", "8", "--max_train_steps", str(STEPS), "--rank", "16",
            "--expert_rank", "4", "--validation_epochs", "0", "--num_inference_steps", "2",
            "--num_validation_images", "1", "--report_to", "none", "--checkpointing_steps", "1000",
            "--output_dir", str(out), *flags,
        ],
        timed,
    )  # fmt: skip
    return statistics.median(b - a for a, b in zip(stamps[TIMED_FROM - 1 :], stamps[TIMED_FROM:], strict=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; every variant runs once per round.")
    parser.add_argument("--child", nargs=3, metavar=("BASE", "DATA", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base, data, variant = args.child
        out = Path(tempfile.mkdtemp(prefix="capman-speed-")) / "out"
        print(json.dumps(measure(Path(base), Path(data), VARIANTS[variant], out)))
        return
    import torch

    base, data = make_assets(Path(tempfile.mkdtemp(prefix="capman-speed-assets-")))
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--child", str(base), str(data), name]
            output = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            seconds[name].append(float(output.strip().splitlines()[-1]))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    baseline = medians["CM off (plain LoRA, rank 16)"]
    print(
        f"\n### train_text_to_image_cm.py, tiny SD, 64 px images (32 x 32 latents), batch 8, fp32; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| run | s/step (median of steps 6-30, median of rounds) | ÷ CM off |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.4f} | {value / baseline:.2f} |")


if __name__ == "__main__":
    main()
