"""Consistency training as a base objective (paper sec. G.9): iCT's pieces against their formulas written out here
and against diffusers' scheduler, the loss of a batch by hand, and train_unet_cm.py --objective consistency end to
end: a ConsistencyModelPipeline that plain diffusers loads and samples in one and two steps, exact resume, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_unet_resume_is_exact, digits_run_args
from diffusers import CMStochasticIterativeScheduler, UNet2DModel

import train_unet_cm
from capman_peft.denoiser import CMDenoiser
from capman_peft.errors import ConfigError
from capman_peft.objective import ConsistencyObjective, consistency_loss, noise_schedule
from capman_peft.randomness import StepDraws


def objective(total_steps: int = 800) -> ConsistencyObjective:
    return ConsistencyObjective(CMStochasticIterativeScheduler(), total_steps=total_steps)


def test_the_curriculum_doubles_the_levels_from_11_to_1281_in_eight_stages():
    ct = objective(total_steps=800)  # K' = floor(800 / (log2(128) + 1)) = 100
    assert [ct.num_levels(k) for k in (0, 99, 100, 250, 699, 700, 10_000)] == [11, 11, 21, 41, 641, 1281, 1281]


def test_levels_are_karras_sigmas_as_the_scheduler_spaces_them():
    ct, scheduler = objective(), CMStochasticIterativeScheduler()
    by_hand = [(0.002 ** (1 / 7) + i / 10 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(11)]
    assert ct.noise.karras_sigmas(11).tolist() == pytest.approx(by_hand, rel=1e-12)
    descending = scheduler._convert_to_karras(np.linspace(0, 1, 11))  # the scheduler runs from σ_max down
    assert ct.noise.karras_sigmas(11).numpy() == pytest.approx(descending[::-1], rel=1e-6)


def test_level_pairs_follow_the_discretised_lognormal():
    ct = objective()
    sigmas = ct.noise.karras_sigmas(11).tolist()
    cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sigmas]
    p = [b - a for a, b in zip(cdf, cdf[1:], strict=False)]
    p = [v / sum(p) for v in p]
    uniforms = torch.tensor([1e-9, p[0] - 1e-9, p[0] + 1e-9, sum(p[:5]) + 1e-9, 1 - 1e-12], dtype=torch.float64)
    low, high = ct.level_pairs(uniforms, step=0)
    assert [sigmas.index(v) for v in low.tolist()] == [0, 0, 1, 5, 9]
    assert [sigmas.index(v) for v in high.tolist()] == [1, 1, 2, 6, 10]


def test_parametrisation_is_the_schedulers():
    ct, scheduler = objective(), CMStochasticIterativeScheduler()
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_in, c_skip, c_out, time = ct.noise.parametrisation(sigma)
    skip, out = scheduler.get_scalings_for_boundary_condition(sigma)
    assert torch.allclose(c_skip, skip) and torch.allclose(c_out, out)
    assert torch.allclose(c_in, 1 / (sigma**2 + 0.25).sqrt())
    assert time.numpy() == pytest.approx(scheduler.sigma_to_t(sigma.numpy()))
    assert c_skip[0] == 1 and c_out[0] == 0  # the boundary condition f(x, σ_min) = x


def test_pseudo_huber_by_hand():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([[3.0, 0, 0, 4], [0, 0, 0, 0]]).view(2, 1, 2, 2)
    c = 0.00054 * 2  # √4
    assert objective().pseudo_huber(x, y).tolist() == pytest.approx([math.sqrt(25 + c * c) - c, 0.0])


def consistency_function(network, x, s: float):
    """f(x, σ) = c_skip·x + c_out·F(c_in·x, 250·ln σ) with σ_min 0.002 and σ_data 0.5 written out (Song et al.)."""
    c_in = 1 / math.sqrt(s * s + 0.25)
    c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
    c_out = (s - 0.002) * 0.5 / math.sqrt(s * s + 0.25)
    return c_skip * x + c_out * network(c_in * x, 250 * math.log(s))


def karras_sigma(i: int, levels: int = 1281) -> float:
    return (0.002 ** (1 / 7) + i / (levels - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7


def test_the_probe_schedule_noises_and_predicts_as_consistency_training():
    """What the expert-use report and the analyses see of a consistency model: x = x0 + σ z at a level of the final
    discretisation, the consistency function f as the prediction, x0 as its target."""
    schedule = noise_schedule(CMStochasticIterativeScheduler())
    assert schedule.num_train_timesteps == 1281
    t = torch.tensor([1, 640, 1280])
    x0, z = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    sigmas = [karras_sigma(i) for i in t.tolist()]
    noisy = schedule.add_noise(x0, z, t)
    torch.testing.assert_close(noisy, torch.stack([x0[i] + sigmas[i] * z[i] for i in range(3)]))
    assert torch.equal(schedule.target(x0, z, t), x0)
    fixed = Fixed()
    predicted = schedule.denoise(lambda x, time: fixed(x, time)[0], noisy, t)
    for i, s in enumerate(sigmas):
        by_hand = consistency_function(lambda x, time: fixed(x, torch.tensor([time]))[0], noisy[i : i + 1], s)
        torch.testing.assert_close(predicted[i : i + 1], by_hand)


def test_the_probe_schedule_draws_the_upper_level_by_the_discretised_lognormal():
    """P(σ_{i+1} ≤ 1) from iCT's erf differences written out here, against 100k draws (3 binomial stds)."""
    schedule = noise_schedule(CMStochasticIterativeScheduler())
    drawn = schedule.draw_timesteps(100_000, torch.Generator().manual_seed(0), "cpu")
    assert drawn.min() >= 1 and drawn.max() <= 1280
    cdf = [math.erf((math.log(karras_sigma(i)) + 1.1) / (math.sqrt(2) * 2.0)) for i in range(1281)]
    p = [b - a for a, b in zip(cdf, cdf[1:], strict=False)]  # p[i]: the pair (i, i + 1)
    expected = sum(p[i - 1] for i in range(1, 1281) if karras_sigma(i) <= 1) / sum(p)
    observed = float((schedule.sigmas(drawn) <= 1).double().mean())
    assert abs(observed - expected) < 3 * math.sqrt(expected * (1 - expected) / 100_000)


