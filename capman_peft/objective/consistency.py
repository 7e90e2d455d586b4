"""Consistency training (Song et al. 2023) with the improved choices of Song & Dhariwal 2023 (iCT), as a base
objective that CM adds to (paper sec. G.9, Tab. G.9).

The network is the consistency function of diffusers' ``CMStochasticIterativeScheduler``, so the trained UNet samples
in a plain ``ConsistencyModelPipeline``: f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, 250·ln σ). Each step draws a
pair of adjacent noise levels σ_i < σ_{i+1} of the Karras discretisation (N levels, doubling from 10 to 1280 over
the run), i by iCT's discretised lognormal, and asks f(x + σ_{i+1} z) of the network to match f(x + σ_i z) of the same
network without its gradient (θ⁻ = stopgrad θ), under the pseudo-Huber metric weighted by 1 / (σ_{i+1} − σ_i).
L_CM compares θ's and θ^g's consistency outputs at σ_{i+1}; the relative forms measure θ's error against the same
target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..randomness import StepDraws
from .cm import RELATIVE_FORMS, cm_loss, push_warmup_scale

CONSISTENCY = "consistency"


@dataclass(frozen=True)
class ConsistencySettings:
    """iCT's settings (Song & Dhariwal 2023, sec. 3-4 and their CIFAR-10 table); σ_min, σ_max, ρ and σ_data are
    the scheduler's (``CMStochasticIterativeScheduler`` defaults)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    initial_levels: int = 10  # s0
    final_levels: int = 1280  # s1
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c: float = 0.00054  # c = 0.00054 · √d, d the data dimension


class ConsistencySchedule:
    """What the step draws need from the objective: one uniform per sample, turned into a level pair by the loss
    (the number of levels depends on the optimizer step, which the draws do not know)."""

    def draw_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


