#!/usr/bin/env python
"""The downstream-utility protocol on testbed 3 (docs/study.md): for each seed k, ``capman-downstream`` on the
study's seed-k models of every row given, with the classifier's seed paired with the generator's; then each row's
scores over the seeds (mean ± std) and the rule's tests (``bench/reproduce.py: worse``) against the first row.

    python bench/reproduce.py --testbed mnist16 --methods DDPM "CM (+DDPM), relative hinge" --output_dir D
    python bench/downstream.py --study_dir D --rows DDPM "CM (+DDPM), relative hinge"

Each seed's ``metrics.json`` goes to ``D/downstream/seed<k>/``; a seed already there is reused. A row's model missing
from ``D/models/`` (its record was reused, so no run left one) is trained first with the study's recipe, and
``models.json`` beside the metrics says, per row, whether its final loss is its record's: only then is the model the
one the record measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from reproduce import EVAL, IMAGES_PER_CLASS, SEEDS, STEPS, machine, slug, testbed_setup, train, worse  # noqa: E402

from capman_peft.evaluation.downstream import REAL_ONLY  # noqa: E402
from capman_peft.evaluation.downstream_cli import main as downstream  # noqa: E402

METRICS = {"few_accuracy": "Few accuracy", "recall": "macro recall", "accuracy": "accuracy"}


def ensure_model(study: Path, row: str, seed: int, testbed_flags: list[str]) -> str:
    """The row's seed model in ``study/models/``, trained there if missing; says where it came from (a model trained
    here keeps that in its ``retrained.json``)."""
    from capman_peft.training.loop import TrainingCallbacks

    run_dir = study / "models" / f"{slug(row)}-seed{seed}"
    note = run_dir / "retrained.json"
    if (run_dir / "model_index.json").is_file():
        return json.loads(note.read_text())["status"] if note.is_file() else "the study's run"
    losses: list[float] = []
    callbacks = TrainingCallbacks(on_step_end=lambda step, values: losses.append(values["loss"]))
    train(row, seed, STEPS["mnist16"], run_dir, "mnist16", testbed_flags, callbacks=callbacks)
    record = study / "runs" / f"{slug(row)}-seed{seed}.json"
    status = f"trained here on {machine()}: final loss {losses[-1]!r}, "
    if record.is_file():
        expected = json.loads(record.read_text())["final_loss"]
        status += "the record's" if losses[-1] == expected else f"not the record's {expected!r}"
    else:
        status += "no record"
    note.write_text(json.dumps({"status": status}))
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study_dir", required=True, help="The mnist16 study's --output_dir (its models/ folder).")
    parser.add_argument("--rows", nargs="+", required=True, help="Study rows whose models add images.")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="Generator and classifier seeds.")
    parser.add_argument("--epochs", type=int, default=200, help="Classifier epochs (the protocol's 200).")
    parser.add_argument(
        "--train_only",
        action="store_true",
        help="Only train the rows' missing models (e.g. two such processes at a time, one thread and row each).",
    )
    args = parser.parse_args()
    study = Path(args.study_dir)
    if args.train_only:
        testbed_flags, _ = testbed_setup("mnist16", study)
        for seed in args.seeds:
            for row in args.rows:
                print(f"{row} seed {seed}: {ensure_model(study, row, seed, testbed_flags)}")
        return
    scores: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        out = study / "downstream" / f"seed{seed}"
        if not (out / "metrics.json").is_file():
            testbed_flags, _ = testbed_setup("mnist16", study)
            models = {row: ensure_model(study, row, seed, testbed_flags) for row in args.rows}
            argv = [f"--pipeline={study / 'models' / f'{slug(row)}-seed{seed}'}" for row in args.rows]
            argv += ["--test_data_dir", str(study / "mnist16" / "held_out"), "--seeds", str(seed)]
            argv += ["--num_images_per_class", str(IMAGES_PER_CLASS), "--steps", str(EVAL["steps"])]
            argv += ["--guidance_scale", str(EVAL["guidance_scale"]), "--epochs", str(args.epochs)]
            downstream([*argv, "--output_dir", str(out)])
            (out / "models.json").write_text(json.dumps({"machine": machine(), "models": models}, indent=1))
        rows = json.loads((out / "metrics.json").read_text())["rows"]
        names = [REAL_ONLY, *args.rows]  # the record's rows are the real set, then the pipelines in order
        for name, row in zip(names, rows, strict=True):
            scores.setdefault(name, {})[seed] = row["per_seed"][0]
    print("| training set | " + " | ".join(METRICS.values()) + " |\n|---|" + "---|" * len(METRICS))
    for name, by_seed in scores.items():
        cells = []
        for key in METRICS:
            values = [s[key] for s in by_seed.values()]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {name} | {' | '.join(cells)} |")
    base = args.rows[0]

    def by_seed(row: str, key: str) -> dict[int, float]:
        return {s: v[key] for s, v in scores[row].items()}

    for name in [REAL_ONLY, *args.rows[1:]]:
        reasons = {label: worse(by_seed(name, key), by_seed(base, key), False) for key, label in METRICS.items()}
        failed = "; ".join(f"{label}: {', '.join(r)}" for label, r in reasons.items() if r)
        verdict = "worse (" + failed + ")" if failed else "not worse"
        print(f"* {name} against {base}: {verdict if len(args.seeds) > 1 else 'undecided (one seed)'}")


if __name__ == "__main__":
    main()
