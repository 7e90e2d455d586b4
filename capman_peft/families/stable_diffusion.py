"""Stable Diffusion 1.x/2.x (ε or v prediction): VAE latents in, class prompts' text embeddings as the condition.

The family's parts: its settings (:class:`StableDiffusionSettings`), loading the base pipeline's components and
encoding the class prompts once (:func:`load_base`), the adapter (:func:`add_adapter`), the step's x0 and condition
(:class:`StableDiffusionFamily`), the latent cache, the per-class grid, the export of the merged pipeline and the LoRA
files (:func:`export_pipeline`) and the model card's parts (:func:`card`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import free_memory
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ..checkpointing import trainable_state
from ..data import LabelledImageDataset, class_prompts, encode_prompts
from ..errors import ConfigError
from ..hub import card_license, cm_card_settings, hub_source
from ..pipelines import image_grid, save_adapter_and_merge, save_lora_weights, save_plain_lora_and_merge
from ..randomness import StepDraws
from ..settings import TrainingSettings
from ..tuner import CapManConfig
from .base import Condition, ModelFamily, cast_frozen_weights


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


BASE_LICENSE = "creativeml-openrail-m"  # miniSD's, inherited from Stable Diffusion v1
COMPONENTS = ("scheduler", "tokenizer", "text_encoder", "vae", "unet")
LORA_CARD_NOTE = """