class Fixed(torch.nn.Module):
    """F(x, t) = x · 0.5 + t / 1000, a 'network' whose consistency outputs are written out in the test."""

    def forward(self, sample, timestep, class_labels=None, return_dict=False):
        return (sample * 0.5 + timestep.view(-1, 1, 1, 1) / 1000,)


def test_the_loss_of_a_batch_by_hand():
    ct = objective(total_steps=800)
    x0, noise = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    draws = StepDraws(noise, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), torch.zeros(3, dtype=torch.bool))
    denoiser = CMDenoiser(Fixed(), capacity_manipulation=False, family=train_unet_cm.ClassConditionalFamily())
    loss, logs = consistency_loss(denoiser, ct, x0, torch.tensor([0, 1, 2]), num_classes=3, cm=None, draws=draws)
    low, high = ct.level_pairs(draws.timesteps, 0)
    fixed = Fixed()

    def f(x, s):
        return consistency_function(lambda x_in, time: fixed(x_in, torch.tensor([time]))[0], x, s)

    terms = []
    for i in range(3):
        s_lo, s_hi = low[i].item(), high[i].item()
        online, target = f(x0[i] + s_hi * noise[i], s_hi), f(x0[i] + s_lo * noise[i], s_lo)
        c = 0.00054 * 2
        terms.append((math.sqrt(((online - target) ** 2).sum().item() + c * c) - c) / (s_hi - s_lo))
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-4)
    assert logs["base_loss"].item() == pytest.approx(loss.item())


def consistency_args(tmp_path, **overrides):
    return digits_run_args(tmp_path, objective="consistency", **overrides)


