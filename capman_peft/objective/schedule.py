"""The noise schedule of training: how x0 is noised at a timestep and what the denoiser learns to predict there. A
model family's scheduler decides it; the base objectives, Eq. 4's batch, the expert-use report and the analyses all
noise and take targets through it, so none of them knows the parameterisation."""

from __future__ import annotations

from typing import Any

from diffusers.training_utils import compute_snr
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiffusionSchedule:
    """DDPM noising, x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε at integer timesteps t < T, with the scheduler's target: ε, v
    (= √ᾱ ε − √(1 − ᾱ) x0) or x0."""

    def __init__(self, scheduler: Any) -> None:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}: allowed {', '.join(PREDICTION_TYPES)}")
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self._alphas_cumprod = scheduler.alphas_cumprod.float()

    def alphas_cumprod(self, timesteps: Tensor) -> Tensor:
        """ᾱ_t per sample; the table follows the timesteps' device once instead of being copied every step."""
        if self._alphas_cumprod.device != timesteps.device:
            self._alphas_cumprod = self._alphas_cumprod.to(timesteps.device)
        return self._alphas_cumprod[timesteps]

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, timesteps)

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return x0

    def snr(self, timesteps: Tensor) -> Tensor:
        """ᾱ_t / (1 − ᾱ_t) per sample (min-SNR-γ weighting)."""
        return compute_snr(self.scheduler, timesteps)

    def time_fraction(self, timesteps: Tensor) -> Tensor:
        """t / T per sample: how far along the forward process a sample is (CBDM's regulariser weight)."""
        return timesteps.float() / self.num_train_timesteps
