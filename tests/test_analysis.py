"""capman-analyze: magnitude pruning (paper Fig. 1b, Eq. G.1) and per-class expert usage of a CM run."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import UP_TARGETS
from diffusers import DDPMScheduler
from peft import get_peft_model
from sklearn.datasets import load_digits
from torch import nn

from capman_peft import CapManConfig, save_class_conditional_pipeline
from capman_peft.analysis import (
    expert_capacity,
    heldout_loss,
    magnitude_prune_,
    make_loss_setup,
    prepare_analysis,
    prunable_weights,
    pruning_sensitivity,
    push_gradient,
)
from capman_peft.analysis.cli import main
from capman_peft.data import load_heldout_dataset, load_imbalanced_dataset, long_tail_counts
from capman_peft.evaluation import load_pipeline
from capman_peft.expert_use import fixed_batches
from capman_peft.testing import make_tiny_unet2d
from capman_peft.tuner import expert_disabled

DIGITS = [str(d) for d in range(10)]
SMALL = ["--num_batches", "2", "--batch_size", "8"]


def make_cm_run(out: Path, zero_expert: bool = False) -> None:
    """What a from-scratch CM training run leaves: merged pipeline, adapter/, training_summary.json."""
    model = get_peft_model(
        make_tiny_unet2d(num_classes=10),
        CapManConfig(mode="full", expert_rank_ratio=0.5, init_lora_weights=zero_expert, target_modules=UP_TARGETS),
    ).eval()
    model.save_pretrained(out / "adapter")
    save_class_conditional_pipeline(copy.deepcopy(model).merge_and_unload(), DDPMScheduler(), DIGITS, out)
    summary = {"args": {"dataset": "imb-digits", "imbalance_ratio": 10, "resolution": 8}, "class_names": DIGITS}
    (out / "training_summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def cm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    make_cm_run(out)
    return out


def file_hashes(folder: Path) -> dict[str, str]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ----------------------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------------------


def test_magnitude_pruning_zeroes_exactly_the_smallest_fraction_of_linear_and_conv_weights():
    model = make_tiny_unet2d()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chosen = {n for n, _ in prunable_weights(model)}
    assert chosen == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    total = sum(before[n].numel() for n in chosen)
    stats = magnitude_prune_(model, 0.1)
    after = dict(model.named_parameters())
    zeroed = torch.cat([(after[n] == 0).flatten() for n in sorted(chosen)])
    assert stats["num_weights"] == total and stats["num_pruned"] == round(0.1 * total) == int(zeroed.sum())
    magnitudes = torch.cat([before[n].abs().flatten() for n in sorted(chosen)])
    assert magnitudes[zeroed].max() <= magnitudes[~zeroed].min()
    assert magnitudes[zeroed].max().item() == pytest.approx(stats["threshold"])
    for name, value in before.items():  # kept weights, biases, norms and the class embedding are untouched
        keep = after[name] != 0 if name in chosen else torch.ones_like(value, dtype=torch.bool)
        assert torch.equal(after[name][keep], value[keep]), name


def test_magnitude_pruning_breaks_ties_to_hit_the_exact_count():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 3))
    with torch.no_grad():
        for layer in model:
            layer.weight.fill_(0.5)
    assert magnitude_prune_(model, 0.2)["num_pruned"] == 26  # 20% of 130 weights, all of the same magnitude
    assert sum(int((layer.weight == 0).sum()) for layer in model) == 26
    assert int((model[0].weight == 0).sum()) == 26  # ties go in parameter order
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        magnitude_prune_(model, 1.5)


@pytest.mark.slow
def test_prune_analysis_is_deterministic_and_leaves_the_pipeline_untouched(cm_run, tmp_path):
    before = file_hashes(cm_run)
    for name in ("a", "b"):
        main(["prune", "--pipeline", str(cm_run), *SMALL, "--output_dir", str(tmp_path / name)])
    assert file_hashes(cm_run) == before
    first = (tmp_path / "a" / "prune.json").read_text()
    assert first == (tmp_path / "b" / "prune.json").read_text()
    assert (tmp_path / "a" / "prune.png").stat().st_size > 0
    result = json.loads(first)
    assert result["fraction"] == 0.1 and result["num_pruned"] == round(0.1 * result["num_weights"])
    zeros_in_digits = int((load_digits().target == 0).sum())
    assert result["class_counts"] == long_tail_counts(zeros_in_digits, 10, 10)  # the training set, reloaded
    assert result["order_by_size"] == list(range(10)) and result["samples_per_class"] == 16
    for c in range(10):
        raw, pruned = result["loss_raw"][c], result["loss_pruned"][c]
        assert result["relative_loss_change"][c] == pytest.approx((pruned - raw) / raw)
    assert set(result["splits"]) == {"many", "medium", "few"}
    many = result["splits"]["many"]["relative_loss_change"]
    assert many == pytest.approx(sum(result["relative_loss_change"][:3]) / 3)


def test_prune_fraction_zero_changes_no_loss(cm_run):
    result = pruning_sensitivity(cm_run, fraction=0.0, num_batches=1, batch_size=4, progress=False)
    assert result["num_pruned"] == 0 and result["relative_loss_change"] == [0.0] * 10


def test_per_class_loss_matches_a_direct_computation(cm_run):
    """L^c is the plain ε-MSE of the saved UNet on class-c training images noised with the seeded draw."""
    result = pruning_sensitivity(cm_run, fraction=0.2, num_batches=1, batch_size=4, seed=3, progress=False)
    setup = prepare_analysis(cm_run)
    unet = load_pipeline(cm_run).unet
    scheduler = DDPMScheduler.from_pretrained(cm_run, subfolder="scheduler")
    denoiser = make_loss_setup(setup.pipe, setup.folder, DIGITS, "imb-digits")
    batch = next(
        b for b in fixed_batches(denoiser, setup.data, 10, num_batches=1, batch_size=4, seed=3) if b.class_id == 9
    )
    # the batch is class 9's first four training images, noised as DDPM does
    images = torch.stack([setup.data[i]["pixel_values"] for i, y in enumerate(setup.data.labels) if y == 9][:4])
    noise = batch.target  # epsilon prediction: the target is the noise itself
    alpha_bar = scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise)
    with torch.no_grad():
        expected = (unet(batch.noisy, batch.timesteps, class_labels=torch.full((4,), 9)).sample - noise).pow(2).mean()
    assert result["loss_raw"][9] == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Expert usage
# ----------------------------------------------------------------------------------------------------------


def test_capacity_is_zero_for_a_fresh_expert_and_positive_for_a_trained_one(cm_run, tmp_path):
    fresh = tmp_path / "fresh"
    make_cm_run(fresh, zero_expert=True)
    kw = dict(num_batches=1, batch_size=4, progress=False)
    zero = expert_capacity(fresh, **kw)
    assert zero["expert_usage"] == [0.0] * 10 and zero["loss_full"] == zero["loss_general"]
    used = expert_capacity(cm_run, output_dir=tmp_path / "cap", **kw)
    assert all(d > 0 for d in used["expert_usage"]) and used["loss_full"] != used["loss_general"]
    assert (tmp_path / "cap" / "capacity.png").stat().st_size > 0
    assert json.loads((tmp_path / "cap" / "capacity.json").read_text())["expert_usage"] == used["expert_usage"]


def test_capacity_matches_merged_theta_minus_general_theta(cm_run):
    """Independent of the expert gate: the merged model θ and θ^g built by load_pipeline(expert="off")."""
    result = expert_capacity(cm_run, num_batches=1, batch_size=4, progress=False)
    setup = prepare_analysis(cm_run)
    theta, theta_g = load_pipeline(cm_run).unet, load_pipeline(cm_run, expert="off").unet
    denoiser = make_loss_setup(setup.pipe, setup.folder, DIGITS, "imb-digits")
    for batch in fixed_batches(denoiser, setup.data, 10, num_batches=1, batch_size=4):
        with torch.no_grad():
            a = theta(batch.noisy, batch.timesteps, class_labels=batch.condition).sample
            b = theta_g(batch.noisy, batch.timesteps, class_labels=batch.condition).sample
        assert result["expert_usage"][batch.class_id] == pytest.approx((a - b).pow(2).mean().item(), rel=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Held-out loss and the push's gradient
# ----------------------------------------------------------------------------------------------------------


def test_heldout_digits_are_exactly_those_training_left_out():
    heldout = load_heldout_dataset("imb-digits", 10, 8)
    training = load_imbalanced_dataset("imb-digits", imbalance_ratio=10, resolution=8)
    all_digits = load_digits()
    per_class = [int((all_digits.target == c).sum()) for c in range(10)]
    assert [h + t for h, t in zip(heldout.class_counts, training.class_counts, strict=True)] == per_class
    train_images = {training[i]["pixel_values"].numpy().tobytes() for i in range(len(training))}
    held_images = [heldout[i]["pixel_values"].numpy().tobytes() for i in range(len(heldout))]
    # digits has a few exact duplicates; apart from those, no held-out image was trained on
    assert sum(image in train_images for image in held_images) <= 5


def test_heldout_loss_matches_a_direct_computation(cm_run):
    """Class c's loss is the ε-MSE of θ (merged) and θ^g (expert off) on its first held-out images at the centres of
    `timesteps` equal bins of [0, 1000), with the noise drawn from the seeded generator."""
    result = heldout_loss(cm_run, images_per_class=3, timesteps=4, seed=5)
    assert result["timesteps"] == [125, 375, 625, 875]
    theta, theta_g = load_pipeline(cm_run).unet, load_pipeline(cm_run, expert="off").unet
    scheduler = DDPMScheduler.from_pretrained(cm_run, subfolder="scheduler")
    heldout = load_heldout_dataset("imb-digits", 10, 8, class_order=DIGITS)
    from capman_peft.randomness import derived_seed

    assert math.isnan(result["loss_full"][0])  # the largest class keeps all its digits: none held out
    for c in (1, 9):
        rows = [i for i, y in enumerate(heldout.labels) if y == c][:3]
        images = torch.stack([heldout[i]["pixel_values"] for i in rows])
        x0 = images.repeat_interleave(4, dim=0)
        t = torch.tensor([125, 375, 625, 875] * 3)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(derived_seed(5, c)))
        alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        with torch.no_grad():
            for key, unet in (("loss_full", theta), ("loss_general", theta_g)):
                expected = (unet(noisy, t, class_labels=torch.full((12,), c)).sample - noise).pow(2).mean()
                assert result[key][c] == pytest.approx(expected.item(), rel=1e-4)
    splits = result["splits"]
    assert splits["few"]["loss_full"] == pytest.approx(sum(result["loss_full"][6:]) / 4)


def test_push_gradient_splits_the_hinge_gradient_by_route_and_weights(cm_run, tmp_path):
    """The two routes add up to the autograd gradient of the push term; θ^g's route never reaches the expert; a
    general-only push moves θ by the θ^g route alone."""
    run = tmp_path / "run"
    shutil.copytree(cm_run, run)
    summary = json.loads((run / "training_summary.json").read_text())
    summary["args"]["cm_margin"] = 50.0  # the fixture's random expert is far beyond the default margin
    (run / "training_summary.json").write_text(json.dumps(summary))
    result = push_gradient(run, images_per_class=2, timesteps=2)
    assert result["pushed_classes"] == [c for c in range(10) if c >= 5]  # digits IR 10: c_y > 0 from class 5 on
    assert result["active_rows"] > 0
    assert result["norm_through_theta_g_expert"] == 0.0
    assert result["norm_through_theta_expert"] > 0 and result["norm_through_theta_general_weights"] > 0
    assert set(result["theta_heldout_rate"]) == {"push", "push_theta_g_part"}
    assert all(math.isfinite(v) for v in result["theta_heldout_rate"]["push"][1:])  # class 0: none held out

    # the θ route's norm on the expert, by a direct computation of the hinge's gradient on the merged model
    from capman_peft.analysis.heldout import _class_inputs, timestep_grid
    from capman_peft.objective import cm_weights
    from capman_peft.run_folder import load_capman_unet

    setup = prepare_analysis(run)
    capman = load_capman_unet(setup.folder).eval()
    experts = [p for n, p in capman.named_parameters() if "capman_expert_" in n]
    for p in experts:
        p.requires_grad_(True)
    loss_setup = make_loss_setup(setup.pipe, setup.folder, DIGITS, "imb-digits")
    weights = cm_weights(setup.data.class_counts, "hinge")
    labels = torch.tensor(setup.data.labels)
    total = 0.0
    for c in result["pushed_classes"]:
        rows = torch.nonzero(labels == c).flatten()[:2].numpy()
        noisy, t, condition, _ = _class_inputs(
            loss_setup, setup.data, rows=rows, class_id=c, grid=timestep_grid(1000, 2), seed=1
        )
        full = capman(noisy, t, class_labels=condition).sample
        with torch.no_grad(), expert_disabled(capman):
            general = capman(noisy, t, class_labels=condition).sample
        rms = (full - general).pow(2).flatten(1).mean(1).sqrt()
        total = total + weights.push[c] * (50.0 - rms).clamp(min=0).sum() / (5 * len(t))
    grads = torch.autograd.grad(total, experts)
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert result["norm_through_theta_expert"] == pytest.approx(norm, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--pipeline", "NOWHERE"], "is not a pipeline folder (no model_index.json)"),
        (["prune", "--pipeline", "RUN", "--fraction", "1.5"], "fraction must be in [0, 1], got 1.5"),
        (["prune", "--pipeline", "RUN", "--dataset", "imb-nope"], "unknown dataset 'imb-nope'; known datasets:"),
        (["capacity", "--pipeline", "RUN", "--num_batches", "0"], "num_batches must be an integer >= 1, got 0"),
        (["capacity", "--pipeline", "NOADAPTER"], "has no adapter/adapter_config.json"),
        (["push", "--pipeline", "NOADAPTER"], "has no adapter/adapter_config.json"),
        (["heldout", "--pipeline", "RUN", "--output_dir", "RUN"], "is the pipeline folder being evaluated"),
        (["heldout", "--pipeline", "RUN", "--timesteps", "0"], "--timesteps: got '0'; allowed: an integer >= 1"),
    ],
)
def test_bad_input_fails_with_one_clear_line(argv, message, cm_run, tmp_path, capsys):
    no_adapter = tmp_path / "no_adapter"
    if "NOADAPTER" in argv:
        make_cm_run(no_adapter)
        for f in (no_adapter / "adapter").iterdir():
            f.unlink()
        (no_adapter / "adapter").rmdir()
    paths = {"NOWHERE": str(tmp_path), "RUN": str(cm_run), "NOADAPTER": str(no_adapter)}
    argv = [paths.get(a, a) for a in argv]
    argv += [] if "--output_dir" in argv else ["--output_dir", str(tmp_path / "analysis")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors


def test_a_dead_expert_is_reported_unused(caplog):
    """Every distance exactly 0 (a fresh expert: its B is zero) is an unused expert, not a used one."""
    from capman_peft.expert_use import summarize_expert_use
    from capman_peft.families import ClassConditionalFamily

    data = load_imbalanced_dataset("imb-digits", resolution=8, imbalance_ratio=10)
    model = get_peft_model(make_tiny_unet2d(10), CapManConfig(mode="full", target_modules=UP_TARGETS))
    with caplog.at_level("INFO", logger="capman_peft"):
        report = summarize_expert_use(model, DDPMScheduler(), data, ClassConditionalFamily(), images_per_class=2)
    assert all(d == 0 for d in report["per_class_distance"])
    assert report["few_over_many"] == 0 and report["expert_used"] is False
    assert "the expert is unused" in caplog.text
