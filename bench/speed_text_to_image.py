#!/usr/bin/env python
"""What CM costs a diffusers user: train_text_to_image_cm.py step time with CM ÷ without, in one run.

    python bench/speed_text_to_image.py                      # SD: 3 rounds x 3 variants, about 5 min on 2 CPU cores
    git -C <diffusers clone> show HEAD:examples/text_to_image/train_text_to_image_lora_sdxl.py > /tmp/peer_sdxl.py
    python bench/speed_text_to_image.py --family sdxl --peer_script /tmp/peer_sdxl.py    # SDXL, with diffusers' own
    git -C <diffusers clone> show HEAD:examples/dreambooth/train_dreambooth_lora_flux.py > /tmp/peer_flux.py
    python bench/speed_text_to_image.py --family flux --peer_script /tmp/peer_flux.py    # Flux (sd3 likewise)

The tiny pipelines of `capman_peft.testing`, 256 random images of 10 classes, batch 8, LoRA rank 16 + expert rank 4
on the family's default targets, fp32. The UNet families train on 64 px images (32 x 32 latents, the latent size of
SD at 256 px); the transformers on 256 image tokens (SD3: 32 px, 16 x 16 latents, one token per latent pixel; Flux:
64 px, 32 x 32 latents packed into 2 x 2 patches). SD reads class folders and trains on the class prompts; the other
families read the same images as a ``metadata.jsonl`` folder with a caption per image (the format diffusers' LoRA
scripts read), and every script encodes the captions and the images every step. ``--peer_script`` adds diffusers'
own LoRA script for that family (train_text_to_image_lora_sdxl.py; train_dreambooth_lora_sd3.py and
train_dreambooth_lora_flux.py, given the folder as ``--dataset_name`` with its caption column), run unmodified (keep
it outside this repository) on the same model and data; the DreamBooth scripts run twice, with their adapter (no
dropout) and with ours (``--lora_dropout 0.1``), and we run once with theirs. The run-to-run spread of these tiny
models is wide: ``--cm_off_only --rounds 7`` settles the ratio to the peer.

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
# Transformer families only: experts on the later half of the blocks, the earlier half run once for theta and theta^g.
SHARED_PREFIX = "CM on, 25%, shared prefix (experts in the later half of the blocks)"
# With a peer: our plain LoRA with the peer's adapter (diffusers' LoRA scripts have no adapter dropout; ours is 0.1).
PEER_ADAPTER = "CM off, LoRA dropout 0 (the peer's adapter)"
VARIANTS = {
    PEER_ADAPTER: ["--no_capacity_manipulation", "--lora_dropout", "0"],
    BASELINE: ["--no_capacity_manipulation"],
    "CM on, general pass on 25% of the batch (default)": [],
    "CM on, general pass on the whole batch": ["--cm_general_fraction", "1"],
    SHARED_PREFIX: ["--cm_forward", "shared_prefix"],
}
PEER = "diffusers' {script} (LoRA rank 16), unmodified"
# The DreamBooth scripts (SD3, Flux) take --lora_dropout: the peer with our default adapter, dropout 0.1.
PEER_DROPOUT = "diffusers' {script} --lora_dropout 0.1 (our adapter), unmodified"
COUNTS = [64, 48, 36, 28, 22, 18, 14, 11, 8, 7]  # 256 images, imbalance ratio ~9
STEPS, TIMED_FROM = 30, 6
SHARED = [
    "--center_crop", "--train_batch_size", "8", "--max_train_steps", str(STEPS), "--rank", "16",
    "--checkpointing_steps", "1000",
]  # fmt: skip
RESOLUTION = {"sd": 64, "sdxl": 64, "sd3": 32, "flux": 64}
MODEL = {
    "sd": "SD, class folders and class prompts, 64 px images (32 x 32 latents)",
    "sdxl": "SDXL, a caption per image, 64 px images (32 x 32 latents)",
    "sd3": "SD3, a caption per image, 32 px images (256 image tokens)",
    "flux": "Flux, a caption per image, 64 px images (256 image tokens)",
}


def make_assets(root: Path, family: str) -> tuple[Path, Path]:
    """The tiny pipeline and 256 random images: class folders (SD) or a captioned metadata.jsonl folder (the others)."""
    import numpy as np
    from PIL import Image

    from capman_peft import testing

    rng = np.random.default_rng(0)
    data = root / "data"
    lines = []
    for c, n in enumerate(COUNTS):
        for i in range(n):
            side = RESOLUTION[family]
            image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
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
    return getattr(testing, f"build_tiny_{family}")(root), data


def step_times() -> list[float]:
    """Timestamps of every optimizer step of this process, from a global post-step hook (no script is changed)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    return stamps


