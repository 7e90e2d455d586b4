#!/usr/bin/env python
"""CM for long-tailed classification on CPU (docs/study.md, "CM for classification"): CE, LDAM-DRW and logit
adjustment, each with and without CM, and three ablations of CM on logit adjustment, on testbed 3's MNIST digits.

    python bench/classification.py --output_dir D            # every row, seeds 0-4, one run at a time
    python bench/classification.py --output_dir D --rows CE "CE +CM" --seeds 0 1

Protocol, fixed before any run (docs/study.md): the 16-px MNIST digits of bench/mnist16.py at imbalance ratio 100
(400 ... 4 per class, 988 images), judged on the 100 per digit it keeps apart; the small CNN, 50 epochs, batch
128, SGD 0.1 with a cosine rate, weight decay 5e-4, no augmentation; seeds 0-4 (initialisation and batch order,
paired across rows). CM as train_classifier_cm.py ships it (the relative form on the class probabilities, lambda 1,
an expert of rank ratio 0.1 in every convolution). Each run's metrics.json goes to D/runs/<row>-seed<k>/ and is
reused when there; the table gives mean ± std, and each +CM row is judged against its base by the study's tests
(bench/reproduce.py: worse) on overall and Few accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from reproduce import SEEDS, slug, worse  # noqa: E402

TESTBED = ["--imbalance_ratio", "100", "--resolution", "16", "--classifier", "small_cnn", "--epochs", "50"]
TESTBED += ["--train_batch_size", "128", "--learning_rate", "0.1", "--weight_decay", "5e-4"]
CM = ["--capacity_manipulation"]
# row -> (its flags, the row it is judged against)
ROWS = {
    "CE": (["--loss", "ce"], None),
    "CE +CM": (["--loss", "ce", *CM], "CE"),
    "LDAM-DRW": (["--loss", "ldam_drw"], None),
    "LDAM-DRW +CM": (["--loss", "ldam_drw", *CM], "LDAM-DRW"),
    "LA": (["--loss", "logit_adjustment"], None),
    "LA +CM": (["--loss", "logit_adjustment", *CM], "LA"),
    "LA +CM, experts in the last convolution only": (
        ["--loss", "logit_adjustment", *CM, "--expert_layers", "last"],
        "LA",
    ),
    "LA +CM, expert rank ratio 0.25": (["--loss", "logit_adjustment", *CM, "--expert_rank_ratio", "0.25"], "LA"),
    "LA +CM, distance on logits (hinge_general, margin 1)": (
        ["--loss", "logit_adjustment", *CM, "--cm_distance", "logits", "--cm_form", "hinge_general"]
        + ["--cm_margin", "1"],
        "LA",
    ),
}
COLUMNS = {"accuracy": "accuracy", "many_accuracy": "Many", "medium_accuracy": "Medium", "few_accuracy": "Few"}
JUDGED = {"accuracy": "accuracy", "few_accuracy": "Few accuracy"}


def cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Runs go to <output_dir>/runs; the testbed beside them.")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="Rows to run and report.")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="Seeds (protocol: 0-4).")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import train_classifier_cm
    from bench.mnist16 import build

    out = Path(args.output_dir).resolve()
    build(out / "mnist16")
    data = ["--train_data_dir", str(out / "mnist16" / "source"), "--test_data_dir", str(out / "mnist16" / "held_out")]
    records: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        for row in args.rows:
            run = out / "runs" / f"{slug(row)}-seed{seed}"
            if not (run / "metrics.json").is_file():
                flags, _ = ROWS[row]
                train_classifier_cm.main([*data, *TESTBED, *flags, "--seed", str(seed), "--output_dir", str(run)])
            records.setdefault(row, {})[seed] = json.loads((run / "metrics.json").read_text())
    print("| row | " + " | ".join(COLUMNS.values()) + " | θ^g Few |\n|---|" + "---|" * (len(COLUMNS) + 1))
    for row, by_seed in records.items():
        cells = [cell([r["theta"][key] for r in by_seed.values()]) for key in COLUMNS]
        general = [r["theta_g"]["few_accuracy"] for r in by_seed.values() if "theta_g" in r]
        print(f"| {row} | {' | '.join(cells)} | {cell(general) if general else '–'} |")
    for row, by_seed in records.items():
        base = ROWS[row][1]
        if base is None or base not in records:
            continue
        reasons = {}
        for key, label in JUDGED.items():
            values = {s: r["theta"][key] for s, r in by_seed.items()}
            base_values = {s: r["theta"][key] for s, r in records[base].items()}
            paired = [values[s] - base_values[s] for s in sorted(values.keys() & base_values.keys())]
            reasons[label] = (worse(values, base_values, False), f"paired {cell(paired)}")
        failed = "; ".join(f"{label}: {', '.join(r)}" for label, (r, _) in reasons.items() if r)
        summaries = ", ".join(f"{label} {summary}" for label, (_, summary) in reasons.items())
        verdict = f"worse ({failed})" if failed else "not worse"
        verdict = verdict if len(by_seed) >= 5 else "undecided (fewer than 5 seeds)"
        print(f"* {row} against {base}: {verdict}; {summaries}")


if __name__ == "__main__":
    main()
