"""The noise schedule of training: how timesteps are drawn, how x0 is noised at a timestep, what the denoiser is
given as its time input and learns to predict there. A model family's scheduler decides it (:func:`noise_schedule`);
the base objectives, Eq. 4's batch, the expert-use report and the analyses all noise and take targets through it, so
none of them knows the parameterisation.

A timestep is an integer index t < T into the schedule's tables in every kind: DDPM's t itself, the row of a flow
scheduler's σ table (what diffusers' SD3 and Flux scripts index with ``(u * T).long()``), or a consistency model's
noise level (:class:`capman_peft.objective.consistency.ConsistencyNoiseSchedule`, which only probes: consistency
training draws its own level pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import CMStochasticIterativeScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
from torch import Tensor

if TYPE_CHECKING:
    from .consistency import ConsistencyNoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
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
        sigmas = self.sigmas(timesteps).reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
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


NoiseSchedule = DiffusionSchedule | FlowMatchingSchedule


def noise_schedule(scheduler: Any, weighting: FlowWeighting | None = None) -> NoiseSchedule | ConsistencyNoiseSchedule:
    """The training schedule of a family's scheduler: flow matching for a flow-matching scheduler, consistency
    training's levels for a consistency scheduler (what the analyses probe it with), else DDPM."""
    if isinstance(scheduler, CMStochasticIterativeScheduler) and weighting is None:
        from .consistency import ConsistencyNoiseSchedule  # consistency builds on the objectives that import this

        return ConsistencyNoiseSchedule(scheduler)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchingSchedule(scheduler, weighting)
    if weighting is not None:
        raise ValueError(f"a weighting scheme is for flow-matching schedulers, not {type(scheduler).__name__}")
    return DiffusionSchedule(scheduler)
