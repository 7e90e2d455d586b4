"""The flow-matching schedule (SD3, Flux) against the rectified-flow formulas written out here: the shifted σ table,
the timestep draw, noising, the velocity target, the loss weighting, and OC's transferred target."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from capman_peft.objective import (
    FlowMatchingSchedule,
    FlowWeighting,
    build_objective,
    noise_schedule,
    oc_selection_probs,
)

T, SHIFT = 1000, 3.0


def shifted_sigmas() -> torch.Tensor:
    """SD3's training σ table: σ_k = s·u_k / (1 + (s − 1)·u_k) for u_k = (T − k)/T, k = 0 … T − 1."""
    u = torch.arange(T, 0, -1, dtype=torch.float64) / T
    return SHIFT * u / (1 + (SHIFT - 1) * u)


def make_schedule(**weighting) -> FlowMatchingSchedule:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=SHIFT)
    schedule = noise_schedule(scheduler, FlowWeighting(**weighting) if weighting else None)
    assert isinstance(schedule, FlowMatchingSchedule)
    return schedule


def test_sigmas_time_input_noising_and_target_are_rectified_flow():
    schedule = make_schedule()
    idx = torch.tensor([0, 1, 250, 500, 998, 999])
    sigma = shifted_sigmas()[idx]
    torch.testing.assert_close(schedule.sigmas(idx).double(), sigma, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(schedule.denoiser_timesteps(idx).double(), sigma * T, rtol=1e-6, atol=1e-4)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 2, 3, 3, generator=gen), torch.randn(6, 2, 3, 3, generator=gen)
    s = sigma.float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.add_noise(x0, eps, idx), (1 - s) * x0 + s * eps)
    torch.testing.assert_close(schedule.target(x0, eps, idx), eps - x0)
    a2, b2 = schedule.squared_mixing(idx)
    torch.testing.assert_close(a2, (1 - sigma) ** 2)
    torch.testing.assert_close(b2, sigma**2)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_timesteps_are_drawn_from_the_scheme_density_with_the_generator(scheme):
    schedule = make_schedule(weighting_scheme=scheme, logit_mean=0.5, logit_std=0.8, mode_scale=1.29)
    n = 4096
    drawn = schedule.draw_timesteps(n, torch.Generator().manual_seed(3), "cpu")
    gen = torch.Generator().manual_seed(3)
    if scheme == "logit_normal":
        u = 1 / (1 + torch.exp(-(0.5 + 0.8 * torch.randn(n, generator=gen))))
    else:
        u = torch.rand(n, generator=gen)
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    expected = (u * T).long().clamp(max=T - 1)
    assert (drawn - expected).abs().max() <= 1  # the same draws (a float rounding at a bin edge at most)
    assert (drawn == expected).float().mean() > 0.999
    assert drawn.min() >= 0 and drawn.max() < T


def test_ddpm_loss_is_the_flow_loss_with_the_sd3_weighting():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=SHIFT)
    gen = torch.Generator().manual_seed(1)
    x0, eps, pred = (torch.randn(4, 2, 3, 3, generator=gen) for _ in range(3))
    idx = torch.tensor([10, 300, 600, 900])
    sigma = shifted_sigmas()[idx].float()
    per_sample = (pred - (eps - x0)).pow(2).mean(dim=(1, 2, 3))
    for scheme, weight in [
        ("logit_normal", torch.ones(4)),
        ("sigma_sqrt", sigma**-2),
        ("cosmap", 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))),
    ]:
        objective = build_objective("ddpm", scheduler, weighting=FlowWeighting(weighting_scheme=scheme))
        x_t = objective.schedule.add_noise(x0, eps, idx)
        loss, _ = objective(pred, x0=x0, noise=eps, x_t=x_t, timesteps=idx, labels=torch.zeros(4, dtype=torch.long))
        torch.testing.assert_close(loss, (weight * per_sample).mean(), rtol=1e-5, atol=1e-6)


def test_oc_transferred_target_under_flow_matching():
    """OC's target for a reference j: ε̂ = (x_t − (1 − σ)·x0_j)/σ, velocity ε̂ − x0_j (docs/design.md)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=SHIFT)
    objective = build_objective("oc", scheduler, class_counts=[5, 1, 1])
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 2, 3, 3, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)
    idx = torch.tensor([100, 500, 900])
    x_t = objective.schedule.add_noise(x0, eps, idx)
    references = torch.tensor([0, 0, 2])  # sample 1 takes sample 0's image; 0 and 2 keep their own
    got = objective.targets(x0, eps, x_t, idx, references)
    sigma = shifted_sigmas()[idx].float().reshape(-1, 1, 1, 1)
    transferred = (x_t[1] - (1 - sigma[1]) * x0[0]) / sigma[1] - x0[0]
    torch.testing.assert_close(got[1], transferred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], eps[0] - x0[0])
    torch.testing.assert_close(got[2], eps[2] - x0[2])
    # The reference posterior: softmax_j −‖x_t,i − (1 − σ_i) x0_j‖² / (2σ_i²).
    s = sigma.flatten()
    logits = [[-(x_t[i] - (1 - s[i]) * x0[j]).pow(2).sum() / (2 * s[i] ** 2) for j in range(3)] for i in range(3)]
    probs = torch.tensor(logits, dtype=torch.float64).softmax(dim=1)
    torch.testing.assert_close(
        oc_selection_probs(x_t, x0, *objective.schedule.squared_mixing(idx)), probs, rtol=1e-4, atol=1e-6
    )


def test_min_snr_and_a_ddpm_weighting_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="snr_gamma"):
        build_objective("ddpm", FlowMatchEulerDiscreteScheduler(), snr_gamma=5.0)
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="flow-matching"):
        build_objective("ddpm", DDPMScheduler(), weighting=FlowWeighting())
