"""Consistency training (Song et al. 2023) with the improved choices of Song & Dhariwal 2023 (iCT), as a base
objective that CM adds to (paper sec. G.9, Tab. G.9).

The network is the consistency function of diffusers' ``CMStochasticIterativeScheduler``, so the trained UNet samples
in a plain ``ConsistencyModelPipeline``: f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, 250·ln σ). Each step draws a
pair of adjacent noise levels σ_i < σ_{i+1} of the Karras discretisation (N levels, doubling from 10 to 1280 over
the run), i by iCT's discretised lognormal, and asks f(x + σ_{i+1} z) of the network to match f(x + σ_i z) of the same
network without its gradient (θ⁻ = stopgrad θ), under the pseudo-Huber metric weighted by 1 / (σ_{i+1} − σ_i).
L_CM compares θ's and θ^g's consistency outputs at σ_{i+1}; the relative forms measure θ's error against the same
target. The levels, their lognormal and the parametrisation are the noise schedule's (``ConsistencyNoiseSchedule``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..randomness import StepDraws
from .cm import RELATIVE_FORMS, cm_loss, push_warmup_scale
from .schedule import ConsistencyNoiseSchedule, per_row

CONSISTENCY = "consistency"


class ConsistencySchedule:
    """What the step draws need from the objective: one uniform per sample, turned into a level pair by the loss
    (the number of levels depends on the optimizer step, which the draws do not know)."""

    def draw_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


class ConsistencyObjective:
    """iCT's loss for a run of `total_steps` optimizer steps (its discretisation curriculum needs the length)."""

    name = CONSISTENCY

    def __init__(self, scheduler: Any, *, total_steps: int) -> None:
        self.noise = ConsistencyNoiseSchedule(scheduler)  # the sampler's σ range and parametrisation
        self.settings = self.noise.settings
        self.total_steps = total_steps
        self.schedule = ConsistencySchedule()

    def extra_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> None:
        return None

    def num_levels(self, step: int) -> int:
        """N(k) = min(s0 · 2^⌊k / K'⌋, s1) + 1 with K' = ⌊K / (log2(s1 / s0) + 1)⌋ (iCT's Eq. 5)."""
        s = self.settings
        stage = max(1, math.floor(self.total_steps / (math.log2(s.final_levels / s.initial_levels) + 1)))
        return min(s.initial_levels * 2 ** (step // stage), s.final_levels) + 1

    def level_pairs(self, uniforms: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(σ_i, σ_{i+1}) per sample, i drawn from ``level_probabilities`` by inverting its CDF at each uniform."""
        sigmas = self.noise.karras_sigmas(self.num_levels(step)).to(uniforms.device)  # on the draws' device
        cdf = self.noise.level_probabilities(sigmas).cumsum(0)
        index = torch.searchsorted(cdf, uniforms.double(), right=True).clamp(max=len(sigmas) - 2)
        return sigmas[index], sigmas[index + 1]

    def pseudo_huber(self, prediction: Tensor, target: Tensor) -> Tensor:
        """√(‖prediction − target‖² + c²) − c per sample, c = 0.00054 · √d."""
        dims = prediction[0].numel()
        c = self.settings.huber_c * math.sqrt(dims)
        squared = (prediction.float() - target.float()).pow(2).reshape(len(prediction), -1).sum(dim=1)
        return (squared + c**2).sqrt() - c


def consistency_loss(
    denoiser: nn.Module,
    objective: ConsistencyObjective,
    x0: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    cm: Any,
    draws: StepDraws,
    condition: Any = None,
    step: int = 0,
    coral: Any = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """iCT's loss + λ·L_CM for one batch, with one denoiser call for θ (and θ^g) and one gradient-free call for the
    target. Label-dropped samples train the null class and are left out of L_CM, as in ``diffusion_loss``."""
    from .total import cm_rows

    if coral is not None:
        raise ValueError("CORAL is not defined for consistency training")
    sigma_low, sigma_high = objective.level_pairs(draws.timesteps, step)
    noise, dropped = draws.noise.to(x0.dtype), draws.label_dropped
    ids = torch.where(dropped, torch.full_like(labels, num_classes), labels)
    cond_labels = ids if condition is None else condition(ids)
    c_in, c_skip, c_out, time = objective.noise.parametrisation(sigma_high)
    x_high = x0 + per_row(sigma_high, x0) * noise
    general_rows, sample_weight = cm_rows(cm, labels, draws)
    outputs = denoiser(per_row(c_in, x0) * x_high, time.to(x0.dtype), cond_labels, None, general_rows)
    full = per_row(c_skip, x0) * x_high + per_row(c_out, x0) * outputs.full
    with torch.no_grad():
        low_in, low_skip, low_out, low_time = objective.noise.parametrisation(sigma_low)
        x_low = x0 + per_row(sigma_low, x0) * noise
        # θ alone (no θ^g rows), through the module inside a distributed wrapper: no gradient to synchronise here
        teacher = getattr(denoiser, "module", denoiser).theta(
            per_row(low_in, x0) * x_low, low_time.to(x0.dtype), cond_labels
        )
        target = per_row(low_skip, x0) * x_low + per_row(low_out, x0) * teacher
    weight = (1 / (sigma_high - sigma_low)).float()
    loss = (weight * objective.pseudo_huber(full, target)).mean()
    logs = {"base_loss": loss.detach()}
    if cm is not None:
        rows = slice(None) if general_rows is None else general_rows
        general = per_row(c_skip[rows], x0) * x_high[rows] + per_row(c_out[rows], x0) * outputs.general
        cm_value, cm_logs = cm_loss(
            full[rows], general, labels[rows], cm.weights, form=cm.form, margin=cm.margin,
            relative_margin=cm.relative_margin, band_upper=cm.band_upper,
            target=target[rows] if cm.form in RELATIVE_FORMS else None, sample_weight=sample_weight,
            push_scale=push_warmup_scale(step, cm.push_warmup_steps),
        )  # fmt: skip
        loss = loss + cm.cm_lambda * cm_value
        logs.update(cm_logs)
    logs["loss"] = loss.detach()
    return loss, logs
