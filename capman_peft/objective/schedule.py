"""The noise schedule of training: how timesteps are drawn, how x0 is noised at a timestep, what the denoiser is
given as its time input and learns to predict there. A model family's scheduler decides it (:func:`noise_schedule`);
the base objectives, Eq. 4's batch, the expert-use report and the analyses all noise and take targets through it, so
none of them knows the parameterisation.

A timestep is an integer index t < T into the schedule's tables in every kind: DDPM's t itself, the row of a flow
scheduler's σ table (what diffusers' SD3 and Flux scripts index with ``(u * T).long()``), or a consistency model's
noise level (:class:`ConsistencyNoiseSchedule`: its levels and parametrisation are consistency training's, whose
loss draws its own level pairs; the expert-use report and the analyses probe a consistency model through it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import CMStochasticIterativeScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Every schedule's prediction_type -> the symbol of what the network predicts (for reports: ε, v or x₀).
PREDICTED = {"epsilon": "ε", "v_prediction": "v", "flow": "v", "sample": "x₀"}
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")


@dataclass(frozen=True)
class FlowWeighting:
    """How a flow-matching run draws σ and weights the loss: diffusers' SD3/Flux ``--weighting_scheme`` and its
    options, with their defaults."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


class DiffusionSchedule:
    """DDPM noising, x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε at integer timesteps t < T drawn uniformly, with the scheduler's
    target: ε, v (= √ᾱ ε − √(1 − ᾱ) x0) or x0."""

    def __init__(self, scheduler: Any) -> None:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}: allowed {', '.join(PREDICTION_TYPES)}")
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self._alphas_cumprod = scheduler.alphas_cumprod.float()

    def draw_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)

    def denoiser_timesteps(self, timesteps: Tensor) -> Tensor:
        """The denoiser's time input at `timesteps`: t itself."""
        return timesteps

    def denoise(self, network: Callable[[Tensor, Tensor], Tensor], noisy: Tensor, timesteps: Tensor) -> Tensor:
        """The prediction at `noisy`: the network's own output, `network(input, time)`."""
        return network(noisy, self.denoiser_timesteps(timesteps))

    def alphas_cumprod(self, timesteps: Tensor) -> Tensor:
        """ᾱ_t per sample; the table follows the timesteps' device once instead of being copied every step."""
        if self._alphas_cumprod.device != timesteps.device:
            self._alphas_cumprod = self._alphas_cumprod.to(timesteps.device)
        return self._alphas_cumprod[timesteps]

    def squared_mixing(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """(a², b²) per sample in float64 with x_t = a·x0 + b·ε: (ᾱ, 1 − ᾱ)."""
        alphas = self.alphas_cumprod(timesteps).double()
        return alphas, 1 - alphas

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, timesteps)

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return x0

    def loss_weight(self, timesteps: Tensor) -> Tensor | None:
        """A per-sample weight of the loss the schedule itself asks for (none for DDPM)."""
        return None

    def snr(self, timesteps: Tensor) -> Tensor:
        """ᾱ_t / (1 − ᾱ_t) per sample (min-SNR-γ weighting)."""
        return compute_snr(self.scheduler, timesteps)

    def time_fraction(self, timesteps: Tensor) -> Tensor:
        """t / T per sample: how far along the forward process a sample is (CBDM's regulariser weight)."""
        return timesteps.float() / self.num_train_timesteps


