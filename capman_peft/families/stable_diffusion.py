"""Stable Diffusion 1.x/2.x (ε or v prediction): VAE latents in, class prompts' text embeddings as the condition."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..randomness import StepDraws
from .base import Condition, ModelFamily


def sample_latents(moments: torch.Tensor, noise: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """z = (mean + std * noise) * scaling_factor: diffusers' ``latent_dist.sample()``, with the step's seeded noise."""
    posterior = DiagonalGaussianDistribution(moments.float())
    return (posterior.mean + posterior.std * noise) * scaling_factor


class StableDiffusionFamily(ModelFamily):
    """x0 is the VAE latent of the image; the condition of class c is row c of `cond_table` (the text embedding of
    the class prompt; row C, the empty prompt's, is the null condition).

    Args:
        vae: the pipeline's VAE (frozen); None for a family that only calls the UNet.
        cond_table: (C + 1, tokens, dim) text embeddings, encoded once per run; None likewise.
    """

    name = "stable-diffusion"

    def __init__(self, vae: Any = None, cond_table: torch.Tensor | None = None) -> None:
        self.vae = vae
        self.cond_table = cond_table

    def moments(self, batch: Mapping[str, Any], draws: StepDraws | None) -> torch.Tensor:
        """VAE posterior moments of a batch: picked from the latent cache by the drawn flips, or encoded now."""
        if "moments" in batch:
            moments = batch["moments"]
            flips = draws.flip if draws is not None else None
            state = flips.long() if flips is not None else torch.zeros(len(moments), dtype=torch.long)
            return moments[torch.arange(len(moments), device=moments.device), state.to(moments.device)]
        pixels = batch["pixel_values"]
        if draws is not None and draws.flip is not None:
            pixels = torch.where(draws.flip[:, None, None, None], pixels.flip(-1), pixels)
        with torch.no_grad():
            return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.parameters

    def encode(self, batch: Mapping[str, Any], draws: StepDraws | None) -> torch.Tensor:
        if draws is None:  # deterministic: the posterior mean
            with torch.no_grad():
                pixels = batch["pixel_values"].to(self.vae.dtype)
                return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        return sample_latents(self.moments(batch, draws), draws.latent_noise, self.vae.config.scaling_factor)

    def condition(self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None) -> Condition:
        return self.cond_table[class_ids]

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        return {"encoder_hidden_states": cond}