def test_consistency_training_exports_a_plain_consistency_model_pipeline(tmp_path):
    from diffusers import ConsistencyModelPipeline

    train_unet_cm.main(consistency_args(tmp_path, max_train_steps=3))
    out = tmp_path / "out"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "ConsistencyModelPipeline"
    assert json.loads((out / "class_names.json").read_text()) == [str(d) for d in range(10)]
    pipe = ConsistencyModelPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, UNet2DModel) and not any("capman" in n for n, _ in pipe.unet.named_parameters())
    generator = torch.Generator().manual_seed(0)
    one = pipe(batch_size=2, class_labels=[0, 9], num_inference_steps=1, generator=generator, output_type="np")
    two = pipe(batch_size=2, class_labels=[0, 9], timesteps=[22, 0], generator=generator, output_type="np")
    assert one.images.shape == two.images.shape == (2, 8, 8, 3) and np.isfinite(two.images).all()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["args"]["objective"] == "consistency" and math.isfinite(summary["final_losses"]["loss"])

    # The expert-use report and capman-analyze capacity probe it on f, the consistency function of θ and of θ^g
    few = summary["expert_use"]["splits"]["few"]
    assert summary["expert_use"]["prediction_type"] == "sample"  # the card names f's output, an estimate of x0
    assert "| split | mean (x₀_θ − x₀_θg)² |" in (out / "README.md").read_text()
    assert few["distance"] > 0 and math.isfinite(few["loss_general"] / few["loss_full"])
    from capman_peft.analysis import expert_capacity, make_loss_setup, prepare_analysis
    from capman_peft.evaluation import load_pipeline
    from capman_peft.expert_use import fixed_batches

    capacity = expert_capacity(out, num_batches=1, batch_size=4, progress=False)
    usage = capacity["expert_usage"]
    assert capacity["prediction_type"] == "sample"  # f estimates x0
    setup = prepare_analysis(out)
    theta, theta_g = load_pipeline(out).unet, load_pipeline(out, expert="off").unet
    loss_setup = make_loss_setup(setup.pipe, setup.folder, setup.class_names, "imb-digits")

    def f(unet, x, label, level):
        return consistency_function(
            lambda x_in, time: unet(x_in, time, class_labels=label).sample, x, karras_sigma(level)
        )

    for batch in fixed_batches(loss_setup, setup.data, 10, num_batches=1, batch_size=4):
        rows = []
        for i, level in enumerate(batch.timesteps.tolist()):
            x, label = batch.noisy[i : i + 1], batch.condition[i : i + 1]
            with torch.no_grad():
                rows.append((f(theta, x, label, level) - f(theta_g, x, label, level)).pow(2).mean().item())
        assert usage[batch.class_id] == pytest.approx(sum(rows) / len(rows), rel=1e-3)

    # capman-eval samples it (its own scheduler, one step) as θ and as θ^g (the adapter without the expert)
    from test_evaluation import TINY  # registers the tiny feature extractor

    from capman_peft.evaluation.cli import main as evaluate

    evaluate([
        "--pipeline", str(out), "--num_images_per_class", "1", "--reference_images_per_class", "1", "--steps", "1",
        "--batch_size", "10", "--cache_dir", str(tmp_path / "cache"), "--feature_extractor", TINY, "--metrics", "fid",
        "--expert", "both", "--output_dir", str(tmp_path / "eval"),
    ])  # fmt: skip
    records = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert sorted(r["expert"] for r in records) == ["off", "on"]
    assert all(math.isfinite(r["overall"]["fid"]) and r["guidance_scale"] is None for r in records)


def test_consistency_training_resumes_exactly(tmp_path):
    assert_unet_resume_is_exact(
        lambda name, **kw: consistency_args(tmp_path, output_dir=tmp_path / name, **kw), tmp_path
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"coral": True}, "--coral: has no meaning in consistency training"),
        ({"focal_gamma": 2}, "--focal_gamma 2.0: has no meaning"),
    ],
)
def test_what_does_not_carry_over_is_refused(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        train_unet_cm.main(consistency_args(tmp_path, **flags))
    assert not (tmp_path / "out").exists()


def test_the_fine_tuning_script_refuses_consistency():
    import train_text_to_image_cm

    with pytest.raises(ConfigError, match="--objective consistency: trains a UNet2DModel from scratch"):
        train_text_to_image_cm.main(["--objective", "consistency", "--output_dir", "unused"])


def test_label_dropout_is_warned_about(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="capman_peft"):
        train_unet_cm.parse_args(consistency_args(tmp_path))
    assert "samples without guidance, so the null class this trains is never used" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="capman_peft"):
        train_unet_cm.parse_args(consistency_args(tmp_path, label_dropout=0))
    assert "null class" not in caplog.text
