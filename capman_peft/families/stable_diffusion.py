"""Stable Diffusion 1.x/2.x (ε or v prediction) and SDXL: VAE latents in, class prompts' text embeddings as the
condition (SDXL adds the pooled embedding and the time ids).

The families' parts: the step's x0 and condition (:class:`StableDiffusionFamily`, :class:`StableDiffusionXLFamily`),
loading the base pipeline's components and encoding the class prompts once (:meth:`StableDiffusionFamily.load_base`),
the grid pipeline, the LoRA writer and the latent cache. What every fine-tuned family shares is in ``pretrained.py``
and ``pretrained_output.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import free_memory
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..data import LabelledImageDataset, chosen_captions, class_prompts, encode_prompts
from ..errors import ConfigError
from ..hub import load_model_config
from ..randomness import StepDraws
from ..settings import TrainingSettings
from .base import Condition, cast_frozen_weights
from .pretrained import (
    Base,
    PretrainedFamily,
    base_source,
    load_component,
    load_denoiser,
    load_vae,
    prompts_per_class,
)
from .registry import pipeline_resolution, register_family


def latent_scale(vae: Any) -> tuple[float, float]:
    """(shift, scale) of the VAE's latents: z = (sample − shift) · scale (SD3 and Flux shift; SD does not)."""
    return vae.config.get("shift_factor") or 0.0, vae.config.scaling_factor


def sample_latents(moments: torch.Tensor, noise: torch.Tensor, vae: Any) -> torch.Tensor:
    """z = (mean + std * noise − shift) * scale: diffusers' ``latent_dist.sample()``, with the step's seeded noise."""
    posterior = DiagonalGaussianDistribution(moments.float())
    shift, scale = latent_scale(vae)
    return (posterior.mean + posterior.std * noise - shift) * scale


# From scratch, the expert of every weight matrix of the up path (paper G.1): the resnets' convs and time-embedding
# projections, the transformer blocks' attention, input / output projections and feed-forward layers, the upsamplers.
SCRATCH_EXPERT_TARGETS = (
    r"up_blocks\..*\.(conv1|conv2|conv_shortcut|time_emb_proj|to_q|to_k|to_v|to_out\.0|proj_in|proj_out|"
    r"ff\.net\.0\.proj|ff\.net\.2|upsamplers\.\d+\.conv)"
)