class FlowMatchingSchedule:
    """Rectified flow as diffusers' SD3 and Flux LoRA scripts train it: σ = sigmas[t] with t = ⌊u·T⌋ and u drawn by
    `compute_density_for_timestep_sampling`, x_t = (1 − σ)·x0 + σ·ε, the denoiser given σ·T (the scheduler's
    timesteps), the target the velocity ε − x0, weighted per sample by `compute_loss_weighting_for_sd3`."""

    prediction_type = "flow"

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, weighting: FlowWeighting | None = None) -> None:
        self.scheduler = scheduler
        self.weighting = weighting or FlowWeighting()
        if self.weighting.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"weighting_scheme {self.weighting.weighting_scheme!r}: allowed {', '.join(WEIGHTING_SCHEMES)}"
            )
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        # The training tables, as set at construction (a later set_timesteps for sampling must not change them).
        self._sigmas = scheduler.sigmas[: self.num_train_timesteps].float().clone()
        self._timesteps = scheduler.timesteps[: self.num_train_timesteps].float().clone()

    def draw_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        w = self.weighting
        u = compute_density_for_timestep_sampling(
            w.weighting_scheme, n, w.logit_mean, w.logit_std, w.mode_scale, device=device, generator=generator
        )
        return (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)

    def _table(self, name: str, timesteps: Tensor) -> Tensor:
        table = getattr(self, name)
        if table.device != timesteps.device:
            table = table.to(timesteps.device)
            setattr(self, name, table)
        return table[timesteps]

    def sigmas(self, timesteps: Tensor) -> Tensor:
        return self._table("_sigmas", timesteps)

    def denoiser_timesteps(self, timesteps: Tensor) -> Tensor:
        """The denoiser's time input at `timesteps`: σ·T, as the scheduler's sampling loop gives it."""
        return self._table("_timesteps", timesteps)

    denoise = DiffusionSchedule.denoise

    def squared_mixing(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """((1 − σ)², σ²) per sample in float64."""
        sigmas = self.sigmas(timesteps).double()
        return (1 - sigmas).pow(2), sigmas.pow(2)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        sigmas = per_row(self.sigmas(timesteps), x0)
        return (1 - sigmas) * x0 + sigmas * noise

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return noise - x0

    def loss_weight(self, timesteps: Tensor) -> Tensor | None:
        if self.weighting.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None  # diffusers' weight is 1 for the other schemes
        return compute_loss_weighting_for_sd3(self.weighting.weighting_scheme, self.sigmas(timesteps)).float()

    def snr(self, timesteps: Tensor) -> Tensor:
        raise ValueError("min-SNR weighting (snr_gamma) is for DDPM schedules; flow matching uses weighting_scheme")

    def time_fraction(self, timesteps: Tensor) -> Tensor:
        """σ per sample: how far along the flow from data to noise a sample is."""
        return self.sigmas(timesteps)


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


class ConsistencyNoiseSchedule:
    """A consistency model's noise (iCT): the Karras levels, the lognormal over them and the parametrisation of
    diffusers' ``CMStochasticIterativeScheduler``. As a probe, a timestep is a level index of the final
    discretisation (s1 + 1 levels), drawn as the loss draws its upper level σ_{i+1}; x = x0 + σ z, the prediction is
    the consistency function f(x, σ) and its target x0, so θ and θ^g are compared on f, as L_CM compares them."""

    prediction_type = "sample"

    def __init__(self, scheduler: Any) -> None:
        config = scheduler.config
        self.settings = ConsistencySettings(
            sigma_min=config.sigma_min, sigma_max=config.sigma_max, rho=config.rho, sigma_data=config.sigma_data
        )
        self.num_train_timesteps = self.settings.final_levels + 1
        self._levels = self.karras_sigmas(self.num_train_timesteps)
        self._upper_probabilities = self.level_probabilities(self._levels)  # of σ_{i+1}, i < N - 1

    def karras_sigmas(self, levels: int) -> Tensor:
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

    def parametrisation(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_in, c_skip, c_out, the UNet's time input) at σ, as the scheduler samples."""
        s = self.settings
        c_in = (sigma**2 + s.sigma_data**2).rsqrt()
        c_skip = s.sigma_data**2 / ((sigma - s.sigma_min) ** 2 + s.sigma_data**2)
        c_out = (sigma - s.sigma_min) * s.sigma_data / (sigma**2 + s.sigma_data**2).sqrt()
        return c_in, c_skip, c_out, 1000 * 0.25 * torch.log(sigma + 1e-44)

    def sigmas(self, timesteps: Tensor) -> Tensor:
        """σ at the level indices `timesteps` of the final discretisation."""
        return self._levels.to(timesteps.device)[timesteps]

    def draw_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        lower = torch.multinomial(self._upper_probabilities, n, replacement=True, generator=generator)
        return (lower + 1).to(device)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return x0 + per_row(self.sigmas(timesteps), x0) * noise

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return x0

    def denoise(self, network: Callable[[Tensor, Tensor], Tensor], noisy: Tensor, timesteps: Tensor) -> Tensor:
        """f(x, σ) = c_skip·x + c_out·F(c_in·x, 250·ln σ), `network(input, time)` being F."""
        c_in, c_skip, c_out, time = self.parametrisation(self.sigmas(timesteps))
        raw = network(per_row(c_in, noisy) * noisy, time.to(noisy.dtype))
        return per_row(c_skip, noisy) * noisy + per_row(c_out, noisy) * raw


def per_row(values: Tensor, like: Tensor) -> Tensor:
    """One value per sample, shaped to broadcast over `like`'s rows (in its dtype)."""
    return values.to(like.dtype).view(-1, *[1] * (like.ndim - 1))


NoiseSchedule = DiffusionSchedule | FlowMatchingSchedule | ConsistencyNoiseSchedule


def noise_schedule(scheduler: Any, weighting: FlowWeighting | None = None) -> NoiseSchedule:
    """The training schedule of a family's scheduler: flow matching for a flow-matching scheduler, consistency
    training's levels for a consistency scheduler (what the analyses probe it with), else DDPM."""
    if isinstance(scheduler, CMStochasticIterativeScheduler) and weighting is None:
        return ConsistencyNoiseSchedule(scheduler)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchingSchedule(scheduler, weighting)
    if weighting is not None:
        raise ValueError(f"a weighting scheme is for flow-matching schedulers, not {type(scheduler).__name__}")
    return DiffusionSchedule(scheduler)
