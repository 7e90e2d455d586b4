#!/usr/bin/env python
"""Does a training step cost more with more classes? The from-scratch CM step (shared_prefix, θ^g on a quarter of
the batch, DDPM base) at 10 classes and at ImageNet-LT's 1,000 and iNaturalist's 8,142, long-tailed counts, same
UNet otherwise, interleaved in one process; the ratio against 10 classes is the cost of the classes.

    python bench/scale_classes.py                 # small UNet 16x16 and the paper UNet 32x32, batch 8, CPU
    python bench/scale_classes.py --quick         # small UNet only

What grows with C is only the class-embedding table (C + 1 rows, trained with the rest in full mode: Adam touches
every row each step) and the per-class CM coefficients (indexed per row, never looped over).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from peft import get_peft_model

from capman_peft import CapManConfig
from capman_peft.data import long_tail_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speed import CONFIGS, UP_TARGETS, interleaved_medians, training_step  # noqa: E402

CLASS_COUNTS = {10: 100, 1000: 256, 8142: 500}  # classes: imbalance ratio (CIFAR-10-LT, ImageNet-LT, iNaturalist)


def cm_step(config: dict, num_classes: int, imbalance_ratio: float, batch: int):
    counts = long_tail_counts(1000, num_classes, imbalance_ratio)
    torch.manual_seed(0)
    unet = UNet2DModel(**config, num_class_embeds=num_classes + 1)
    model = get_peft_model(unet, CapManConfig(mode="full", expert_rank_ratio=0.1, target_modules=UP_TARGETS))
    step, _ = training_step(model, True, "shared_prefix", batch, config["sample_size"], 0.25, counts)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="Small UNet only.")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for name, config in CONFIGS.items():
        if args.quick and "small" not in name:
            continue
        steps = {c: cm_step(config, c, ir, args.batch) for c, ir in CLASS_COUNTS.items()}
        medians = interleaved_medians({f"{c} classes": step for c, step in steps.items()}, args.repeats, args.warmup)
        base = medians["10 classes"]
        print(f"\n### CM training step vs number of classes, {name}, batch {args.batch}, {platform.machine()}\n")
        print("| classes (imbalance ratio) | step time (s) | ÷ 10 classes |")
        print("|---|---|---|")
        for (c, ir), seconds in zip(CLASS_COUNTS.items(), medians.values(), strict=True):
            print(f"| {c:,} (IR {ir}) | {seconds:.3f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
