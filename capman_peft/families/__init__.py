"""Model families: the one place that knows how a family's batch, condition and UNet call look.

* ``base.py``: :class:`ModelFamily` (the interface) and the row operations on conditions;
* ``class_conditional.py``: the class-conditional ``UNet2DModel`` (pixels, class ids);
* ``stable_diffusion.py``: Stable Diffusion 1.x/2.x (VAE latents, class prompts' text embeddings).
"""

from __future__ import annotations

from torch import nn

from .base import AFTER_SPLIT, Condition, ModelFamily, cast_frozen_weights, concat, take_rows
from .class_conditional import ClassConditionalFamily
from .stable_diffusion import StableDiffusionFamily, sample_latents


def family_of_unet(unet: nn.Module) -> ModelFamily:
    """The family a bare UNet belongs to, for callers that hold only the UNet: text-conditional UNets (cross
    attention) take their condition as ``encoder_hidden_states``, the others as ``class_labels``; no VAE or prompt
    table comes with it, so it can call the UNet but not encode images or class ids."""
    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    if getattr(base.config, "cross_attention_dim", None) is not None:
        return StableDiffusionFamily()
    return ClassConditionalFamily()


__all__ = [
    "AFTER_SPLIT",
    "ClassConditionalFamily",
    "Condition",
    "ModelFamily",
    "cast_frozen_weights",
    "StableDiffusionFamily",
    "concat",
    "family_of_unet",
    "sample_latents",
    "take_rows",
]
