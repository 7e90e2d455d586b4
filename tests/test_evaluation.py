"""capman-eval: torch-fidelity metrics overall / per split / per class, generation, θ^g, outputs, errors.

No test downloads anything: metrics use a tiny feature extractor registered here, or the digits classifier (trained
in seconds from scikit-learn's bundled digits into a temporary cache).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ATTN_TARGETS, UP_TARGETS
from diffusers import DDIMScheduler, DDPMScheduler
from peft import get_peft_model
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from capman_peft import CapManConfig, ClassConditionalPipeline, expert_disabled, save_class_conditional_pipeline
from capman_peft.evaluation import (
    DIGITS_CLASSIFIER,
    classifier_accuracy,
    digits_classifier_file,
    digits_training_images,
    generate_balanced,
    load_digits_classifier,
    load_pipeline,
    measure_fidelity,
    train_digits_classifier,
)
from capman_peft.evaluation.cli import main
from capman_peft.evaluation.fidelity import _reference_cache_prefix
from capman_peft.hub import METRICS_START
from capman_peft.run_folder import PipelineFolder
from capman_peft.testing import build_tiny_sd, make_tiny_unet2d

TINY = "capman-test-tiny"
DIGITS = [str(d) for d in range(10)]


class TinyExtractor(FeatureExtractorBase):
    """2x2 average-pooled pixels as features, a fixed random projection of them as logits: no weights to download."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.register_buffer("projection", torch.randn(12, 5, generator=torch.Generator().manual_seed(0)))

    @staticmethod
    def get_provided_features_list():
        return ("pooled", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "pooled"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)
        out = {"pooled": pooled, "logits": pooled @ self.projection}
        return tuple(out[name] for name in self.features_list)


if TINY not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TINY, TinyExtractor)


def random_images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def tiny_metrics(generated, gen_labels, reference, ref_labels, num_classes, **kw):
    return measure_fidelity(generated, gen_labels, reference, ref_labels, num_classes, feature_extractor=TINY, **kw)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Module-wide cache: the digits classifier is trained once (about a second)."""
    return tmp_path_factory.mktemp("cache")


def make_cm_run(out: Path, zero_expert: bool = False) -> torch.nn.Module:
    """What a from-scratch CM training run leaves: merged pipeline, adapter/, training_summary.json, README.md."""
    model = get_peft_model(
        make_tiny_unet2d(num_classes=10),
        CapManConfig(mode="full", expert_rank_ratio=0.5, init_lora_weights=zero_expert, target_modules=UP_TARGETS),
    ).eval()
    model.save_pretrained(out / "adapter")
    merged = copy.deepcopy(model).merge_and_unload()
    save_class_conditional_pipeline(merged, DDPMScheduler(), DIGITS, out)
    summary = {"args": {"dataset": "imb-digits", "imbalance_ratio": 10, "resolution": 8}, "class_names": DIGITS}
    (out / "training_summary.json").write_text(json.dumps(summary))
    (out / "README.md").write_text("# tiny CM model\n\nTrained on imb-digits.\n")
    return model


@pytest.fixture(scope="module")
def cm_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    out = tmp_path_factory.mktemp("run") / "out"
    return out, make_cm_run(out)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def test_identical_sets_give_zero_fid_and_a_shifted_set_a_larger_one():
    real = random_images(60, seed=0)
    labels = torch.arange(6).repeat_interleave(10)
    same = tiny_metrics(real, labels, real, labels, 6, metrics=["fid", "kid", "isc", "prc"])
    assert abs(same["overall"]["fid"]) < 1e-6
    assert (same["overall"]["precision"], same["overall"]["recall"]) == (1.0, 1.0)
    assert {k for k in same["overall"] if "isc" in k} == {"isc_mean", "isc_std"}
    darker = tiny_metrics((real // 2), labels, real, labels, 6, metrics=["fid"])
    assert darker["overall"]["fid"] > 0.05


def test_split_metrics_use_only_that_splits_classes():
    real = random_images(60, seed=1)
    labels = torch.arange(6).repeat_interleave(10)  # splits: many 0-1, medium 2-3, few 4-5
    generated = real.clone()
    few = labels >= 4
    generated[few] //= 2  # darker: a different distribution (inverting uniform noise would not be)
    result = tiny_metrics(generated, labels, real, labels, 6, metrics=["fid", "kid"])
    splits = result["splits"]
    assert set(splits) == {"many", "medium", "few"}
    assert abs(splits["many"]["fid"]) < 1e-6 and abs(splits["medium"]["fid"]) < 1e-6
    assert splits["few"]["fid"] > 0.05
    assert splits["few"]["kid_mean"] > 10 * abs(splits["many"]["kid_mean"])
    assert (splits["few"]["num_generated"], splits["few"]["num_real"]) == (20, 20)


def test_kid_subset_size_is_capped_by_the_smaller_set():
    real = random_images(60, seed=2)
    real_labels = torch.arange(6).repeat_interleave(10)
    generated = random_images(12, seed=3)
    gen_labels = torch.arange(6).repeat_interleave(2)  # 4 generated images per split
    result = tiny_metrics(generated, gen_labels, real, real_labels, 6, metrics=["fid", "kid"])
    assert result["overall"]["kid_subset_size"] == 12
    for split in result["splits"].values():
        assert split["kid_subset_size"] == 4 and np.isfinite(split["kid_mean"])


def test_per_class_fid_is_zero_only_for_unchanged_classes():
    real = random_images(30, seed=4)
    labels = torch.arange(3).repeat_interleave(10)
    generated = real.clone()
    generated[labels == 1] //= 3
    result = tiny_metrics(generated, labels, real, labels, 3, metrics=["fid"], per_class_fid=True)
    fid = result["per_class"]["fid"]
    assert abs(fid[0]) < 1e-6 and abs(fid[2]) < 1e-6 and fid[1] > 0.05


def test_reference_features_are_cached_once_as_safetensors_under_a_name_with_resolution_and_count(tmp_path):
    real = random_images(30, seed=5)
    labels = torch.arange(3).repeat_interleave(10)
    kw = dict(metrics=["fid"], cache_prefix="capman-test-ref", cache_root=tmp_path)
    first = tiny_metrics(real // 2, labels, real, labels, 3, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"capman-test-ref-{TINY}.safetensors"]
    # A second run reads the cache: even different "real" images give the first run's numbers (splits included).
    second = tiny_metrics(real // 2, labels, random_images(30, seed=6), labels, 3, **kw)
    assert second["overall"]["fid"] == first["overall"]["fid"]
    assert second["splits"]["few"]["fid"] == first["splits"]["few"]["fid"]

    base = dict(dataset="imb-digits", source={}, resolution=8, count=20, extractor=TINY, weights=None)
    names = {_reference_cache_prefix(**base)}
    for change in (dict(resolution=16), dict(count=10), dict(extractor="other"), dict(source={"train_data_dir": "x"})):
        names.add(_reference_cache_prefix(**{**base, **change}))
    assert len(names) == 5 and all(n.startswith("capman-imb-digits-") for n in names)


# ----------------------------------------------------------------------------------------------------------
# The digits classifier
# ----------------------------------------------------------------------------------------------------------


def test_digits_classifier_is_accurate_on_held_out_real_digits():
    images, labels = digits_training_images()
    model = train_digits_classifier(images[0::2], labels[0::2])
    accuracy = classifier_accuracy(model, images[1::2], labels[1::2], 10)
    assert accuracy["overall"] > 0.9
    assert min(accuracy["per_class"]) > 0.7


def test_digits_classifier_fid_two_real_halves_far_below_real_vs_noise(cache_dir):
    weights = str(digits_classifier_file(cache_dir))
    images, labels = digits_training_images()
    kw = dict(metrics=["fid"], feature_extractor=DIGITS_CLASSIFIER, feature_extractor_weights_path=weights)
    halves = measure_fidelity(images[0::2], labels[0::2], images[1::2], labels[1::2], 10, **kw)["overall"]["fid"]
    noise = random_images(len(images[0::2]), seed=7, size=16)
    vs_noise = measure_fidelity(noise, labels[0::2], images[1::2], labels[1::2], 10, **kw)["overall"]["fid"]
    assert halves * 20 < vs_noise
    # the cached file is reused and loads to the same network
    assert digits_classifier_file(cache_dir) == Path(weights)
    model = load_digits_classifier(weights)
    assert classifier_accuracy(model, images, labels, 10)["overall"] > 0.95


# ----------------------------------------------------------------------------------------------------------
# Generation and θ^g
# ----------------------------------------------------------------------------------------------------------


def test_generation_is_balanced_and_reproducible_whatever_the_batch_size(cm_run):
    pipe = load_pipeline(cm_run[0], scheduler="ddim")
    kw = dict(steps=2, guidance_scale=1.5, progress=False)
    images, labels = generate_balanced(pipe, 3, 10, seed=0, batch_size=8, **kw)
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 8, 8)
    assert torch.bincount(labels).tolist() == [3] * 10
    again, again_labels = generate_balanced(pipe, 3, 10, seed=0, batch_size=7, **kw)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    other, _ = generate_balanced(pipe, 3, 10, seed=1, batch_size=8, **kw)
    assert not torch.equal(images, other)


def test_expert_off_is_the_general_model_and_differs_from_expert_on(cm_run):
    out, model = cm_run
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 600]), torch.tensor([0, 9])
    with torch.no_grad():
        theta = model(x, t, class_labels=y).sample
        with expert_disabled(model):
            theta_g = model(x, t, class_labels=y).sample
    on, off = load_pipeline(out, expert="on"), load_pipeline(out, expert="off")
    with torch.no_grad():
        torch.testing.assert_close(on.unet(x, t, class_labels=y).sample, theta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(off.unet(x, t, class_labels=y).sample, theta_g, atol=1e-5, rtol=1e-5)
    assert (theta - theta_g).abs().max() > 1e-3

    # Independently: θ^g as the merged model with every expert B zeroed, sampled through a fresh pipeline.
    general = copy.deepcopy(model)
    for module in general.modules():
        for b in getattr(module, "capman_expert_B", {}).values():
            torch.nn.init.zeros_(b)
    reference_pipe = ClassConditionalPipeline(
        general.merge_and_unload(), DDIMScheduler.from_config(off.scheduler.config), dict(enumerate(DIGITS))
    )
    reference_pipe.set_progress_bar_config(disable=True)
    off_ddim = load_pipeline(out, expert="off", scheduler="ddim")
    kw = dict(steps=2, guidance_scale=1.5, seed=0, batch_size=10, progress=False)
    expected, _ = generate_balanced(reference_pipe, 1, 10, **kw)
    got_off, _ = generate_balanced(off_ddim, 1, 10, **kw)
    got_on, _ = generate_balanced(load_pipeline(out, expert="on", scheduler="ddim"), 1, 10, **kw)
    assert (got_off.int() - expected.int()).abs().max() <= 1  # one uint8 step of rounding
    assert not torch.equal(got_on, got_off)


# ----------------------------------------------------------------------------------------------------------
# capman-eval end to end
# ----------------------------------------------------------------------------------------------------------

OVERALL_KEYS = {"num_generated", "num_real", "fid", "kid_mean", "kid_std", "kid_subset_size", "isc_mean", "isc_std"}
OVERALL_KEYS |= {"precision", "recall", "f_score"}
SPLIT_KEYS = {"num_generated", "num_real", "fid", "kid_mean", "kid_std", "kid_subset_size"}
TOP_KEYS = {
    "num_images",
    "pipeline",
    "label",
    "kind",
    "expert",
    "dataset",
    "dataset_name",
    "train_data_dir",
    "class_names",
    "num_classes",
    "splits_classes",
    "num_images_per_class",
    "reference_images_per_class",
    "resolution",
    "scheduler",
    "steps",
    "guidance_scale",
    "seed",
    "feature_extractor",
    "feature_extractor_weights_path",
    "metrics",
    "torch_fidelity_version",
    "overall",
    "splits",
    "per_class",
    "classifier_accuracy",
    "caveats",
}


def eval_args(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--pipeline",
        str(out),
        "--num_images_per_class",
        "4",
        "--reference_images_per_class",
        "10",
        "--steps",
        "2",
        "--batch_size",
        "20",
        "--cache_dir",
        str(cache_dir),
        *extra,
    ]


@pytest.mark.slow
def test_capman_eval_writes_metrics_json_charts_and_model_card(tmp_path, cache_dir):
    out = tmp_path / "out"
    make_cm_run(out)
    main(eval_args(out, cache_dir, "--per_class_fid", "--output_dir", str(tmp_path / "eval")))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == TOP_KEYS
    assert set(metrics["overall"]) == OVERALL_KEYS and set(metrics["splits"]) == {"many", "medium", "few"}
    assert all(set(s) == SPLIT_KEYS for s in metrics["splits"].values())
    assert metrics["overall"]["num_generated"] == 40 and metrics["overall"]["num_real"] == 100
    assert [metrics["splits"][s]["num_generated"] for s in ("many", "medium", "few")] == [12, 12, 16]
    assert metrics["feature_extractor"] == DIGITS_CLASSIFIER and metrics["expert"] == "on"
    assert len(metrics["caveats"]) == 4 and "FID split few rests on 16 generated and 40 real images" in str(metrics)
    assert len(metrics["per_class"]["fid"]) == 10 and len(metrics["classifier_accuracy"]["per_class"]) == 10
    assert (tmp_path / "eval" / "samples.png").stat().st_size > 0
    assert (tmp_path / "eval" / "fid_splits.png").stat().st_size > 0

    card = (out / "README.md").read_text()
    assert card.startswith("# tiny CM model") and card.count(METRICS_START) == 1
    assert f"{metrics['overall']['fid']:.4g}" in card

    # Same seed, same numbers; a second run replaces the card's section instead of adding one.
    main(eval_args(out, cache_dir, "--metrics", "fid", "--output_dir", str(tmp_path / "eval2")))
    again = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert again["overall"]["fid"] == pytest.approx(metrics["overall"]["fid"], rel=1e-9)
    assert set(again["overall"]) == {"num_generated", "num_real", "fid"}
    assert (out / "README.md").read_text().count(METRICS_START) == 1


@pytest.mark.slow
def test_capman_eval_several_models_get_one_chart_and_a_folder_each(tmp_path, cm_run, cache_dir):
    out = cm_run[0]
    args = eval_args(out, cache_dir, "--expert", "both", "--metrics", "fid", "--no_model_card", "--num_images", "25")
    main([*args, "--feature_extractor", TINY, "--output_dir", str(tmp_path / "cmp")])
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert [(r["label"], r["expert"]) for r in summary] == [("out", "on"), ("out-general", "off")]
    # a total budget of 25 images over 10 classes: 2 per class, replacing --num_images_per_class 4
    assert summary[0]["num_images_per_class"] == 2 and summary[0]["overall"]["num_generated"] == 20
    assert summary[0]["overall"]["fid"] != summary[1]["overall"]["fid"]
    for label in ("out", "out-general"):
        assert (tmp_path / "cmp" / label / "metrics.json").is_file()
    assert (tmp_path / "cmp" / "fid_splits.png").is_file()
    assert METRICS_START not in (out / "README.md").read_text()


@pytest.mark.slow
def test_capman_eval_takes_several_guidance_scales_and_records_each(tmp_path, cm_run, cache_dir):
    out = cm_run[0]
    args = eval_args(out, cache_dir, "--metrics", "fid", "--guidance_scale", "1", "2.5", "--feature_extractor", TINY)
    main([*args, "--output_dir", str(tmp_path / "scales")])
    summary = json.loads((tmp_path / "scales" / "summary.json").read_text())
    assert [(r["label"], r["guidance_scale"]) for r in summary] == [("out-w1", 1.0), ("out-w2.5", 2.5)]
    assert summary[0]["overall"]["fid"] != summary[1]["overall"]["fid"]
    for label in ("out-w1", "out-w2.5"):
        assert json.loads((tmp_path / "scales" / label / "metrics.json").read_text())["label"] == label
    card = (out / "README.md").read_text()
    assert "guidance scale 1 and 2.5" in card and "θ (expert on, merged), w = 2.5" in card


@pytest.mark.parametrize(
    "pipeline, args, learned",
    [
        ("ClassConditionalPipeline", {"label_dropout": 0.1}, True),
        ("ClassConditionalPipeline", {"label_dropout": 0.0}, False),  # from scratch, the null class never trained
        ("ClassConditionalPipeline", {}, True),  # no record of it: assumed trained
        ("StableDiffusionPipeline", {"label_dropout": 0.0}, True),  # fine-tuned: the base brings one
        ("StableDiffusionPipeline", {"label_dropout": 0.0, "model_config_name_or_path": "unet.json"}, False),
        ("StableDiffusionPipeline", {"label_dropout": 0.1, "model_config_name_or_path": "unet.json"}, True),
    ],
)
def test_only_a_model_from_scratch_without_label_dropout_lacks_the_unconditional_prediction(pipeline, args, learned):
    folder = PipelineFolder(Path("out"), {"_class_name": pipeline}, {"args": args})
    assert folder.learned_unconditional is learned


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--pipeline": "NOT_A_PIPELINE"}, "is not a pipeline folder (no model_index.json)"),
        ({"--dataset": "imb-nope"}, "unknown dataset 'imb-nope'; known datasets: imb-artbench10"),
        ({"--num_images_per_class": "0"}, "--num_images_per_class: got '0'; allowed: an integer >= 1"),
        ({"--metrics": "fid,fud"}, "unknown metric fud; allowed: fid, kid, isc, prc"),
        (
            {"--num_images": "5"},
            "--num_images 5: fewer than one image for each of the 10 classes; allowed: at least 10",
        ),
        ({"--guidance_scale": "nan"}, "--guidance_scale: got 'nan'; allowed: a finite number >= 0"),
        ({"--guidance_scale": "-1"}, "--guidance_scale: got '-1'; allowed: a finite number >= 0"),
        ({"--steps": "0"}, "--steps: got '0'; allowed: an integer >= 1"),
        ({"--scheduler": "euler"}, "--scheduler: invalid choice: 'euler'"),
        ({"--feature_extractor": "nope"}, "unknown feature extractor 'nope'; registered:"),
        ({"--pipeline": "NO_ADAPTER", "--expert": "off"}, "has no adapter/adapter_config.json: the expert-off"),
        ({"--expert": "maybe"}, "--expert must be one of on, off, both, got 'maybe'"),
    ],
)
def test_bad_input_fails_with_one_clear_line(change, message, cm_run, tmp_path, capsys):
    plain = tmp_path / "plain"  # a pipeline saved without the CapMan adapter
    save_class_conditional_pipeline(make_tiny_unet2d(num_classes=10), DDPMScheduler(), DIGITS, plain)
    values = {"--pipeline": str(cm_run[0]), "--dataset": "imb-digits", "--output_dir": str(tmp_path)}
    paths = {"NOT_A_PIPELINE": str(tmp_path), "NO_ADAPTER": str(plain)}
    values.update({k: paths.get(v, v) for k, v in change.items()})
    argv = [item for pair in values.items() for item in pair]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert not (tmp_path / "metrics.json").exists()


def test_bad_input_raises_value_error_from_the_function(tmp_path):
    from capman_peft.evaluation import evaluate_pipeline

    with pytest.raises(ValueError, match="no model_index.json"):
        evaluate_pipeline(tmp_path, "imb-digits")


# ----------------------------------------------------------------------------------------------------------
# Stable Diffusion output (LoRA mode): prompts per class, θ^g from the base model named by the adapter
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")  # PEFT looks for base/config.json
def test_stable_diffusion_output_generates_per_class_prompts_and_expert_off_uses_the_base(tmp_path):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path))
    config = CapManConfig(mode="lora", r=4, expert_r=2, init_lora_weights=False, target_modules=ATTN_TARGETS)
    model = get_peft_model(copy.deepcopy(base.unet), config).eval()
    # What the LoRA training script records: the pretrained pipeline the adapter belongs to.
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    out = tmp_path / "out"
    model.save_pretrained(out / "adapter")
    merged = StableDiffusionPipeline(**{**base.components, "unet": copy.deepcopy(model).merge_and_unload()})
    merged.save_pretrained(out)
    (out / "training_summary.json").write_text(json.dumps({"args": {"dataset": "imb-digits"}, "class_names": DIGITS}))

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([5, 700]), torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), expert_disabled(model):
        theta_g = model(x, t, encoder_hidden_states=cond).sample
    off = load_pipeline(out, expert="off")
    with torch.no_grad():
        torch.testing.assert_close(off.unet(x, t, encoder_hidden_states=cond).sample, theta_g, atol=1e-5, rtol=1e-5)

    prompts = [f"a handwritten digit {d}" for d in DIGITS]
    kw = dict(prompts=prompts, steps=2, seed=0, batch_size=10, progress=False)
    on_images, labels = generate_balanced(load_pipeline(out), 1, 10, **kw)
    off_images, _ = generate_balanced(off, 1, 10, **kw)
    assert on_images.shape == (10, 3, 16, 16) and on_images.dtype == torch.uint8
    assert torch.equal(labels, torch.arange(10)) and not torch.equal(on_images, off_images)


def test_the_feature_cache_keeps_the_layers_of_other_metric_sets(tmp_path):
    """A fid-only evaluation and a full one share one cache file: the second extends it instead of replacing it, so
    neither recomputes the other's features next time."""
    from capman_peft.evaluation.fidelity import cached_reference_features

    images = random_images(6, seed=1)
    calls = []

    def extract(layers):
        def run(_):
            calls.append(layers)
            return {name: torch.full((6, 2), float(i)) for i, name in enumerate(layers)}

        return run

    cache = tmp_path / "ref.safetensors"
    cached_reference_features(images, ["features"], extract(["features"]), cache)
    both = cached_reference_features(images, ["features", "logits"], extract(["logits"]), cache)
    assert set(both) == {"features", "logits"} and len(calls) == 2
    again = cached_reference_features(images, ["features", "logits"], extract(["never"]), cache)
    assert set(again) == {"features", "logits"} and len(calls) == 2  # read from the file
