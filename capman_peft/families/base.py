"""What a model family is to the rest of the product: how a batch becomes the denoiser's input, how class ids become
the UNet's condition, and how the UNet is called with it. Training, the expert-use report and `CMDenoiser` go through
this interface and never ask which family they hold.

A condition is one tensor, or a dict of tensors (e.g. SDXL's text embeddings, pooled embeddings and time ids), with one
row per sample in every tensor: it can be stacked and indexed by rows like the batch itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from torch import nn

from ..randomness import StepDraws

Condition = torch.Tensor | dict[str, torch.Tensor]
# The modules of a diffusers UNet that run after the up path begins: `CMDenoiser`'s shared_prefix mode duplicates the
# batch there, so with it experts may sit only in these.
AFTER_SPLIT = ("up_blocks.", "conv_norm_out", "conv_out")


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to `dtype` (memory); trainable ones to float32 (optimizer updates must not round away)."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)
    cast_training_params(model, torch.float32)


def take_rows(cond: Condition, rows: torch.Tensor) -> Condition:
    """The rows `rows` of every tensor of a condition."""
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    return {key: value[rows] for key, value in cond.items()}


def concat(conds: Sequence[Condition]) -> Condition:
    """Conditions stacked along the rows, as the batch they belong to is stacked."""
    if isinstance(conds[0], torch.Tensor):
        return torch.cat(list(conds))
    return {key: torch.cat([cond[key] for cond in conds]) for key in conds[0]}


class ModelFamily:
    """One model family (class-conditional UNet, Stable Diffusion, ...): the parts of a training step, the expert-use
    report and sampling that differ between families.

    Subclasses set ``name`` and implement :meth:`encode`, :meth:`condition` and :meth:`unet_kwargs`.
    """

    name: str = ""

    def encode(self, batch: Mapping[str, Any], draws: StepDraws | None) -> torch.Tensor:
        """The batch in the denoiser's input space (pixels, or VAE latents): x0. `draws` carries the step's flips and
        posterior noise where the family draws them; None gives the deterministic encoding (the posterior mean)."""
        raise NotImplementedError

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        """The UNet's condition for `class_ids` (the null class is ``num_classes``); `batch` gives what a family
        takes per image besides the class (e.g. original sizes), `draws` the step's random choices it conditions on
        (e.g. the +ADA augmentation); without them, the condition a sampler uses."""
        raise NotImplementedError

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        """The UNet call's keyword arguments for a condition."""
        raise NotImplementedError

    def predict(self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The UNet's prediction for `sample` at `timestep` under `cond`."""
        return unet(sample, timestep, **self.unet_kwargs(cond), return_dict=False)[0]
