"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained with rectified flow on VAE latents (shifted and scaled),
conditioned on the joint text embedding of two CLIP encoders and T5 and on their pooled embedding.

Everything but the condition, the transformer call, the scheduler and the LoRA writer is Stable Diffusion's
(:class:`StableDiffusionFamily`): the latent cache, the per-image captions, the class prompt table with the empty
prompt as the null condition. The noise schedule follows from the flow-matching scheduler
(``capman_peft.objective.schedule.FlowMatchingSchedule``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..errors import ConfigError
from ..objective import FlowWeighting
from ..randomness import StepDraws
from ..settings import TrainingSettings
from .base import Condition
from .pretrained import base_source, module_spec
from .registry import register_family
from .stable_diffusion import StableDiffusionFamily

# The joint-attention projections of every block, image and text stream: diffusers' SD3 LoRA script's targets.
SD3_TARGETS = (
    "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out"
)


class PipelinePromptEncoder:
    """The text encoders of a transformer family, encoding as the family's pipeline does (its ``encode_prompt`` is
    called, through the family's :meth:`StableDiffusion3Family.encode_prompts`)."""

    def __init__(self, family: type[StableDiffusion3Family], pipeline: Any, max_sequence_length: int) -> None:
        self.family = family
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.family.encode_prompts(self.pipeline, prompts, self.max_sequence_length)
        return hidden.float(), pooled.float()


@register_family
class StableDiffusion3Family(StableDiffusionFamily):
    """x0 is the VAE latent, (z − shift)·scale; the condition of class c is row c of the prompt tables (joint text
    embedding and pooled embedding; row C, the empty prompt's, is the null condition)."""

    name = "stable-diffusion-3"
    pipeline_class = "StableDiffusion3Pipeline"
    pipeline_type = StableDiffusion3Pipeline
    denoiser = "transformer"
    denoiser_class = SD3Transformer2DModel
    flag_defaults = {  # diffusers' SD3 LoRA script's
        "resolution": 512, "target_modules": SD3_TARGETS, "guidance_scale": 7.5, "max_sequence_length": 77,
        "weighting_scheme": "logit_normal",
    }  # fmt: skip
    scheduler_class = FlowMatchEulerDiscreteScheduler
    bottleneck_module = None  # a transformer keeps its token resolution throughout: no bottleneck for --coral
    sampler = "the base's flow-matching Euler scheduler"
    text_components = (
        ("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModelWithProjection),
        ("tokenizer_2", CLIPTokenizer, "text_encoder_2", CLIPTextModelWithProjection),
        ("tokenizer_3", T5TokenizerFast, "text_encoder_3", T5EncoderModel),
    )
    optional_text_encoders = ("text_encoder_3",)  # T5: --drop_t5 trains on the CLIP encoders alone

    def __init__(
        self,
        vae: Any = None,
        cond_table: torch.Tensor | None = None,
        pooled_table: torch.Tensor | None = None,
        captions: PipelinePromptEncoder | None = None,
    ) -> None:
        super().__init__(vae, cond_table, captions)
        self.pooled_table = pooled_table

    @classmethod
    def check_settings(cls, settings: TrainingSettings) -> None:
        if settings.objective.coral:
            raise ConfigError(
                f"--coral: contrasts a UNet's bottleneck (its mid block); the base is a {cls.pipeline_class}, whose "
                "transformer has none; allowed: --coral with a UNet base (SD 1.x/2.x, SDXL) or in train_unet_cm.py"
            )
        cls.check_text_encoders(settings)
        if settings.objective.snr_gamma is not None:
            raise ConfigError(
                f"--snr_gamma {settings.objective.snr_gamma}: min-SNR weighting is for DDPM schedules; allowed for "
                f"{cls.name}: --weighting_scheme (sigma_sqrt, cosmap, ...)"
            )

    @classmethod
    def card_note(cls, settings: TrainingSettings) -> str:
        if not settings.model.drop_t5:
            return ""
        return (
            " Trained without T5 (`--drop_t5`); the folder keeps the base's T5, and `from_pretrained(path, "
            "text_encoder_3=None, tokenizer_3=None)` samples as the model was trained."
        )

    @classmethod
    def load_kwargs(cls, summary: Mapping[str, Any]) -> dict[str, Any]:
        """A run trained with ``--drop_t5`` is loaded without T5, as it was trained."""
        return {"text_encoder_3": None, "tokenizer_3": None} if summary.get("args", {}).get("drop_t5") else {}

    @classmethod
    def block_counts(cls, config: Mapping[str, Any]) -> list[tuple[str, int]]:
        """The transformer's block lists in the order they run, with their lengths (from its config)."""
        return [("transformer_blocks", config["num_layers"])]

    @classmethod
    def later_blocks(cls, config: Mapping[str, Any]) -> list[str]:
        """The names of the later half of the blocks: where ``--cm_forward shared_prefix`` puts the experts."""
        names = [f"{blocks}.{i}" for blocks, count in cls.block_counts(config) for i in range(count)]
        return names[len(names) // 2 :]

    @classmethod
    def split_modules(cls, denoiser: nn.Module) -> list[nn.Module]:
        return [denoiser.get_submodule(name) for name in cls.later_blocks(denoiser.config)] + [denoiser.norm_out]

    @classmethod
    def after_split(cls, denoiser: nn.Module) -> tuple[str, ...]:
        return (*(f"{name}." for name in cls.later_blocks(denoiser.config)), "norm_out", "proj_out")

    @classmethod
    def resolve(cls, settings: TrainingSettings) -> TrainingSettings:
        """Under ``--cm_forward shared_prefix`` without ``--expert_target_modules``, the experts go on the target
        layers of the later half of the blocks (the earlier half then runs once for θ and θ^g)."""
        model, objective = settings.model, settings.objective
        shared = objective.capacity_manipulation and objective.cm_forward == "shared_prefix"
        if not shared or model.expert_target_modules:
            return settings
        if isinstance(module_spec(model.target_modules), str):
            raise ConfigError(
                f"--cm_forward shared_prefix: the later half of the blocks cannot be combined with the regex "
                f"--target_modules {model.target_modules}; allowed: --expert_target_modules naming the layers"
            )
        config = cls.denoiser_class.load_config(
            base_source(settings), subfolder=cls.denoiser, revision=model.revision, cache_dir=settings.data.cache_dir
        )
        blocks = "|".join(re.escape(name) for name in cls.later_blocks(config))
        layers = "|".join(re.escape(name) for name in module_spec(model.target_modules))
        experts = rf"(?:{blocks})\.(?:.*\.)?(?:{layers})"
        return replace(settings, model=replace(model, expert_target_modules=experts))

    @classmethod
    def weighting(cls, settings: TrainingSettings) -> FlowWeighting:
        sd = settings.model
        return FlowWeighting(sd.weighting_scheme, sd.logit_mean, sd.logit_std, sd.mode_scale)

    @classmethod
    def inference_scheduler(cls, noise_scheduler: SchedulerMixin) -> SchedulerMixin:
        """The base's flow-matching Euler scheduler (SD3's own sampler)."""
        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    @classmethod
    def denoiser_downsampling(cls, denoiser: nn.Module) -> int:
        return denoiser.config.patch_size

    @classmethod
    def prompt_encoder(
        cls, tokenizers: list[Any], text_encoders: list[Any], settings: TrainingSettings, denoiser: nn.Module
    ) -> Any:
        parts = {}
        for (tokenizer, _, encoder, _), *loaded in zip(cls.text_components, tokenizers, text_encoders, strict=True):
            parts.update(zip((tokenizer, encoder), loaded, strict=True))
        # The transformer only sizes the zeros that stand in for a dropped T5.
        pipeline = cls.pipeline_type(transformer=denoiser, scheduler=None, vae=None, **parts)
        return PipelinePromptEncoder(cls, pipeline, settings.model.max_sequence_length)

    @classmethod
    def encode_prompts(cls, pipeline: Any, prompts: list[str], max_sequence_length: int) -> tuple[Any, Any]:
        """(joint text embedding, pooled embedding) of `prompts`, from the pipeline's own ``encode_prompt``: CLIP
        hidden states padded to T5's width and followed by T5's, pooled = both CLIP projections side by side."""
        hidden, _, pooled, _ = pipeline.encode_prompt(
            prompts, None, None, device=pipeline.text_encoder.device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        return hidden, pooled

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        hidden, pooled = self.text(class_ids, batch, draws)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        return dict(cond)

    def predict(self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> torch.Tensor:
        return unet(hidden_states=sample, timestep=timestep, **self.unet_kwargs(cond), return_dict=False)[0]

    @classmethod
    def from_pipeline(cls, pipe: Any, prompts: list[str] | None = None) -> StableDiffusion3Family:
        cond_table, pooled_table = PipelinePromptEncoder(cls, pipe, cls.flag_defaults["max_sequence_length"])(prompts)
        return cls(pipe.vae, cond_table, pooled_table)

    @classmethod
    def make(
        cls, vae: Any, tables: tuple[torch.Tensor, torch.Tensor | None], resolution: int, captions: Any
    ) -> StableDiffusion3Family:
        return cls(vae, tables[0], tables[1], captions)

    def grid_pipeline(self, denoiser: nn.Module, noise_scheduler: SchedulerMixin) -> Any:
        no_text = {name: None for tokenizer, _, encoder, _ in self.text_components for name in (tokenizer, encoder)}
        pipeline = self.pipeline_type(
            transformer=denoiser, scheduler=self.inference_scheduler(noise_scheduler), vae=self.vae, **no_text
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @classmethod
    def write_lora(cls, layers: dict[str, torch.Tensor], output_dir: Path, weight_name: str) -> None:
        cls.pipeline_type.save_lora_weights(str(output_dir), transformer_lora_layers=layers, weight_name=weight_name)
