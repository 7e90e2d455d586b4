#!/usr/bin/env python
"""Small-scale reproduction on CPU: DDPM, OC, CBDM and CM (+OC) on the bundled digits, same steps/batch/model/seeds.

    python bench/reproduce.py            # 1500 steps per run, 3 seeds (about 35 min on 2 cores)
    python bench/reproduce.py --quick    # 600 steps per run, 3 seeds

Each run is `train_unet_cm.py` with the demo recipe (8x8 digits, IR 10, small UNet); only the objective and CM switch
differ. Every trained pipeline is evaluated with `capman-eval`'s function on a balanced generated set against the
balanced real digits: classifier-feature FID overall and per Many/Medium/Few split, and the accuracy of a digit
classifier on the generated images (does class c look like class c). For CM the theta^g row (expert off) is added.
The table reports mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_unet_cm  # noqa: E402
from capman_peft.evaluation import evaluate_pipeline  # noqa: E402

METHODS = {
    "DDPM": ["--no_capacity_manipulation", "--objective", "ddpm"],
    "CBDM": ["--no_capacity_manipulation", "--objective", "cbdm"],
    "OC": ["--no_capacity_manipulation", "--objective", "oc"],
    "CM (+OC)": ["--capacity_manipulation", "--objective", "oc"],
    "CM (+DDPM)": ["--capacity_manipulation", "--objective", "ddpm"],
    # the strongest diversity the stability check allows here (max lambda*c_y = 0.76 < 1 at IR 10)
    "CM (+OC, w_div 0.4)": ["--capacity_manipulation", "--objective", "oc", "--cm_diversity_weight", "0.4"],
}
COLUMNS = [("many", "Many FID"), ("medium", "Medium FID"), ("few", "Few FID"), ("overall", "Overall FID")]


def evaluate(path: Path, expert: str, images_per_class: int) -> dict[str, float]:
    result = evaluate_pipeline(
        str(path),
        "imb-digits",
        num_images_per_class=images_per_class,
        metrics=("fid",),
        steps=25,
        guidance_scale=1.5,
        expert=expert,
        seed=0,
        progress=False,
    )
    row = {split: result["splits"][split]["fid"] for split in ("many", "medium", "few")}
    row["overall"] = result["overall"]["fid"]
    accuracy = result["classifier_accuracy"]
    row["accuracy"] = accuracy["overall"]
    row["few accuracy"] = accuracy["splits"]["few"]
    return row


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="Training steps per run.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds (one run per method each).")
    parser.add_argument("--images_per_class", type=int, default=100, help="Generated images per class.")
    parser.add_argument("--output_dir", default="bench_output/reproduce", help="Where runs and results go.")
    parser.add_argument("--quick", action="store_true", help="600 steps per run.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="Runs to make.")
    args = parser.parse_args()
    steps = 600 if args.quick else args.steps
    out = Path(args.output_dir)
    rows: dict[str, list[dict[str, float]]] = {}
    start = time.time()
    for seed in args.seeds:
        for method in args.methods:
            flags = METHODS[method]
            run_dir = out / f"{re.sub('[^a-z]+', '-', method.lower()).strip('-')}-seed{seed}"
            train_unet_cm.main(
                [
                    "--config",
                    str(ROOT / "configs/demo_digits.yaml"),
                    "--max_train_steps",
                    str(steps),
                    "--seed",
                    str(seed),
                    "--output_dir",
                    str(run_dir),
                    "--checkpointing_steps",
                    str(10 * steps),
                    "--report_to",
                    "none",
                    *flags,
                ]
            )
            rows.setdefault(method, []).append(evaluate(run_dir, "on", args.images_per_class))
            if method.startswith("CM"):
                general = f"{method[:-1]}, θ^g: expert off)"
                rows.setdefault(general, []).append(evaluate(run_dir, "off", args.images_per_class))
            print(f"[{time.time() - start:.0f}s] {method} seed {seed}: {rows[method][-1]}", flush=True)

    header = [name for _, name in COLUMNS] + ["accuracy", "Few accuracy"]
    lines = [
        f"Digits (8x8, IR 10, 10 classes), {steps} steps, batch 64, seeds {args.seeds}, "
        f"{args.images_per_class} generated images per class; classifier-feature FID (lower is better), "
        "classifier accuracy on generated images (higher is better).",
        "",
        "| method | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    keys = [key for key, _ in COLUMNS] + ["accuracy", "few accuracy"]
    for method, results in rows.items():
        lines.append(f"| {method} | " + " | ".join(fmt([r[k] for r in results]) for k in keys) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