The trained adapter is also a plain diffusers LoRA (general and expert part stacked, rank r_g + r_e, scale 1):
`pytorch_lora_weights.safetensors`, and the general part alone (theta^g) in `pytorch_lora_weights_general.safetensors`.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{repo}")  # or pipe.fuse_lora() after it: no inference overhead
```"""


@dataclass(frozen=True)
class StableDiffusionSettings:
    """The model, adapter, prompt and export flags of this script."""

    pretrained_model_name_or_path: str
    revision: str | None
    variant: str | None
    rank: int
    expert_rank: int
    lora_alpha: float | None
    expert_alpha: float | None
    lora_dropout: float
    target_modules: str
    expert_target_modules: str | None
    enable_xformers_memory_efficient_attention: bool
    use_8bit_adam: bool
    prompt_template: str
    """The class prompt: --prompt_template, else the named dataset's."""
    noise_offset: float
    cache_latents: bool
    push_merged_pipeline: bool
    license: str | None


def module_spec(value: str) -> list[str] | str:
    """``"to_q,to_k"`` -> a list (PEFT matches names and suffixes); a single regex stays a string."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if len(names) == 1 and re.search(r"[\\*+?()\[\]|^$]", names[0]):
        return names[0]
    return names


def adapter_config(settings: TrainingSettings) -> PeftConfig:
    """The CapMan dual adapter (lora mode), or a plain LoRA of the same general rank for the baseline."""
    sd = settings.model
    common = dict(
        lora_alpha=sd.lora_alpha or sd.rank,
        lora_dropout=sd.lora_dropout,
        target_modules=module_spec(sd.target_modules),
        revision=sd.revision,
    )
    if not settings.objective.capacity_manipulation:
        return LoraConfig(r=sd.rank, **common)
    experts = module_spec(sd.expert_target_modules) if sd.expert_target_modules else None
    return CapManConfig(
        mode="lora",
        r=sd.rank,
        expert_r=sd.expert_rank,
        expert_alpha=sd.expert_alpha,
        expert_target_modules=experts,
        **common,
    )


def add_adapter(unet: UNet2DConditionModel, settings: TrainingSettings) -> PeftModel:
    try:
        model = get_peft_model(unet, adapter_config(settings))
    except ValueError as err:
        raise ConfigError(f"--target_modules / --expert_target_modules: {err}") from None
    # get_peft_model takes the base's name from the model, and diffusers models carry none; capman-eval and
    # PeftModel users find the base UNet through it.
    model.peft_config["default"].base_model_name_or_path = settings.model.pretrained_model_name_or_path
    return model


def base_source(settings: TrainingSettings) -> str:
    """Where the base pipeline loads from: the folder or Hub id given, or its local snapshot when offline."""
    return hub_source(
        settings.model.pretrained_model_name_or_path,
        "--pretrained_model_name_or_path",
        "model",
        settings.data.cache_dir,
        settings.model.revision,
    )


def load_component(cls: Any, settings: TrainingSettings, subfolder: str, **kwargs: Any) -> Any:
    """One component of the base pipeline; a missing or broken one is a one-line error naming it."""
    sd = settings.model
    name = base_source(settings)
    path = Path(name)
    if path.exists() and not (path / subfolder).is_dir():
        raise ConfigError(
            f"--pretrained_model_name_or_path {sd.pretrained_model_name_or_path}: no {subfolder}/ folder; "
            f"allowed: a Stable Diffusion pipeline folder with {', '.join(COMPONENTS)}"
        )
    try:
        return cls.from_pretrained(
            name, subfolder=subfolder, revision=sd.revision, cache_dir=settings.data.cache_dir, **kwargs
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--pretrained_model_name_or_path {sd.pretrained_model_name_or_path}: cannot load {subfolder} "
            f"({first_line}); allowed: a Stable Diffusion pipeline folder or Hub id"
        ) from err


def load_unet(settings: TrainingSettings) -> UNet2DConditionModel:
    unet = load_component(UNet2DConditionModel, settings, "unet", variant=settings.model.variant, use_safetensors=True)
    for param in unet.parameters():  # a variant's files may be fp16; the base is cast per run (cast_frozen_weights)
        param.data = param.data.float()
    return unet


class LatentCache(Dataset):
    """VAE posterior moments (mean and log-variance) of every training image, one entry per flip state."""

    def __init__(self, moments: torch.Tensor, labels: Sequence[int]) -> None:
        self.moments = moments  # (N, flip states, 2 * latent channels, h, w)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"moments": self.moments[i], "label": self.labels[i]}


@torch.no_grad()
def cache_latents(
    vae: AutoencoderKL, dataset: LabelledImageDataset, flip: bool, settings: TrainingSettings, disable_bar: bool
) -> LatentCache:
    """Encode each image once per flip state (both states under --random_flip); the VAE encoder never runs again."""
    loader = DataLoader(
        dataset, batch_size=settings.optimization.train_batch_size, num_workers=settings.data.dataloader_num_workers
    )
    chunks = []
    for batch in tqdm(loader, desc="Caching latents", disable=disable_bar):
        pixels = batch["pixel_values"].to(vae.device, vae.dtype)
        views = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
        moments = vae.encode(views).latent_dist.parameters.cpu()
        chunks.append(moments.unflatten(0, (2 if flip else 1, len(pixels))).transpose(0, 1))
    return LatentCache(torch.cat(chunks), dataset.labels)


def inference_scheduler(noise_scheduler: SchedulerMixin) -> DDIMScheduler:
    """DDIM, the paper's sampler; SD latents must not be clipped to [-1, 1]."""
    return DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False)


@torch.no_grad()
def sample_class_grid(
    pipeline: StableDiffusionPipeline,
    cond_table: torch.Tensor,
    settings: TrainingSettings,
    dtype: torch.dtype,
) -> Image.Image:
    """``--num_validation_images`` per class (rows = classes) from the precomputed prompt embeddings: the text
    encoder is not needed. Class c always starts from the same seeded noise, so grids compare across epochs."""
    device = pipeline.unet.device
    num_classes = cond_table.shape[0] - 1
    n = settings.output.num_validation_images
    images = []
    for c in range(num_classes):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            images += pipeline(
                prompt_embeds=cond_table[c].expand(n, -1, -1).to(device),
                negative_prompt_embeds=cond_table[num_classes].expand(n, -1, -1).to(device),
                height=settings.data.resolution,
                width=settings.data.resolution,
                num_inference_steps=settings.output.num_inference_steps,
                guidance_scale=settings.output.guidance_scale,
                generator=torch.Generator(device).manual_seed(settings.optimization.seed + c),
            ).images
    return image_grid(images, rows=num_classes, cols=n)


def export_pipeline(
    settings: TrainingSettings,
    trained: torch.nn.Module,
    noise_scheduler: SchedulerMixin,
    output_dir: Path,
    run_id: str,
) -> StableDiffusionPipeline:
    """Write `output_dir` (the export stage): the adapter (PEFT format in adapter/ and as diffusers LoRA files; the
    baseline's LoRA file only) and the merged float32 StableDiffusionPipeline.

    The adapter is put on a fresh float32 copy of the base UNet before merging: training kept the base weights in
    the mixed-precision dtype, and merging into rounded weights would bake the rounding into the export.
    """
    sd = settings.model
    weights = {name: value.float().cpu() for name, value in trainable_state(trained).items()}
    model = add_adapter(load_unet(settings), settings)
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected or set(weights) != set(trainable_state(model)):
        raise RuntimeError(f"trained adapter does not fit the export model: {sorted(unexpected)[:3]}")
    if settings.objective.capacity_manipulation:
        save_lora_weights(model, output_dir)  # before merging: the adapter as a diffusers LoRA
        merged = save_adapter_and_merge(model, output_dir, run_id)
    else:
        merged = save_plain_lora_and_merge(model, output_dir)
    pipeline = StableDiffusionPipeline.from_pretrained(
        base_source(settings),
        use_safetensors=True,
        unet=merged,
        scheduler=inference_scheduler(noise_scheduler),
        revision=sd.revision,
        variant=sd.variant,
        cache_dir=settings.data.cache_dir,
        **({"torch_dtype": torch.float32} if sd.variant else {}),  # variant files may be fp16
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return pipeline


def base_model_license(settings: TrainingSettings) -> str:
    """``--license``, else the license in the base model's card when it is on disk, else miniSD's."""
    sd = settings.model
    if sd.license:
        return sd.license
    card = Path(sd.pretrained_model_name_or_path) / "README.md"
    if not card.parent.exists():  # a Hub id: its card counts only if it is already in the local cache
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(
                sd.pretrained_model_name_or_path,
                "README.md",
                cache_dir=settings.data.cache_dir,
                revision=sd.revision,
            )
        except ValueError:  # not a Hub id either
            cached = None
        card = Path(cached) if isinstance(cached, str) else card
    return (card_license(card) if card.is_file() else None) or BASE_LICENSE


@dataclass
class Base:
    """The frozen parts of the base pipeline after the work done once per run."""

    noise_scheduler: SchedulerMixin
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    prompts: list[str]
    cond_table: torch.Tensor
    """Text embeddings of the C class prompts and, in row C, of the empty prompt (the null condition)."""
    latent_shape: tuple[int, int, int]


def load_base(settings: TrainingSettings, dataset: LabelledImageDataset, dtype: torch.dtype, device) -> Base:
    """Load the base pipeline's parts. Work done once: the class prompts and the empty prompt are encoded in one
    text-encoder call, after which the text encoder leaves (it is not needed again, not even for validation)."""
    sd = settings.model
    noise_scheduler = load_component(DDPMScheduler, settings, "scheduler")
    tokenizer = load_component(CLIPTokenizer, settings, "tokenizer")
    # Weights are read from safetensors only: a base model with nothing but pickled .bin files is refused.
    text_encoder = load_component(CLIPTextModel, settings, "text_encoder", variant=sd.variant, use_safetensors=True)
    vae = load_component(AutoencoderKL, settings, "vae", variant=sd.variant, use_safetensors=True)
    unet = load_unet(settings)
    # The VAE downsamples by vae_scale and the UNet's levels by unet_scale: the image side must divide by both.
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    factor = vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)
    resolution = settings.data.resolution
    if resolution % factor:
        raise ConfigError(
            f"--resolution {resolution}: the VAE and UNet downsample by {factor} in all; allowed: a multiple "
            f"of {factor}"
        )
    prompts = class_prompts(dataset.class_names, sd.prompt_template)
    for frozen in (text_encoder, vae):
        cast_frozen_weights(frozen.requires_grad_(False), dtype)
    text_encoder.to(device)
    cond_table = encode_prompts(tokenizer, text_encoder, [*prompts, ""]).float()
    del text_encoder, tokenizer
    free_memory()
    vae.to(device)
    latent_shape = (vae.config.latent_channels, resolution // vae_scale, resolution // vae_scale)
    return Base(noise_scheduler, vae, unet, prompts, cond_table, latent_shape)


def card(settings: TrainingSettings, prompts: list[str]) -> dict[str, Any]:
    """The model card's run-specific parts: base model, license, CM settings, how to load, widget prompts."""
    sd = settings.model
    base_is_local = Path(sd.pretrained_model_name_or_path).exists()
    note = (
        "A plain `StableDiffusionPipeline`: `DiffusionPipeline.from_pretrained(path)` loads it without "
        "capman_peft; the saved scheduler is DDIM (the paper samples with 50 steps). Class prompts: "
        + ", ".join(f'"{prompt}"' for prompt in prompts)
        + "."
    )
    if settings.objective.capacity_manipulation:
        note += LORA_CARD_NOTE.format(
            base=sd.pretrained_model_name_or_path, repo=settings.hub.hub_model_id or "<this repo or folder>"
        )
    if base_is_local:
        note += f" Fine-tuned from a local base model folder `{Path(sd.pretrained_model_name_or_path).name}`."
    adapter = dict(
        mode="lora",
        rank=sd.rank,
        expert_rank=sd.expert_rank,
        lora_dropout=sd.lora_dropout,
    )
    return dict(
        base_model=None if base_is_local else sd.pretrained_model_name_or_path,  # the Hub rejects local paths
        cm_settings=cm_card_settings(settings.objective, **adapter, target_modules=sd.target_modules),
        license=base_model_license(settings),
        pipeline_note=note,
        widget_prompts=prompts,
    )
