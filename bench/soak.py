#!/usr/bin/env python
"""Long runs hold: a long train_unet_cm.py run keeps its memory and open files flat, and resuming it from its midpoint
checkpoint ends with the same weights.

    python bench/soak.py                         # 20,000 steps and a resumed half: about 25 min on one core
    python bench/soak.py --steps 2000            # a quick look

The demo recipe (CM + OC on the bundled digits, the 8 x 8 UNet) at batch 16, a checkpoint every 500 steps with
rotation (``--checkpoints_total_limit 2``). Every 1,000 steps the process's resident memory (VmRSS) and its open
file descriptors are sampled from /proc (Linux). The midpoint checkpoint is copied aside when it is written, a second
run resumes from the copy to the end, and every weight file of the two outputs is compared bit for bit. One thread,
so the floats do not depend on the machine's thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def resident_mib() -> float:
    """This process's resident memory (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight file of an output, checkpoints left out."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
        if not p.relative_to(folder).parts[0].startswith("checkpoint-")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000, help="Training steps (even; a multiple of 1,000).")
    parser.add_argument("--output_dir", default=None, help="Where the runs go (default: a temporary folder).")
    args = parser.parse_args()
    if args.steps % 1000 or args.steps < 2000:
        parser.error(f"--steps {args.steps}: allowed: a multiple of 1,000, at least 2,000")
    import torch

    torch.set_num_threads(1)
    import train_unet_cm
    from capman_peft.training.loop import TrainingCallbacks

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="capman-soak-"))
    middle = args.steps // 2
    samples: list[dict[str, float]] = []
    start = time.perf_counter()

    def sample(step: int, values: dict[str, float]) -> None:
        if step % 1000 == 0:
            fds = len(os.listdir("/proc/self/fd"))
            samples.append({"step": step, "rss_mib": round(resident_mib(), 1), "open_fds": fds})
            print(
                f"step {step}: RSS {samples[-1]['rss_mib']} MiB, {fds} open files, {time.perf_counter() - start:.0f} s"
            )

    def keep_middle(step: int, path: Path) -> None:
        if step == middle:
            shutil.copytree(path, work / f"kept-checkpoint-{middle}")

    common = [
        "--config", str(ROOT / "configs/demo_digits.yaml"), "--train_batch_size", "16", "--max_train_steps",
        str(args.steps), "--checkpointing_steps", "500", "--checkpoints_total_limit", "2", "--report_to", "none",
    ]  # fmt: skip
    callbacks = TrainingCallbacks(on_step_end=sample, on_checkpoint=keep_middle)
    train_unet_cm.main([*common, "--output_dir", str(work / "straight")], callbacks=callbacks)
    checkpoints = sorted(p.name for p in (work / "straight").glob("checkpoint-*"))
    train_unet_cm.main(
        [
            *common,
            "--output_dir",
            str(work / "resumed"),
            "--resume_from_checkpoint",
            str(work / f"kept-checkpoint-{middle}"),
        ]
    )
    straight, resumed = weight_hashes(work / "straight"), weight_hashes(work / "resumed")
    same = bool(straight) and straight == resumed
    first, last = samples[0], samples[-1]
    report = {
        "steps": args.steps,
        "samples": samples,
        "rss_growth_mib": round(last["rss_mib"] - first["rss_mib"], 1),
        "fd_growth": last["open_fds"] - first["open_fds"],
        "checkpoints_left": checkpoints,
        "weight_files_compared": len(straight),
        "resumed_equals_straight": same,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    (work / "soak.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    print(f"written: {work / 'soak.json'}")


if __name__ == "__main__":
    main()