class ConsistencyObjective:
    """iCT's loss for a run of `total_steps` optimizer steps (its discretisation curriculum needs the length)."""

    name = CONSISTENCY

    def __init__(self, scheduler: Any, *, total_steps: int) -> None:
        config = scheduler.config  # the sampler's σ range and parametrisation
        self.settings = ConsistencySettings(
            sigma_min=config.sigma_min, sigma_max=config.sigma_max, rho=config.rho, sigma_data=config.sigma_data
        )
        self.total_steps = total_steps
        self.schedule = ConsistencySchedule()

    def extra_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> None:
        return None

    def num_levels(self, step: int) -> int:
        """N(k) = min(s0 · 2^⌊k / K'⌋, s1) + 1 with K' = ⌊K / (log2(s1 / s0) + 1)⌋ (iCT's Eq. 5)."""
        s = self.settings
        stage = max(1, math.floor(self.total_steps / (math.log2(s.final_levels / s.initial_levels) + 1)))
        return min(s.initial_levels * 2 ** (step // stage), s.final_levels) + 1

    def sigmas(self, levels: int) -> Tensor:
        """The Karras levels σ_1 < … < σ_N, float64."""
        s = self.settings
        ramp = torch.linspace(0, 1, levels, dtype=torch.float64)
        low, high = s.sigma_min ** (1 / s.rho), s.sigma_max ** (1 / s.rho)
        return (low + ramp * (high - low)) ** s.rho

    def level_probabilities(self, sigmas: Tensor) -> Tensor:
        """p(i) ∝ erf((ln σ_{i+1} − P_mean) / (√2 P_std)) − erf((ln σ_i − P_mean) / (√2 P_std)), i < N."""
        s = self.settings
        cdf = torch.erf((sigmas.log() - s.p_mean) / (math.sqrt(2) * s.p_std))
        weights = cdf[1:] - cdf[:-1]
        return weights / weights.sum()

    def level_pairs(self, uniforms: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(σ_i, σ_{i+1}) per sample, i drawn from ``level_probabilities`` by inverting its CDF at each uniform."""
        sigmas = self.sigmas(self.num_levels(step)).to(uniforms.device)  # on the draws' device: no host sync
        cdf = self.level_probabilities(sigmas).cumsum(0)
        index = torch.searchsorted(cdf, uniforms.double(), right=True).clamp(max=len(sigmas) - 2)
        return sigmas[index], sigmas[index + 1]

    def parametrisation(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_in, c_skip, c_out, the UNet's time input) at σ, as the scheduler samples."""
        s = self.settings
        c_in = (sigma**2 + s.sigma_data**2).rsqrt()
        c_skip = s.sigma_data**2 / ((sigma - s.sigma_min) ** 2 + s.sigma_data**2)
        c_out = (sigma - s.sigma_min) * s.sigma_data / (sigma**2 + s.sigma_data**2).sqrt()
        return c_in, c_skip, c_out, 1000 * 0.25 * torch.log(sigma + 1e-44)

    def pseudo_huber(self, prediction: Tensor, target: Tensor) -> Tensor:
        """√(‖prediction − target‖² + c²) − c per sample, c = 0.00054 · √d."""
        dims = prediction[0].numel()
        c = self.settings.huber_c * math.sqrt(dims)
        squared = (prediction.float() - target.float()).pow(2).reshape(len(prediction), -1).sum(dim=1)
        return (squared + c**2).sqrt() - c


class ConsistencyNoiseSchedule:
    """The noise schedule through which the expert-use report and the analyses probe a consistency model: a timestep
    is a level index of the final discretisation (s1 + 1 Karras levels), drawn as the loss draws its upper level
    σ_{i+1}; x = x0 + σ z, the prediction is the consistency function f(x, σ) (the network given c_in·x at 250·ln σ)
    and its target is x0. So θ and θ^g are compared on f, as L_CM compares them in training."""

    prediction_type = "sample"

    def __init__(self, scheduler: Any) -> None:
        self.objective = ConsistencyObjective(scheduler, total_steps=1)
        self.num_train_timesteps = self.objective.settings.final_levels + 1
        self._sigmas = self.objective.sigmas(self.num_train_timesteps)
        self._upper_probabilities = self.objective.level_probabilities(self._sigmas)  # of σ_{i+1}, i < N - 1

    def sigmas(self, timesteps: Tensor) -> Tensor:
        return self._sigmas.to(timesteps.device)[timesteps]

    def draw_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        lower = torch.multinomial(self._upper_probabilities, n, replacement=True, generator=generator)
        return (lower + 1).to(device)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return x0 + _per_row(self.sigmas(timesteps), x0) * noise

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return x0

    def denoise(self, network: Callable[[Tensor, Tensor], Tensor], noisy: Tensor, timesteps: Tensor) -> Tensor:
        """f(x, σ) = c_skip·x + c_out·F(c_in·x, 250·ln σ), `network(input, time)` being F."""
        c_in, c_skip, c_out, time = self.objective.parametrisation(self.sigmas(timesteps))
        raw = network(_per_row(c_in, noisy) * noisy, time.to(noisy.dtype))
        return _per_row(c_skip, noisy) * noisy + _per_row(c_out, noisy) * raw


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.dtype).view(-1, *[1] * (like.ndim - 1))


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
    c_in, c_skip, c_out, time = objective.parametrisation(sigma_high)
    x_high = x0 + _per_row(sigma_high, x0) * noise
    general_rows, sample_weight = cm_rows(cm, labels, draws)
    outputs = denoiser(_per_row(c_in, x0) * x_high, time.to(x0.dtype), cond_labels, None, general_rows)
    full = _per_row(c_skip, x0) * x_high + _per_row(c_out, x0) * outputs.full
    with torch.no_grad():
        low_in, low_skip, low_out, low_time = objective.parametrisation(sigma_low)
        x_low = x0 + _per_row(sigma_low, x0) * noise
        # θ alone (no θ^g rows), through the module inside a distributed wrapper: no gradient to synchronise here
        teacher = getattr(denoiser, "module", denoiser).theta(
            _per_row(low_in, x0) * x_low, low_time.to(x0.dtype), cond_labels
        )
        target = _per_row(low_skip, x0) * x_low + _per_row(low_out, x0) * teacher
    weight = (1 / (sigma_high - sigma_low)).float()
    loss = (weight * objective.pseudo_huber(full, target)).mean()
    logs = {"base_loss": loss.detach()}
    if cm is not None:
        rows = slice(None) if general_rows is None else general_rows
        general = _per_row(c_skip[rows], x0) * x_high[rows] + _per_row(c_out[rows], x0) * outputs.general
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
