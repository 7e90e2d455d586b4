"""Flux (FLUX.1-dev, -schnell): a rectified-flow transformer on packed VAE latents (2 x 2 latent patches as tokens,
with their positions as image ids), conditioned on T5's token embeddings and CLIP's pooled embedding and, where the
checkpoint is guidance-distilled (dev), on the guidance scale.

Trained as diffusers' Flux LoRA script trains it: σ from the scheduler's table as constructed (Flux's resolution-
dependent shift is applied by ``FluxPipeline`` when it samples), ``--weighting_scheme none`` by default, the
transformer given σ (``timestep / 1000``) and ``--guidance_scale`` as its guidance input. Everything else — the latent
cache, captions, class prompt tables, the flow schedule, the CM distance on the velocity predictions — is the SD3
family's (:class:`StableDiffusion3Family`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..data import LabelledImageDataset
from ..randomness import StepDraws
from ..settings import TrainingSettings
from .base import Condition
from .pretrained import Base
from .registry import register_family
from .stable_diffusion_3 import StableDiffusion3Family

# Attention and feed-forward layers of the double-stream blocks (image and text): diffusers' Flux LoRA script's.
FLUX_TARGETS = (
    "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
    "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
)


@register_family
class FluxFamily(StableDiffusion3Family):
    """x0 is the VAE latent, (z − shift)·scale, packed into tokens only around the transformer call (the objectives
    and the CM distance see the unpacked latent); the condition of class c is row c of the prompt tables (T5
    embeddings, CLIP pooled embedding; row C, the empty prompt's, is the null condition), with the guidance input
    for a guidance-distilled transformer."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    pipeline_type = FluxPipeline
    denoiser_class = FluxTransformer2DModel
    flag_defaults = {  # diffusers' Flux LoRA script's (its resolution default, 512, too)
        "resolution": 512, "target_modules": FLUX_TARGETS, "guidance_scale": 3.5, "max_sequence_length": 512,
        "weighting_scheme": "none",
    }  # fmt: skip
    guidance_embedded = True
    optional_text_encoders = ()  # FluxPipeline needs T5
    text_components = (
        ("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModel),
        ("tokenizer_2", T5TokenizerFast, "text_encoder_2", T5EncoderModel),
    )
    guidance: float | None = None
    """The guidance input of a guidance-distilled transformer (None: it has none, e.g. schnell)."""

    @classmethod
    def block_counts(cls, config: Mapping[str, Any]) -> list[tuple[str, int]]:
        double, single = config["num_layers"], config["num_single_layers"]
        return [("transformer_blocks", double), ("single_transformer_blocks", single)]

    @classmethod
    def denoiser_downsampling(cls, denoiser: nn.Module) -> int:
        return 2  # 2 x 2 latent patches are packed into one token

    @classmethod
    def encode_prompts(cls, pipeline: Any, prompts: list[str], max_sequence_length: int) -> tuple[Any, Any]:
        """(T5 embeddings, CLIP pooled embedding), from ``FluxPipeline.encode_prompt`` (the text ids are all zero:
        made at the transformer call)."""
        hidden, pooled, _ = pipeline.encode_prompt(
            prompts, None, device=pipeline.text_encoder.device, max_sequence_length=max_sequence_length
        )
        return hidden, pooled

    @classmethod
    def load_base(
        cls, settings: TrainingSettings, dataset: LabelledImageDataset, dtype: torch.dtype, device: torch.device
    ) -> Base:
        base = super().load_base(settings, dataset, dtype, device)
        if base.denoiser.config.guidance_embeds:
            base.family.guidance = settings.model.guidance_embedding
        return base

    @classmethod
    def from_pipeline(cls, pipe: Any, prompts: list[str] | None = None) -> FluxFamily:
        """The family of a saved Flux pipeline; a guidance-distilled one gets diffusers' default guidance, 3.5."""
        family = super().from_pipeline(pipe, prompts)
        if pipe.transformer.config.guidance_embeds:
            family.guidance = cls.flag_defaults["guidance_scale"]
        return family

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        cond = super().condition(class_ids, batch, draws)
        if self.guidance is not None:  # one value per row, so conditions stack and split like the batch
            cond["guidance"] = torch.full((len(class_ids),), self.guidance, device=class_ids.device)
        return cond

    def predict(self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Pack the latent into 2 x 2 patch tokens with their image ids, call the transformer with σ (it multiplies
        its time and guidance inputs by 1000 itself) and unpack its velocity to the latent's shape."""
        batch, channels, height, width = sample.shape
        text = cond["encoder_hidden_states"]
        prediction = unet(
            hidden_states=FluxPipeline._pack_latents(sample, batch, channels, height, width),
            timestep=timestep / 1000,
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=sample.device, dtype=sample.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, sample.device, sample.dtype),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(prediction, height, width, vae_scale_factor=1)