class PromptEncoder:
    """The frozen tokenizers and text encoders of a pipeline (two for SDXL): text embeddings as its pipeline makes
    them, and SDXL's pooled embeddings."""

    def __init__(self, tokenizers: Sequence[Any], text_encoders: Sequence[Any]) -> None:
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompts, tokens, dim) embeddings and (prompts, dim) pooled embeddings (None for SD 1.x/2.x), float32."""
        if len(self.text_encoders) == 2:
            hidden, pooled = encode_prompts_xl(self.tokenizers, self.text_encoders, prompts)
            return hidden.float(), pooled.float()
        return encode_prompts(self.tokenizers[0], self.text_encoders[0], prompts).float(), None


@register_family
class StableDiffusionFamily(PretrainedFamily):
    """x0 is the VAE latent of the image; the condition of class c is row c of `cond_table` (the text embedding of
    the class prompt; row C, the empty prompt's, is the null condition).

    With `captions` (data with per-image captions) a training batch's rows are conditioned on their own captions,
    encoded per step as diffusers' text-to-image scripts do (a table of every caption would grow with the data);
    label-dropped rows still get the empty prompt, and everything without a batch (the validation grid, the
    expert-use report, evaluation) uses the class prompts.

    Args:
        vae: the pipeline's VAE (frozen); None for a family that only calls the UNet.
        cond_table: (C + 1, tokens, dim) text embeddings, encoded once per run; None likewise.
        captions: the prompt encoder for the batch's ``"caption"`` entries.
    """

    name = "stable-diffusion"
    pipeline_class = "StableDiffusionPipeline"
    pipeline_type = StableDiffusionPipeline
    denoiser_class = UNet2DConditionModel
    # The attention projections, as diffusers' LoRA scripts; the paper's miniSD resolution.
    flag_defaults: Mapping[str, Any] = {
        "resolution": 256, "target_modules": "to_q,to_k,to_v,to_out.0", "guidance_scale": 7.5
    }  # fmt: skip
    text_components: tuple[tuple[str, Any, str, Any], ...] = (
        ("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModel),
    )
    """(tokenizer folder and class, text encoder folder and class) of each text encoder of the pipeline."""

    trains_from_scratch = True

    def __init__(
        self, vae: Any = None, cond_table: torch.Tensor | None = None, captions: PromptEncoder | None = None
    ) -> None:
        self.vae = vae
        self.cond_table = cond_table
        self.captions = captions
        self.pooled_table: torch.Tensor | None = None

    @classmethod
    def resolve(cls, settings: TrainingSettings) -> TrainingSettings:
        """From scratch: the UNet config sized to the base's latents (``sample_size``) and checked against its VAE
        and text encoder, the experts on the up path's weight matrices unless --expert_target_modules says."""
        model = settings.model
        if not model.model_config_name_or_path or not cls.trains_from_scratch:
            return settings
        source, flag = base_source(settings), "--pretrained_model_name_or_path"
        if model.pretrained_vae_model_name_or_path:
            vae = load_model_config(AutoencoderKL, model.pretrained_vae_model_name_or_path, flag + " (its VAE)")
        else:
            where = dict(subfolder="vae", revision=model.revision, cache_dir=settings.data.cache_dir)
            vae = load_model_config(AutoencoderKL, source, flag, **where)
        text = load_component(CLIPTextModel.config_class, settings, "text_encoder").to_dict()
        config = load_model_config(cls.denoiser_class, model.model_config_name_or_path)
        latent, width = vae.get("latent_channels", 4), text.get("hidden_size")
        wants = {"in_channels": latent, "out_channels": latent, "cross_attention_dim": width}
        wrong = {key: config.get(key) for key, value in wants.items() if config.get(key) != value}
        if wrong or config.get("addition_embed_type"):
            raise ConfigError(
                f"--model_config_name_or_path {model.model_config_name_or_path}: {wrong or 'an addition embedding'} "
                f"does not fit the base's VAE and text encoder; allowed: a UNet2DConditionModel config with "
                f"in_channels = out_channels = {latent}, cross_attention_dim = {width} and no addition embedding"
            )
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        config["sample_size"] = settings.data.resolution // factor
        experts = model.expert_target_modules or SCRATCH_EXPERT_TARGETS
        model = dataclasses.replace(model, unet_config=config, expert_target_modules=experts)
        return dataclasses.replace(settings, model=model)

    def text(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None, draws: StepDraws | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per row the text embedding (and SDXL's pooled one): the row's caption where the batch has captions, else
        its class prompt's; the null class ``C`` always gets the empty prompt's."""
        pooled_table = self.pooled_table
        if self.captions is None or batch is None or "caption" not in batch:
            return self.cond_table[class_ids], None if pooled_table is None else pooled_table[class_ids]
        picks = None if draws is None else draws.caption_draw
        hidden, pooled = self.captions(chosen_captions(batch["caption"], picks))
        null = class_ids == len(self.cond_table) - 1
        hidden = torch.where(null[:, None, None], self.cond_table[-1], hidden.to(self.cond_table.device))
        if pooled is not None:
            pooled = torch.where(null[:, None], pooled_table[-1], pooled.to(pooled_table.device))
        return hidden, pooled

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
                shift, scale = latent_scale(self.vae)
                return (self.vae.encode(pixels).latent_dist.mean.float() - shift) * scale
        return sample_latents(self.moments(batch, draws), draws.latent_noise, self.vae)

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        return self.text(class_ids, batch, draws)[0]

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        return {"encoder_hidden_states": cond}

    def grid_prompts(self, class_id: int, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's prompt arguments for `n` images of class `class_id`, the null condition as the negative
        (with the pooled embeddings where the family has them)."""
        null = self.cond_table.shape[0] - 1
        prompts = {
            "prompt_embeds": self.cond_table[class_id].expand(n, -1, -1).to(device),
            "negative_prompt_embeds": self.cond_table[null].expand(n, -1, -1).to(device),
        }
        if self.pooled_table is not None:
            prompts["pooled_prompt_embeds"] = self.pooled_table[class_id].expand(n, -1).to(device)
            prompts["negative_pooled_prompt_embeds"] = self.pooled_table[null].expand(n, -1).to(device)
        return prompts

    @classmethod
    def from_pipeline(cls, pipe: Any, prompts: list[str] | None = None) -> StableDiffusionFamily:
        return cls(pipe.vae, encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts))

    @classmethod
    def make(
        cls,
        vae: AutoencoderKL,
        tables: tuple[torch.Tensor, torch.Tensor | None],
        resolution: int,
        captions: PromptEncoder | None,
    ) -> StableDiffusionFamily:
        """The run's family from its VAE and the encoded prompt tables (embeddings, pooled embeddings)."""
        return cls(vae, tables[0], captions)

    @classmethod
    def load_base(
        cls, settings: TrainingSettings, dataset: LabelledImageDataset, dtype: torch.dtype, device: torch.device
    ) -> Base:
        """Load the base pipeline's parts. Work done once: the class prompts and the empty prompt are encoded in one
        text-encoder call, after which the text encoders leave (they are not needed again, not even for
        validation) unless the data has per-image captions."""
        sd = settings.model
        noise_scheduler = load_component(cls.scheduler_class, settings, "scheduler")
        tokenizers, text_encoders = [], []
        for tokenizer_folder, tokenizer_class, encoder_folder, encoder_class in cls.text_components:
            if sd.drop_t5 and encoder_folder in cls.optional_text_encoders:  # as diffusers' text_encoder_3=None
                tokenizers.append(None)
                text_encoders.append(None)
                continue
            tokenizers.append(load_component(tokenizer_class, settings, tokenizer_folder))
            text_encoders.append(
                load_component(encoder_class, settings, encoder_folder, variant=sd.variant, use_safetensors=True)
            )
        vae = load_vae(settings)
        unet = load_denoiser(cls, settings)
        # The VAE downsamples by vae_scale and the denoiser further: the image side must divide by both.
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        factor = vae_scale * cls.denoiser_downsampling(unet)
        resolution = settings.data.resolution
        if resolution % factor:
            raise ConfigError(
                f"--resolution {resolution}: the VAE and {cls.denoiser} downsample by {factor} in all; allowed: a "
                f"multiple of {factor}"
            )
        if sd.validation_prompts_per_class:
            prompts = prompts_per_class(sd.validation_prompts_per_class, dataset.class_names)
        else:
            prompts = class_prompts(dataset.class_names, sd.prompt_template)
        for frozen in (*(encoder for encoder in text_encoders if encoder is not None), vae):
            cast_frozen_weights(frozen.requires_grad_(False), dtype)
            frozen.to(device)
        encoder = cls.prompt_encoder(tokenizers, text_encoders, settings, unet)
        captions = encoder if dataset.captions is not None else None  # else the text encoders leave after this call
        family = cls.make(vae, encoder([*prompts, ""]), resolution, captions)
        del text_encoders, tokenizers, encoder
        free_memory()
        latent_shape = (vae.config.latent_channels, resolution // vae_scale, resolution // vae_scale)
        return Base(noise_scheduler, unet, prompts, family, latent_shape)

    @classmethod
    def denoiser_downsampling(cls, denoiser: nn.Module) -> int:
        """How much the denoiser downsamples its input (the UNet's levels)."""
        return 2 ** (len(denoiser.config.block_out_channels) - 1)

    @classmethod
    def prompt_encoder(
        cls, tokenizers: list[Any], text_encoders: list[Any], settings: TrainingSettings, denoiser: nn.Module
    ) -> Any:
        """Prompts -> (embeddings, pooled embeddings or None), as the family's pipeline encodes them (`denoiser`: for
        a pipeline that sizes a missing encoder's embedding by it)."""
        return PromptEncoder(tokenizers, text_encoders)

    def grid_pipeline(self, denoiser: nn.Module, noise_scheduler: SchedulerMixin) -> Any:
        pipeline = StableDiffusionPipeline(
            vae=self.vae, text_encoder=None, tokenizer=None, unet=denoiser,
            scheduler=self.inference_scheduler(noise_scheduler), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @torch.no_grad()
    def cache_latents(
        self, dataset: LabelledImageDataset, flip: bool, settings: TrainingSettings, disable_bar: bool
    ) -> LatentCache:
        """Encode each image once per flip state (both states under --random_flip); the VAE encoder never runs
        again."""
        loader = DataLoader(
            dataset,
            batch_size=settings.optimization.train_batch_size,
            num_workers=settings.data.dataloader_num_workers,
        )
        chunks, sizes = [], []
        for batch in tqdm(loader, desc="Caching latents", disable=disable_bar):
            sizes.append(batch["original_size"])
            pixels = batch["pixel_values"].to(self.vae.device, self.vae.dtype)
            views = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
            moments = self.vae.encode(views).latent_dist.parameters.cpu()
            chunks.append(moments.unflatten(0, (2 if flip else 1, len(pixels))).transpose(0, 1))
        return LatentCache(torch.cat(chunks), dataset.labels, torch.cat(sizes), dataset.captions)

    @classmethod
    def write_lora(cls, layers: dict[str, torch.Tensor], output_dir: Path, weight_name: str) -> None:
        cls.pipeline_type.save_lora_weights(str(output_dir), unet_lora_layers=layers, weight_name=weight_name)


@register_family
class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: the condition adds the pooled embedding of the second text encoder (``pooled_table``, row C the empty
    prompt's) and six time ids per image — original size, crop top-left, target size — as diffusers' SDXL training
    script records them: the crop where the transform took it (a random crop by default), the center crop for cached
    latents."""

    name = "stable-diffusion-xl"
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_type = StableDiffusionXLPipeline
    flag_defaults = {**StableDiffusionFamily.flag_defaults, "resolution": 1024}
    trains_from_scratch = False
    text_components = (
        *StableDiffusionFamily.text_components,
        ("tokenizer_2", CLIPTokenizer, "text_encoder_2", CLIPTextModelWithProjection),
    )

    def __init__(
        self,
        vae: Any,
        cond_table: torch.Tensor,
        pooled_table: torch.Tensor,
        resolution: int,
        captions: PromptEncoder | None = None,
    ) -> None:
        super().__init__(vae, cond_table, captions)
        self.pooled_table = pooled_table
        self.resolution = resolution

    def time_ids(self, batch: Mapping[str, Any] | None, n: int, device: torch.device) -> torch.Tensor:
        res = self.resolution
        if batch is None or "original_size" not in batch:  # no image: the image is taken as res x res, uncropped
            return torch.tensor([[res, res, 0, 0, res, res]] * n, dtype=torch.float32, device=device)
        sizes = torch.as_tensor(batch["original_size"], device=device).float()  # (B, 2): height, width
        if "crop_top_left" in batch:  # where the transform cropped
            crop = torch.as_tensor(batch["crop_top_left"], device=device).float()
        else:  # cached latents: the center crop, which follows from the size (the resize takes the short side to res)
            scaled = torch.div(sizes * res, sizes.min(dim=1, keepdim=True).values, rounding_mode="floor")
            crop = torch.round((scaled - res) / 2).clamp(min=0)
        target = torch.full_like(sizes, res)
        return torch.cat([sizes, crop, target], dim=1)

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        hidden, pooled = self.text(class_ids, batch, draws)
        return {
            "encoder_hidden_states": hidden,
            "text_embeds": pooled,
            "time_ids": self.time_ids(batch, len(class_ids), class_ids.device),
        }

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "added_cond_kwargs": added}

    @classmethod
    def from_pipeline(cls, pipe: Any, prompts: list[str] | None = None) -> StableDiffusionXLFamily:
        cond_table, pooled_table = encode_prompts_xl(
            [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], prompts
        )
        return cls(pipe.vae, cond_table, pooled_table, pipeline_resolution(pipe))

    @classmethod
    def make(
        cls,
        vae: AutoencoderKL,
        tables: tuple[torch.Tensor, torch.Tensor | None],
        resolution: int,
        captions: PromptEncoder | None,
    ) -> StableDiffusionXLFamily:
        return cls(vae, tables[0], tables[1], resolution, captions)

    def grid_pipeline(self, denoiser: nn.Module, noise_scheduler: SchedulerMixin) -> Any:
        pipeline = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=denoiser,
            scheduler=self.inference_scheduler(noise_scheduler),
        )  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


class LatentCache(Dataset):
    """VAE posterior moments (mean and log-variance) of every training image, one entry per flip state, with the
    image's original size (and caption)."""

    def __init__(
        self,
        moments: torch.Tensor,
        labels: Sequence[int],
        original_sizes: torch.Tensor,
        captions: Sequence[str] | None = None,
    ) -> None:
        self.moments = moments  # (N, flip states, 2 * latent channels, h, w)
        self.labels = list(labels)
        self.original_sizes = original_sizes  # (N, 2): height, width
        self.captions = captions

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"moments": self.moments[i], "label": self.labels[i], "original_size": self.original_sizes[i]}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item


@torch.no_grad()
def encode_prompts_xl(
    tokenizers: Sequence[Any], text_encoders: Sequence[Any], prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text embeddings as StableDiffusionXLPipeline.encode_prompt makes them: both encoders' penultimate hidden
    states side by side, and the second encoder's pooled (projected) embedding."""
    hidden, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        pooled = output[0]
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled
