"""Model families: the one place that knows how a family's batch, condition and UNet call look.

* ``base.py``: :class:`ModelFamily` (the interface) and the row operations on conditions;
* ``class_conditional.py``: the class-conditional ``UNet2DModel`` (pixels, class ids);
* ``stable_diffusion.py``: Stable Diffusion 1.x/2.x and SDXL (VAE latents, class prompts' text embeddings; SDXL adds
  the pooled embedding and the time ids).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data import encode_prompts
from ..run_folder import pipeline_resolution
from .base import AFTER_SPLIT, Condition, ModelFamily, cast_frozen_weights, concat, take_rows
from .class_conditional import ClassConditionalFamily
from .stable_diffusion import StableDiffusionFamily, StableDiffusionXLFamily, encode_prompts_xl, sample_latents


def family_of_pipeline(pipe: Any, prompts: list[str] | None = None) -> ModelFamily:
    """The family of a loaded pipeline, ready to encode images and class ids: class-conditional, Stable Diffusion
    or SDXL (`prompts`: one per class, encoded here once with the pipeline's text encoder(s))."""
    if not hasattr(pipe, "text_encoder"):
        return ClassConditionalFamily()
    if getattr(pipe, "text_encoder_2", None) is not None:
        cond_table, pooled_table = encode_prompts_xl(
            [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], prompts
        )
        return StableDiffusionXLFamily(pipe.vae, cond_table, pooled_table, pipeline_resolution(pipe))
    return StableDiffusionFamily(pipe.vae, encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts))


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
    "StableDiffusionXLFamily",
    "family_of_pipeline",
    "concat",
    "family_of_unet",
    "sample_latents",
    "take_rows",
]