def measure(base: Path, data: Path, family: str, variant: str, peer_script: str | None, out: Path) -> float:
    """Median seconds between optimizer steps TIMED_FROM..STEPS of one training run in this process."""
    stamps = step_times()
    common = ["--pretrained_model_name_or_path", str(base), "--resolution", str(RESOLUTION[family]), *SHARED]
    common += ["--cache_dir", str(out.parent / "hf"), "--output_dir", str(out)]
    if variant.startswith("diffusers"):
        if family in ("sd3", "flux"):  # the DreamBooth scripts read a captioned dataset through --dataset_name
            data_flags = ["--dataset_name", str(data), "--image_column", "image", "--instance_prompt", "a painting"]
            data_flags += ["--lora_dropout", "0.1"] if "--lora_dropout" in variant else []
        else:
            data_flags = ["--train_data_dir", str(data)]
        sys.argv = [peer_script, *common, *data_flags, "--caption_column", "text", "--report_to", "tensorboard"]
        runpy.run_path(peer_script, run_name="__main__")
    else:
        import train_text_to_image_cm

        captions = ["--caption_column", "text", "--class_column", "class"] if family != "sd" else []
        train_text_to_image_cm.main(
            [
                *common, "--train_data_dir", str(data), *captions, "--expert_rank", "4", "--validation_epochs", "0",
                "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none",
                *VARIANTS[variant],
            ]
        )  # fmt: skip
    timed = stamps[TIMED_FROM - 1 : STEPS]
    return statistics.median(b - a for a, b in zip(timed, timed[1:], strict=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(RESOLUTION), default="sd", help="The tiny pipeline's family.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; every variant runs once per round.")
    parser.add_argument(
        "--peer_script",
        default=None,
        help="diffusers' LoRA training script for the family (train_text_to_image_lora_sdxl.py for sdxl, "
        "train_dreambooth_lora_sd3.py / _flux.py for sd3 / flux), run unmodified beside ours; get it from a diffusers "
        "clone, outside this repository.",
    )
    parser.add_argument(
        "--cm_off_only",
        action="store_true",
        help="Only the CM-off rows (and the peer): the ratio to the peer, which needs more rounds to settle.",
    )
    parser.add_argument("--child", nargs=4, metavar=("BASE", "DATA", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base, data, variant, out = args.child
        print(json.dumps(measure(Path(base), Path(data), args.family, variant, args.peer_script, Path(out))))
        return
    import torch

    wanted = {SHARED_PREFIX: args.family in ("sd3", "flux"), PEER_ADAPTER: bool(args.peer_script)}
    variants = [name for name in VARIANTS if wanted.get(name, True)]
    if args.cm_off_only:
        variants = [name for name in variants if name in (BASELINE, PEER_ADAPTER)]
    if args.peer_script:
        if not Path(args.peer_script).is_file():
            parser.error(f"--peer_script {args.peer_script}: no such file")
        script = Path(args.peer_script).name
        peers = [PEER, PEER_DROPOUT] if args.family in ("sd3", "flux") else [PEER]
        variants[:0] = [peer.format(script=script) for peer in peers]
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
    print(
        f"\n### train_text_to_image_cm.py, tiny {MODEL[args.family]}, batch 8, fp32; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
        f"{args.rounds} rounds\n"
    )
    print("| run | s/step (median of steps 6-30, median of rounds) | rounds' range | ÷ CM off |")
    print("|---|---|---|---|")
    for name, value in medians.items():
        spread = f"{min(seconds[name]):.4f}-{max(seconds[name]):.4f}"
        print(f"| {name} | {value:.4f} | {spread} | {value / baseline:.2f} |")


if __name__ == "__main__":
    main()
