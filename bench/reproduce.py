#!/usr/bin/env python
"""The CM study on CPU: does CM improve the minority classes at the same budget as its base objective?

    python bench/reproduce.py                    # every row, 5 seeds, 2 runs at a time (about 2 h on 2 cores)
    python bench/reproduce.py --methods DDPM "CM (+DDPM)" --seeds 0 1 --jobs 1

Protocol, fixed before any result was seen (README "Does CM help?"):

* Testbed: scikit-learn's digits at 8x8, imbalance ratio 100 (178 ... 1 images per class, 435 in all), a
  capacity-bound UNet (16/32 channels, dropout 0.1): `bench/testbed_digits_ir100.yaml`. Every row trains 3000 steps
  at batch 64 with the same optimizer, EMA, label dropout and seeds 0-4; only the objective and CM flags differ.
* Evaluation: 100 generated images per class (DDIM 25 steps, guidance 1.5, evaluation seed 0), classifier-feature FID
  per Many/Medium/Few split and overall against the balanced real digits, and the digits classifier's accuracy on the
  generated images. CM rows add theta^g (the same model, expert off). Two floors show what the data allows: real
  digits (100 per class drawn from the reference), and a perfect memoriser of the imbalanced training set (100 per
  class drawn with replacement from that class's training images).
* Reported: mean ± std over seeds; a difference inside the spread is no difference.

Each run writes ``<output_dir>/runs/<row>-seed<k>.json``; an existing result is reused, so an interrupted study
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TESTBED = ROOT / "bench" / "testbed_digits_ir100.yaml"
SEEDS = [0, 1, 2, 3, 4]
IMAGES_PER_CLASS = 100
EVAL = dict(steps=25, guidance_scale=1.5, seed=0)

# row -> training flags on top of the testbed recipe
METHODS = {
    "DDPM": ["--no_capacity_manipulation", "--objective", "ddpm"],
    "OC": ["--no_capacity_manipulation", "--objective", "oc"],
    "CM (+DDPM)": ["--objective", "ddpm"],
    "CM (+OC)": ["--objective", "oc"],
    "CM (+DDPM), general pass on 25% of the batch": ["--objective", "ddpm", "--cm_general_fraction", "0.25"],
    # the first version's default: Eq. 2 as written with w_div = 0.2 (unbounded below, see DESIGN.md §2)
    "CM (+OC), old default: paper form, w_div 0.2": [
        "--objective", "oc", "--cm_diversity", "paper", "--cm_diversity_weight", "0.2", "--allow_unbounded_cm",
    ],
    # the paper's Eq. 2-3 taken literally (w_div = 1)
    "CM (+OC), paper form, w_div 1": [
        "--objective", "oc", "--cm_diversity", "paper", "--cm_diversity_weight", "1", "--allow_unbounded_cm",
    ],
}  # fmt: skip
COLUMNS = [
    ("many", "Many FID"),
    ("medium", "Medium FID"),
    ("few", "Few FID"),
    ("overall", "Overall FID"),
    ("accuracy", "accuracy"),
    ("few accuracy", "Few accuracy"),
]
# A total loss below this means the CM term has taken over (L_base is a positive mean squared error of ~0.03).
DIVERGED_BELOW = -1.0


def slug(name: str) -> str:
    return re.sub("[^a-z0-9]+", "-", name.lower()).strip("-")


def scores(result: dict) -> dict[str, float]:
    row = {split: result["splits"][split]["fid"] for split in ("many", "medium", "few")}
    row["overall"] = result["overall"]["fid"]
    row["accuracy"] = result["classifier_accuracy"]["overall"]
    row["few accuracy"] = result["classifier_accuracy"]["splits"]["few"]
    return row


def train_and_evaluate(method: str, seed: int, steps: int, run_dir: Path) -> dict:
    """One run in this process: train with the testbed recipe, watch the loss, evaluate theta (and theta^g)."""
    import train_unet_cm
    from capman_peft.evaluation import evaluate_pipeline
    from capman_peft.objective import NonFiniteLossError
    from capman_peft.training import loop

    losses: list[float] = []
    finish_step = loop.finish_step

    def recording(*args, **kwargs):
        values = finish_step(*args, **kwargs)
        losses.append(values["loss"])
        return values

    loop.finish_step = recording
    flags = ["--config", str(TESTBED), "--max_train_steps", str(steps), "--seed", str(seed)]
    flags += ["--output_dir", str(run_dir), "--overwrite_output_dir", "--report_to", "none", *METHODS[method]]
    record: dict = {"method": method, "seed": seed, "steps": steps}
    start = time.time()
    try:
        train_unet_cm.main(flags)
    except NonFiniteLossError as err:
        record["non_finite"] = str(err)
    record["train_seconds"] = round(time.time() - start, 1)
    record["final_loss"] = losses[-1] if losses else None
    record["diverged_at_step"] = next((i + 1 for i, v in enumerate(losses) if v < DIVERGED_BELOW), None)
    if "non_finite" in record:
        record["diverged_at_step"] = record["diverged_at_step"] or len(losses) + 1
        return record
    summary = json.loads((run_dir / "training_summary.json").read_text())
    record["expert_use"] = summary.get("expert_use")
    for expert in ("on", "off") if (run_dir / "adapter").exists() else ("on",):
        result = evaluate_pipeline(
            str(run_dir), "imb-digits", num_images_per_class=IMAGES_PER_CLASS, metrics=("fid",), expert=expert,
            progress=False, **EVAL,
        )  # fmt: skip
        record["theta" if expert == "on" else "theta_g"] = scores(result)
    return record


def floors(seed: int = 0) -> dict[str, dict[str, float]]:
    """The real-data floor and the perfect-memoriser floor, measured like a generated set."""
    import numpy as np
    import torch

    from capman_peft.data import load_imbalanced_dataset, load_reference_dataset
    from capman_peft.evaluation import (
        DIGITS_CLASSIFIER,
        classifier_accuracy,
        digits_classifier_file,
        load_digits_classifier,
        measure_fidelity,
        to_uint8,
    )

    reference = load_reference_dataset("imb-digits", 8)
    training = load_imbalanced_dataset("imb-digits", imbalance_ratio=100, resolution=8, center_crop=True)
    weights = str(digits_classifier_file())
    rng = np.random.default_rng(seed)
    out = {}
    for name, data, replace in (("real digits", reference, False), ("memoriser of the training set", training, True)):
        labels = np.asarray(data.labels)
        picks = [rng.choice(np.flatnonzero(labels == c), IMAGES_PER_CLASS, replace=replace) for c in range(10)]
        index = np.concatenate(picks)
        images = torch.stack([to_uint8(data[int(i)]["pixel_values"]) for i in index])
        generated_labels = torch.as_tensor(labels[index])
        result = measure_fidelity(
            images, generated_labels, reference, reference.labels, 10, metrics=("fid",),
            feature_extractor=DIGITS_CLASSIFIER, feature_extractor_weights_path=weights,
        )  # fmt: skip
        accuracy = classifier_accuracy(load_digits_classifier(weights), images, generated_labels, 10)
        out[name] = scores({**result, "classifier_accuracy": accuracy})
    return out


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(records: list[dict], floor_rows: dict, steps: int, seeds: list[int]) -> str:
    header = [name for _, name in COLUMNS] + ["Few/Many expert use", "seconds per run"]
    lines = [
        f"Digits 8x8, IR 100, tiny UNet, {steps} steps, batch 64, seeds {seeds}, {IMAGES_PER_CLASS} generated images "
        "per class; digits-classifier FID (lower is better), classifier accuracy on generated images (higher is "
        "better); mean ± std over seeds.",
        "",
        "| row | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for method in METHODS:
        runs = [r for r in records if r["method"] == method]
        if not runs:
            continue
        diverged = [r["diverged_at_step"] for r in runs if r.get("diverged_at_step")]
        ratios = [r["expert_use"]["few_over_many"] for r in runs if r.get("expert_use")]
        seconds = [r["train_seconds"] for r in runs]
        for key, label in (("theta", method), ("theta_g", f"{method}, θ^g: expert off")):
            done = [r[key] for r in runs if key in r]
            if key == "theta_g" and not done:
                continue
            cells = [fmt([d[k] for d in done]) for k, _ in COLUMNS]
            extra = [fmt(ratios) if key == "theta" and ratios else "–", fmt(seconds) if key == "theta" else "–"]
            note = f" (loss below {DIVERGED_BELOW:g} at step {fmt(diverged)} in {len(diverged)}/{len(runs)} runs)"
            lines.append(
                f"| {label}{note if diverged and key == 'theta' else ''} | " + " | ".join(cells + extra) + " |"
            )
    for name, row in floor_rows.items():
        lines.append(f"| floor: {name} | " + " | ".join(f"{row[k]:.2f}" for k, _ in COLUMNS) + " | – | – |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="Training steps per run (protocol: 3000).")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="Seeds (protocol: 0-4).")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="Rows to run.")
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time, one CPU thread each.")
    parser.add_argument("--output_dir", default="bench_output/reproduce", help="Where runs and results go.")
    parser.add_argument("--run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    if args.run:
        method, seed = args.run[0], int(args.run[1])
        run_dir = out / "models" / f"{slug(method)}-seed{seed}"
        record = train_and_evaluate(method, seed, args.steps, run_dir)
        (out / "runs" / f"{slug(method)}-seed{seed}.json").write_text(json.dumps(record, indent=1))
        return

    (out / "runs").mkdir(parents=True, exist_ok=True)
    todo = [(m, s) for s in args.seeds for m in args.methods if not (out / "runs" / f"{slug(m)}-seed{s}.json").exists()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()

    def child(job: tuple[str, int]) -> None:
        method, seed = job
        log = out / "runs" / f"{slug(method)}-seed{seed}.log"
        cmd = [sys.executable, __file__, "--run", method, str(seed), "--steps", str(args.steps)]
        cmd += ["--output_dir", str(out)]
        with open(log, "w") as handle:
            # from the repository root: recipes name their model config relative to it
            done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        status = "ok" if done.returncode == 0 else f"FAILED (see {log})"
        print(f"[{time.time() - start:.0f}s] {method} seed {seed}: {status}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(child, todo))
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    records = [r for r in records if r["method"] in args.methods and r["seed"] in args.seeds]
    result = table(records, floors(), args.steps, args.seeds)
    print("\n" + result)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    (out / "results.md").write_text(result + "\n")


if __name__ == "__main__":
    main()
