#!/usr/bin/env python
"""What CM costs a Stable Diffusion user: train_text_to_image_cm.py step time with CM ÷ without, in one run.

    python bench/speed_text_to_image.py                      # SD: 3 rounds x 3 variants, about 5 min on 2 CPU cores
    git -C <diffusers clone> show HEAD:examples/text_to_image/train_text_to_image_lora_sdxl.py > /tmp/peer_sdxl.py
    python bench/speed_text_to_image.py --family sdxl --peer_script /tmp/peer_sdxl.py    # SDXL, with diffusers' own

The tiny Stable Diffusion (or SDXL) of `capman_peft.testing` (its VAE halves the image side: 64 px images give
32 x 32 latents, the latent size of SD at 256 px), 256 random 64 px images of 10 classes, batch 8, LoRA rank 16 +
expert rank 4 on the attention projections, fp32. SD reads class folders and trains on the class prompts; SDXL reads
the same images as a ``metadata.jsonl`` folder with a caption per image (the format diffusers' SDXL LoRA script
reads), and both scripts encode the captions and the images every step. ``--peer_script`` adds diffusers' own LoRA
script for that family, run unmodified (keep it outside this repository) on the same model and data.

Each variant is its own process (one model in memory, as in a real run), the variants alternate over `--rounds`
rounds, and each process reports the median time between optimizer steps 6-30 (the first steps warm up caches),
timed by the same optimizer-step hook in every variant, the peer's included.
"""

from __future__ import annotations

import argparse
import json
import platform
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE = "CM off (plain LoRA, rank 16)"
VARIANTS = {
    BASELINE: ["--no_capacity_manipulation"],
    "CM on, general pass on 25% of the batch (default)": [],
    "CM on, general pass on the whole batch": ["--cm_general_fraction", "1"],
}
PEER = "diffusers' {script} (LoRA rank 16), unmodified"
COUNTS = [64, 48, 36, 28, 22, 18, 14, 11, 8, 7]  # 256 images, imbalance ratio ~9
STEPS, TIMED_FROM = 30, 6
SHARED = [
    "--resolution", "64", "--center_crop", "--train_batch_size", "8", "--max_train_steps", str(STEPS), "--rank", "16",
    "--checkpointing_steps", "1000",
]  # fmt: skip


def make_assets(root: Path, family: str) -> tuple[Path, Path]:
    """The tiny pipeline and 256 random 64 px images: class folders (SD) or a captioned metadata.jsonl folder (SDXL)."""
    import numpy as np
    from PIL import Image

    from capman_peft.testing import build_tiny_sd, build_tiny_sdxl

    rng = np.random.default_rng(0)
    data = root / "data"
    lines = []
    for c, n in enumerate(COUNTS):
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            if family == "sd":
                (data / f"class{c}").mkdir(parents=True, exist_ok=True)
                image.save(data / f"class{c}" / f"{i}.png")
            else:
                data.mkdir(parents=True, exist_ok=True)
                image.save(data / f"{c}-{i}.png")
                row = {"file_name": f"{c}-{i}.png", "text": f"painting {i} of class {c}", "class": c}
                lines.append(json.dumps(row))
    if lines:
        (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return (build_tiny_sd if family == "sd" else build_tiny_sdxl)(root), data


def step_times() -> list[float]:
    """Timestamps of every optimizer step of this process, from a global post-step hook (no script is changed)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    return stamps


def measure(base: Path, data: Path, family: str, variant: str, peer_script: str | None, out: Path) -> float:
    """Median seconds between optimizer steps TIMED_FROM..STEPS of one training run in this process."""
    stamps = step_times()
    common = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), *SHARED]
    common += ["--cache_dir", str(out.parent / "hf"), "--output_dir", str(out)]
    if variant.startswith("diffusers"):
        sys.argv = [peer_script, *common, "--caption_column", "text", "--report_to", "tensorboard"]
        runpy.run_path(peer_script, run_name="__main__")
    else:
        import train_text_to_image_cm

        captions = ["--caption_column", "text", "--class_column", "class"] if family == "sdxl" else []
        train_text_to_image_cm.main(
            [
                *common, *captions, "--expert_rank", "4", "--validation_epochs", "0", "--num_inference_steps", "2",
                "--num_validation_images", "1", "--report_to", "none", *VARIANTS[variant],
            ]
        )  # fmt: skip
    timed = stamps[TIMED_FROM - 1 : STEPS]
    return statistics.median(b - a for a, b in zip(timed, timed[1:], strict=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd", "sdxl"], default="sd", help="The tiny pipeline's family.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; every variant runs once per round.")
    parser.add_argument(
        "--peer_script",
        default=None,
        help="diffusers' LoRA training script for the family (train_text_to_image_lora_sdxl.py for sdxl), run "
        "unmodified beside ours; get it from a diffusers clone, outside this repository.",
    )
    parser.add_argument("--child", nargs=4, metavar=("BASE", "DATA", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base, data, variant, out = args.child
        print(json.dumps(measure(Path(base), Path(data), args.family, variant, args.peer_script, Path(out))))
        return
    import torch

    variants = list(VARIANTS)
    if args.peer_script:
        if not Path(args.peer_script).is_file():
            parser.error(f"--peer_script {args.peer_script}: no such file")
        variants.insert(0, PEER.format(script=Path(args.peer_script).name))
    work = Path(tempfile.mkdtemp(prefix="capman-speed-"))
    base, data = make_assets(work / "assets", args.family)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for k, name in enumerate(variants):
            out = work / f"run-{round_}-{k}" / "out"
            cmd = [sys.executable, __file__, "--family", args.family, "--child", str(base), str(data), name, str(out)]
            cmd += ["--peer_script", args.peer_script] if args.peer_script else []
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
            if result.returncode:
                sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
            seconds[name].append(float(result.stdout.strip().splitlines()[-1]))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    baseline = medians[BASELINE]
    model = "SD, class folders and class prompts" if args.family == "sd" else "SDXL, a caption per image"
    print(
        f"\n### train_text_to_image_cm.py, tiny {model}, 64 px images (32 x 32 latents), batch 8, fp32; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
        f"{args.rounds} rounds\n"
    )
    print("| run | s/step (median of steps 6-30, median of rounds) | ÷ CM off |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.4f} | {value / baseline:.2f} |")


if __name__ == "__main__":
    main()
