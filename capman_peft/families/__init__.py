"""Model families: the one place that knows how a family's pipeline, batch, condition and denoiser look.

* ``base.py``: :class:`ModelFamily` (the interface) and the row operations on conditions;
* ``registry.py``: the table of families keyed by pipeline class (:func:`register_family`, :func:`family_class`);
* ``class_conditional.py``: the class-conditional ``UNet2DModel`` trained from scratch (pixels, class ids);
* ``pretrained.py``, ``pretrained_output.py``: what every family fine-tuned from a pretrained pipeline adds to the
  interface (:class:`PretrainedFamily`) and shares (settings, loading, adapter, export, card);
* ``stable_diffusion.py``: Stable Diffusion 1.x/2.x and SDXL (VAE latents, class prompts' text embeddings; SDXL adds
  the pooled embedding and the time ids);
* ``stable_diffusion_3.py``: Stable Diffusion 3/3.5 (MMDiT transformer, rectified flow, CLIP + T5 prompts);
* ``flux.py``: Flux (packed latents, T5 + CLIP pooled prompts, the guidance input of guidance-distilled checkpoints).
"""

from __future__ import annotations

from .base import AFTER_SPLIT, Condition, ModelFamily, cast_frozen_weights, concat, take_rows
from .class_conditional import ClassConditionalFamily
from .flux import FluxFamily
from .pretrained import PretrainedFamily
from .registry import (
    FAMILIES,
    family_class,
    family_named,
    family_of_denoiser,
    family_of_pipeline,
    pipeline_resolution,
    register_family,
)
from .stable_diffusion import StableDiffusionFamily, StableDiffusionXLFamily
from .stable_diffusion_3 import StableDiffusion3Family

__all__ = [
    "AFTER_SPLIT",
    "FAMILIES",
    "ClassConditionalFamily",
    "Condition",
    "FluxFamily",
    "ModelFamily",
    "PretrainedFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "cast_frozen_weights",
    "concat",
    "family_class",
    "family_named",
    "family_of_denoiser",
    "family_of_pipeline",
    "pipeline_resolution",
    "register_family",
    "take_rows",
]
