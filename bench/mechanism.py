#!/usr/bin/env python
"""Why θ loses what W^g gives up: the push's effect over training, for a study row and its base.

One run per (row, seed) is trained in stages with ``--resume_from_checkpoint latest`` (resume is exact, so the staged
run is the straight one at the same thread count) and, after each stage, its exported (EMA) model is measured:

* θ's and θ^g's held-out denoising loss per split (``capman-analyze heldout``: images training never saw);
* θ's and θ^g's loss on training images per split, from the expert-use report: how much of a class's fit sits in
  the expert E (θ^g loses it) rather than in W^g;
* for the hinge forms, the pushed rows still inside the margin (``capman-analyze push``, 16 training images × 10
  timesteps per pushed class), with the run's own form and margin.

    python bench/mechanism.py --testbed mnist16 --methods DDPM "CM (+DDPM), relative hinge" --seeds 0
    python bench/mechanism.py --testbed digits --stages 100 200 --seeds 100     # a quick look at a pilot seed

Writes ``<output_dir>/<row>-seed<k>.json`` (one entry per stage) and prints one table per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reproduce import METHODS, STEPS, TESTBEDS, TEXT_TO_IMAGE, method_flags, slug, testbed_setup  # noqa: E402
from capman_peft.objective import LOWER_MARGIN_FORMS  # noqa: E402

SPLITS = ("many", "medium", "few")


def measure(run_dir: Path, step: int) -> dict:
    """The stage's numbers from the exported model in `run_dir`."""
    from capman_peft.analysis import heldout_loss, push_gradient

    summary = json.loads((run_dir / "training_summary.json").read_text())
    heldout = heldout_loss(run_dir)
    stage = {"step": step, "heldout": {s: heldout["splits"][s] for s in SPLITS}}
    use = summary.get("expert_use")
    if use:
        stage["train"] = use["splits"]
        stage["few_over_many"] = use["few_over_many"]
    form = summary["args"].get("cm_form")
    if use and form in LOWER_MARGIN_FORMS:
        push = push_gradient(run_dir, images_per_class=16, timesteps=10)
        total = sum(min(16, summary["class_counts"][c]) * 10 for c in push["pushed_classes"])
        stage["pushed_rows_inside_margin"] = [push["active_rows"], total]
    return stage


def staged_run(method: str, seed: int, testbed: str, stages: list[int], out: Path) -> list[dict]:
    import train_unet_cm

    extra_flags, _ = testbed_setup(testbed, out)
    run_dir = out / "models" / f"{slug(method)}-seed{seed}"
    flags = ["--config", str(TESTBEDS[testbed]), "--seed", str(seed), *extra_flags, "--report_to", "none"]
    flags += ["--output_dir", str(run_dir), "--checkpointing_steps", str(stages[0]), "--checkpoints_total_limit", "1"]
    flags += method_flags(method, stages[-1])
    records = []
    for index, step in enumerate(stages):
        resume = ["--resume_from_checkpoint", "latest"] if index else ["--overwrite_output_dir"]
        train_unet_cm.main([*flags, "--max_train_steps", str(step), *resume])
        records.append(measure(run_dir, step))
        print(json.dumps(records[-1]), flush=True)
    return records


def table(method: str, seed: int, records: list[dict]) -> str:
    lines = [
        f"{method}, seed {seed}:",
        "| step | θ held-out Many / Medium / Few | θ^g held-out Few | θ^g / θ train loss Few | pushed rows inside "
        "the margin |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        held = " / ".join(f"{r['heldout'][s]['loss_full']:.4f}" for s in SPLITS)
        general = r["heldout"]["few"].get("loss_general")
        train = r.get("train", {}).get("few")
        ratio = f"{train['loss_general'] / train['loss_full']:.2f}" if train else "–"
        inside = r.get("pushed_rows_inside_margin")
        lines.append(
            f"| {r['step']} | {held} | {general:.4f} | {ratio} | {f'{inside[0]} of {inside[1]}' if inside else '–'} |"
            if general is not None
            else f"| {r['step']} | {held} | – | – | – |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    unet_testbeds = [name for name in TESTBEDS if name not in TEXT_TO_IMAGE]  # staged through train_unet_cm.py
    parser.add_argument("--testbed", choices=unet_testbeds, default="mnist16", help="The study's testbed.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["DDPM", "CM (+DDPM), relative hinge"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds (the study's own: 0-4).")
    parser.add_argument(
        "--stages", type=int, nargs="+", default=None, help="Steps after which to measure (default: 1/8, 1/4, 1/2, 1)."
    )
    parser.add_argument("--output_dir", default="bench_output/mechanism", help="Where runs and records go.")
    args = parser.parse_args()
    steps = STEPS[args.testbed]
    stages = sorted(args.stages or [steps // 8, steps // 4, steps // 2, steps])
    if any(step % stages[0] for step in stages):
        parser.error(f"--stages {stages}: each must be a multiple of the first (the checkpoint interval)")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        for seed in args.seeds:
            records = staged_run(method, seed, args.testbed, stages, out)
            (out / f"{slug(method)}-seed{seed}.json").write_text(json.dumps(records, indent=1))
            print("\n" + table(method, seed, records) + "\n", flush=True)


if __name__ == "__main__":
    main()
