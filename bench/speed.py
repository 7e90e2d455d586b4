#!/usr/bin/env python
"""What CM costs: training-step time and activation memory with CM ÷ without, per forward mode, and what the merged
model costs at inference (nothing). Every figure is a ratio against a baseline measured in the same run, interleaved
(A, B, A, B, ...) so that machine drift hits both, median of `--repeats` after `--warmup` untimed runs.

    python bench/speed.py                 # paper UNet (32x32) and a small UNet, batch 8, CPU
    python bench/speed.py --quick         # small UNet only, fewer repeats

The text-to-image script's own step time, CM off vs on: bench/speed_text_to_image.py.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from peft import get_peft_model

from capman_peft import CapManConfig, ClassConditionalPipeline, CMDenoiser
from capman_peft.objective import CMSettings, build_objective, cm_weights, diffusion_loss
from capman_peft.randomness import draw_step

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train_unet_cm import UP_PATH_TARGETS as UP_TARGETS  # noqa: E402  (the script's expert placement)

NUM_CLASSES = 10
COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10 IR 100

CONFIGS = {
    "paper UNet 32x32 (35.7M)": dict(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        attention_head_dim=64,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
    ),
    "small UNet 16x16": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=32,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
}


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during one forward: the peak-memory driver of a training step."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().backward()
    return total


# Training variants: forward mode and the fraction of the batch theta^g runs on (--cm_general_fraction).
TRAINING_VARIANTS = {
    "no CM": (None, 1.0),
    "fused": ("fused", 1.0),
    "sequential": ("sequential", 1.0),
    "shared_prefix": ("shared_prefix", 1.0),
    "fused, θ^g on 25% of the batch": ("fused", 0.25),
    "shared_prefix, θ^g on 25% of the batch": ("shared_prefix", 0.25),
}


def training_step(
    model: torch.nn.Module,
    cm: bool,
    mode: str,
    batch: int,
    size: int,
    general_fraction: float = 1.0,
    counts: list[int] = COUNTS,
):
    """A closure doing one optimizer step (DDPM base, + CM when `cm`) and one returning the loss (for memory), for a
    training set of `counts` images per class."""
    num_classes = len(counts)
    denoiser = CMDenoiser(model, forward_mode=mode, capacity_manipulation=cm)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    objective = build_objective("ddpm", scheduler=scheduler, class_counts=counts)
    weights = CMSettings(cm_weights(counts), "hinge", 0.1, 1.0, general_fraction) if cm else None
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x0 = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch) * (num_classes // batch or 1) % num_classes  # spread over the classes

    draws = draw_step(
        torch.Generator().manual_seed(0),
        batch,
        x0.shape[1:],
        label_dropout=0.1,
        objective=objective,
        general_draw=cm and general_fraction < 1,
    ).rows(0, batch, x0.device)

    def loss() -> torch.Tensor:
        return diffusion_loss(denoiser, objective, x0, labels, num_classes=num_classes, cm=weights, draws=draws)[0]

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, loss


def cm_model(config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = UNet2DModel(**config, num_class_embeds=NUM_CLASSES + 1)
    return get_peft_model(unet, CapManConfig(mode="full", expert_rank_ratio=0.1, target_modules=UP_TARGETS))


def variant_step(config: dict, variant: str, batch: int):
    """`training_step` of one of TRAINING_VARIANTS: a plain UNet for "no CM", a CM model otherwise."""
    mode, fraction = TRAINING_VARIANTS[variant]
    if mode is None:
        torch.manual_seed(0)
        plain = UNet2DModel(**config, num_class_embeds=NUM_CLASSES + 1)
        return training_step(plain, False, "fused", batch, config["sample_size"])
    return training_step(cm_model(config), True, mode, batch, config["sample_size"], fraction)


def step_seconds(config_name: str, variant: str, batch: int, repeats: int, warmup: int) -> float:
    """Median step time of one variant, alone in this process (one model in memory, as in a real run)."""
    step, _ = variant_step(CONFIGS[config_name], variant, batch)
    return interleaved_medians({variant: step}, repeats, warmup)[variant]


def bench_training(name: str, batch: int, repeats: int, warmup: int, rounds: int = 3) -> None:
    """Each variant runs in its own process (measured: four 36M-parameter models with Adam state in one process
    slowed the larger CM steps by cache and allocator effects, 2.59x vs 1.96x for fused); processes alternate over
    `rounds` rounds and the median round is reported."""
    modes = list(TRAINING_VARIANTS)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            cmd = [
                sys.executable,
                __file__,
                "--measure_step",
                name,
                mode,
                "--batch",
                str(batch),
                "--repeats",
                str(repeats),
                "--warmup",
                str(warmup),
            ]
            output = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            times[mode].append(float(output.strip().splitlines()[-1]))
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    losses = {mode: variant_step(CONFIGS[name], mode, batch)[1] for mode in modes}
    memory = {key: saved_activation_bytes(fn) for key, fn in losses.items()}
    print(f"\n### Training step, {name}, batch {batch}, {platform.processor() or platform.machine()}\n")
    print("| forward mode | step time (s) | time ÷ no CM | activation memory ÷ no CM |")
    print("|---|---|---|---|")
    for key, seconds in medians.items():
        print(f"| {key} | {seconds:.3f} | {seconds / medians['no CM']:.2f} | {memory[key] / memory['no CM']:.2f} |")


def bench_inference(name: str, config: dict, batch: int, repeats: int, warmup: int, steps: int = 10) -> None:
    model = cm_model(config)
    with torch.no_grad():  # give the expert non-zero weights, as after training
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    unmerged = copy.deepcopy(model)
    merged = model.merge_and_unload()
    torch.manual_seed(0)
    plain = UNet2DModel(**config, num_class_embeds=NUM_CLASSES + 1)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipes = {
        "plain UNet (no adapter)": ClassConditionalPipeline(plain, scheduler),
        "merged CM pipeline": ClassConditionalPipeline(merged, scheduler),
        "unmerged PEFT model": ClassConditionalPipeline(unmerged.get_base_model(), scheduler),
    }
    labels = [i % NUM_CLASSES for i in range(batch)]
    fns = {}
    for key, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        fns[key] = lambda pipe=pipe: pipe(
            class_labels=labels,
            num_inference_steps=steps,
            guidance_scale=1.5,
            generator=torch.manual_seed(0),
            output_type="pt",
        )
    medians = interleaved_medians(fns, repeats, warmup)
    base = medians["plain UNet (no adapter)"]
    print(f"\n### Sampling, {name}, batch {batch}, {steps} DDIM steps, guidance 1.5\n")
    print("| model | time (s) | ÷ plain UNet |")
    print("|---|---|---|")
    for key, seconds in medians.items():
        print(f"| {key} | {seconds:.3f} | {seconds / base:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="Batch size of every measurement.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed repetitions (median reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed repetitions first.")
    parser.add_argument("--quick", action="store_true", help="Small UNet only, 5 repeats.")
    parser.add_argument("--measure_step", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_step:  # child process of bench_training
        print(step_seconds(*args.measure_step, args.batch, args.repeats, args.warmup))
        return
    torch.set_num_threads(torch.get_num_threads())
    configs = {k: v for k, v in CONFIGS.items() if not args.quick or "small" in k}
    repeats = 5 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for name, config in configs.items():
        bench_training(name, args.batch, repeats, args.warmup)
        bench_inference(name, config, args.batch, repeats, args.warmup)


if __name__ == "__main__":
    main()
