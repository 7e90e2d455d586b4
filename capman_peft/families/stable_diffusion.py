"""Stable Diffusion 1.x/2.x (ε or v prediction): VAE latents in, class prompts' text embeddings as the condition.

The family's parts: its settings (:class:`StableDiffusionSettings`), loading the base pipeline's components and
encoding the class prompts once (:func:`load_base`), the adapter (:func:`add_adapter`), the step's x0 and condition
(:class:`StableDiffusionFamily`), the latent cache, the per-class grid, the export of the merged pipeline and the LoRA
files (:func:`export_pipeline`) and the model card's parts (:func:`card`).
"""

from __future__ import annotations

import json
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
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import free_memory
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..checkpointing import trainable_state
from ..data import LabelledImageDataset, class_prompts, encode_prompts, grid_classes
from ..errors import ConfigError
from ..hub import card_license, hub_source
from ..objective import cm_card_settings
from ..pipelines import image_grid, save_adapter_and_merge, save_lora_weights, save_plain_lora_and_merge
from ..randomness import StepDraws
from ..settings import TrainingSettings, identity
from ..tuner import CapManConfig
from .base import Condition, ModelFamily, cast_frozen_weights


def sample_latents(moments: torch.Tensor, noise: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """z = (mean + std * noise) * scaling_factor: diffusers' ``latent_dist.sample()``, with the step's seeded noise."""
    posterior = DiagonalGaussianDistribution(moments.float())
    return (posterior.mean + posterior.std * noise) * scaling_factor


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


class StableDiffusionFamily(ModelFamily):
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

    def __init__(
        self, vae: Any = None, cond_table: torch.Tensor | None = None, captions: PromptEncoder | None = None
    ) -> None:
        self.vae = vae
        self.cond_table = cond_table
        self.captions = captions
        self.pooled_table: torch.Tensor | None = None

    def text(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per row the text embedding (and SDXL's pooled one): the row's caption where the batch has captions, else
        its class prompt's; the null class ``C`` always gets the empty prompt's."""
        pooled_table = self.pooled_table
        if self.captions is None or batch is None or "caption" not in batch:
            return self.cond_table[class_ids], None if pooled_table is None else pooled_table[class_ids]
        hidden, pooled = self.captions(list(batch["caption"]))
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
                return self.vae.encode(pixels).latent_dist.mean.float() * self.vae.config.scaling_factor
        return sample_latents(self.moments(batch, draws), draws.latent_noise, self.vae.config.scaling_factor)

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        return self.text(class_ids, batch)[0]

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        return {"encoder_hidden_states": cond}

    def grid_prompts(self, class_id: int, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's prompt arguments for `n` images of class `class_id`, the null condition as the negative."""
        null = self.cond_table.shape[0] - 1
        return {
            "prompt_embeds": self.cond_table[class_id].expand(n, -1, -1).to(device),
            "negative_prompt_embeds": self.cond_table[null].expand(n, -1, -1).to(device),
        }


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: the condition adds the pooled embedding of the second text encoder (``pooled_table``, row C the empty
    prompt's) and six time ids per image — original size, crop top-left, target size — as diffusers' SDXL training
    script computes them for a center crop (the resize takes the shorter side to the resolution)."""

    name = "stable-diffusion-xl"

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
        scaled = torch.div(sizes * res, sizes.min(dim=1, keepdim=True).values, rounding_mode="floor")  # short side: res
        crop = torch.round((scaled - res) / 2).clamp(min=0)
        target = torch.full_like(sizes, res)
        return torch.cat([sizes, crop, target], dim=1)

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        hidden, pooled = self.text(class_ids, batch)
        return {
            "encoder_hidden_states": hidden,
            "text_embeds": pooled,
            "time_ids": self.time_ids(batch, len(class_ids), class_ids.device),
        }

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "added_cond_kwargs": added}

    def grid_prompts(self, class_id: int, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        null = self.pooled_table.shape[0] - 1
        return {
            **super().grid_prompts(class_id, n, device),
            "pooled_prompt_embeds": self.pooled_table[class_id].expand(n, -1).to(device),
            "negative_pooled_prompt_embeds": self.pooled_table[null].expand(n, -1).to(device),
        }


BASE_LICENSE = "creativeml-openrail-m"  # miniSD's, inherited from Stable Diffusion v1
COMPONENTS = ("scheduler", "tokenizer", "text_encoder", "vae", "unet")
LORA_CARD_NOTE = """ The LoRA mode's CM default has no quality measurement yet: no testbed of capman-peft's study
fine-tunes (docs/study.md).

The trained adapter is also a plain diffusers LoRA (general and expert part stacked, rank r_g + r_e, scale 1):
`pytorch_lora_weights.safetensors`, and the general part alone (theta^g) in `pytorch_lora_weights_general.safetensors`.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{repo}")  # or pipe.fuse_lora() after it: no inference overhead
```"""


@dataclass(frozen=True)
class StableDiffusionSettings:
    """The model, adapter, prompt and export flags of this script.

    Not identity: adapter dropout, attention kernels, the optimizer's precision, the noise offset, latent caching, the
    VAE (the fp16-safe one encodes the same latents), validation prompts and what is exported or uploaded; the family
    follows from the base model, which is.
    """

    pretrained_model_name_or_path: str = identity()
    revision: str | None = identity()
    variant: str | None = identity()
    rank: int = identity()
    expert_rank: int = identity()
    lora_alpha: float | None = identity()
    expert_alpha: float | None = identity()
    lora_dropout: float
    target_modules: str = identity()
    expert_target_modules: str | None = identity()
    enable_xformers_memory_efficient_attention: bool
    use_8bit_adam: bool
    prompt_template: str = identity()
    """The class prompt: --prompt_template, else the named dataset's."""
    noise_offset: float
    cache_latents: bool
    push_merged_pipeline: bool
    license: str | None
    pretrained_vae_model_name_or_path: str | None
    validation_prompts_per_class: str | None
    """A JSON file {class name: prompt} for the class prompts (validation, the expert-use report, evaluation)."""
    family: str
    """The base pipeline's family, read from its model_index.json: "stable-diffusion" or "stable-diffusion-xl"."""

    @property
    def xl(self) -> bool:
        return self.family == "stable-diffusion-xl"


# model_index.json's pipeline class -> the family, and the family's default image side when --resolution is not given
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "stable-diffusion", "StableDiffusionXLPipeline": "stable-diffusion-xl"}
DEFAULT_RESOLUTION = {"stable-diffusion": 256, "stable-diffusion-xl": 1024}


def base_family(name_or_path: str, *, cache_dir: str | None, revision: str | None) -> str:
    """The family of the base pipeline, from its ``model_index.json`` (no weights are read)."""
    from diffusers import DiffusionPipeline

    flag = "--pretrained_model_name_or_path"
    source = hub_source(name_or_path, flag, "model", cache_dir, revision)
    try:
        config = DiffusionPipeline.load_config(source, cache_dir=cache_dir, revision=revision)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{flag} {name_or_path}: no readable model_index.json ({reason}); allowed: a Stable Diffusion 1.x/2.x or "
            "SDXL pipeline folder or Hub id"
        ) from None
    kind = config.get("_class_name")
    if kind not in PIPELINE_FAMILIES:
        raise ConfigError(
            f"{flag} {name_or_path}: is a {kind}; allowed: {', '.join(PIPELINE_FAMILIES)} (Stable Diffusion 1.x/2.x, "
            "SDXL)"
        )
    return PIPELINE_FAMILIES[kind]


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
def cache_latents(
    vae: AutoencoderKL, dataset: LabelledImageDataset, flip: bool, settings: TrainingSettings, disable_bar: bool
) -> LatentCache:
    """Encode each image once per flip state (both states under --random_flip); the VAE encoder never runs again."""
    loader = DataLoader(
        dataset, batch_size=settings.optimization.train_batch_size, num_workers=settings.data.dataloader_num_workers
    )
    chunks, sizes = [], []
    for batch in tqdm(loader, desc="Caching latents", disable=disable_bar):
        sizes.append(batch["original_size"])
        pixels = batch["pixel_values"].to(vae.device, vae.dtype)
        views = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
        moments = vae.encode(views).latent_dist.parameters.cpu()
        chunks.append(moments.unflatten(0, (2 if flip else 1, len(pixels))).transpose(0, 1))
    return LatentCache(torch.cat(chunks), dataset.labels, torch.cat(sizes), dataset.captions)


def inference_scheduler(noise_scheduler: SchedulerMixin) -> DDIMScheduler:
    """DDIM, the paper's sampler; SD latents must not be clipped to [-1, 1]."""
    return DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False)


def grid_pipeline(unet: torch.nn.Module, vae: AutoencoderKL, noise_scheduler: SchedulerMixin, *, xl: bool) -> Any:
    """A sampling pipeline around the model being trained, without text encoders (the prompts are embedded)."""
    if xl:
        pipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
            scheduler=inference_scheduler(noise_scheduler),
        )  # fmt: skip
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=inference_scheduler(noise_scheduler),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def sample_class_grid(
    pipeline: Any,
    family: StableDiffusionFamily,
    settings: TrainingSettings,
    dtype: torch.dtype,
    class_counts: Sequence[int],
) -> Image.Image:
    """``--num_validation_images`` per class (rows = classes; ``grid_classes`` of them for a set with many) from the
    precomputed prompt embeddings: the text encoders are not needed. Class c always starts from the same seeded
    noise, so grids compare across epochs."""
    device = pipeline.unet.device
    n = settings.output.num_validation_images
    shown = grid_classes(class_counts)
    images = []
    for c in shown:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            images += pipeline(
                **family.grid_prompts(c, n, device),
                height=settings.data.resolution,
                width=settings.data.resolution,
                num_inference_steps=settings.output.num_inference_steps,
                guidance_scale=settings.output.guidance_scale,
                generator=torch.Generator(device).manual_seed(settings.optimization.seed + c),
            ).images
    return image_grid(images, rows=len(shown), cols=n)


def export_unet(settings: TrainingSettings, trained: torch.nn.Module) -> PeftModel:
    """The trained adapter on a fresh float32 copy of the base UNet (on the CPU): what the export merges and what the
    end-of-training expert-use report measures. Training kept the base weights in the mixed-precision dtype; merging
    into rounded weights would bake the rounding into the export, and θ and θ^g computed in bf16 differ by a
    rounding floor (~1e-5 in (ε_θ − ε_θg)², docs/method.md) that would compress the report's Few/Many ratio."""
    weights = {name: value.float().cpu() for name, value in trainable_state(trained).items()}
    model = add_adapter(load_unet(settings), settings)
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected or set(weights) != set(trainable_state(model)):
        raise RuntimeError(f"trained adapter does not fit the export model: {sorted(unexpected)[:3]}")
    return model


def export_pipeline(
    settings: TrainingSettings,
    model: PeftModel,
    noise_scheduler: SchedulerMixin,
    output_dir: Path,
    run_id: str,
) -> Any:
    """Write `output_dir` (the export stage) from the float32 model of :func:`export_unet`: the adapter (PEFT format
    in adapter/ and as diffusers LoRA files; the baseline's LoRA file only) and the merged float32
    StableDiffusionPipeline.

    SDXL exports a StableDiffusionXLPipeline (with the ``--pretrained_vae_model_name_or_path`` VAE where given).
    """
    sd = settings.model
    if settings.objective.capacity_manipulation:
        save_lora_weights(model, output_dir)  # before merging: the adapter as a diffusers LoRA
        merged = save_adapter_and_merge(model, output_dir, run_id)
    else:
        merged = save_plain_lora_and_merge(model, output_dir)
    vae = {"vae": load_vae(settings)} if sd.pretrained_vae_model_name_or_path else {}
    pipeline_class = StableDiffusionXLPipeline if sd.xl else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(
        base_source(settings),
        use_safetensors=True,
        unet=merged,
        **vae,
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
    family: StableDiffusionFamily
    """The step's x0 and condition: the VAE, and the text embeddings of the C class prompts and, in row C, of the
    empty prompt (the null condition)."""
    latent_shape: tuple[int, int, int]


def load_vae(settings: TrainingSettings) -> AutoencoderKL:
    """The base pipeline's VAE, or ``--pretrained_vae_model_name_or_path`` (e.g. SDXL's fp16-safe VAE)."""
    sd = settings.model
    if not sd.pretrained_vae_model_name_or_path:
        return load_component(AutoencoderKL, settings, "vae", variant=sd.variant, use_safetensors=True)
    flag = "--pretrained_vae_model_name_or_path"
    source = hub_source(sd.pretrained_vae_model_name_or_path, flag, "model", settings.data.cache_dir)
    try:
        return AutoencoderKL.from_pretrained(source, cache_dir=settings.data.cache_dir, use_safetensors=True)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{flag} {sd.pretrained_vae_model_name_or_path}: cannot load a VAE ({reason})") from err


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


def prompts_per_class(path: str, class_names: Sequence[str] | None) -> list[str]:
    """The class prompts of ``--validation_prompts_per_class``, in class order; with `class_names` None only the
    file's format is checked (before any work)."""
    flag = f"--validation_prompts_per_class {path}"
    allowed = 'allowed: a JSON object with one prompt per class name, e.g. {"baroque": "a baroque painting"}'
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{flag}: cannot be read as JSON ({err}); {allowed}") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) and v.strip() for v in table.values()):
        raise ConfigError(f"{flag}: not an object of non-empty text prompts; {allowed}")
    if class_names is None:
        return list(table.values())
    missing = [name for name in class_names if name not in table]
    unknown = sorted(set(table) - set(class_names))
    if missing or unknown:
        raise ConfigError(
            f"{flag}: no prompt for classes {missing} and prompts for unknown classes {unknown}; {allowed} "
            f"(the classes: {', '.join(class_names)})"
        )
    return [table[name] for name in class_names]


def load_base(settings: TrainingSettings, dataset: LabelledImageDataset, dtype: torch.dtype, device) -> Base:
    """Load the base pipeline's parts. Work done once: the class prompts and the empty prompt are encoded in one
    text-encoder call, after which the text encoder leaves (it is not needed again, not even for validation)."""
    sd = settings.model
    noise_scheduler = load_component(DDPMScheduler, settings, "scheduler")
    tokenizers = [load_component(CLIPTokenizer, settings, "tokenizer")]
    # Weights are read from safetensors only: a base model with nothing but pickled .bin files is refused.
    text_encoders = [load_component(CLIPTextModel, settings, "text_encoder", variant=sd.variant, use_safetensors=True)]
    if sd.xl:
        tokenizers.append(load_component(CLIPTokenizer, settings, "tokenizer_2"))
        text_encoders.append(
            load_component(
                CLIPTextModelWithProjection, settings, "text_encoder_2", variant=sd.variant, use_safetensors=True
            )
        )
    vae = load_vae(settings)
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
    if sd.validation_prompts_per_class:
        prompts = prompts_per_class(sd.validation_prompts_per_class, dataset.class_names)
    else:
        prompts = class_prompts(dataset.class_names, sd.prompt_template)
    for frozen in (*text_encoders, vae):
        cast_frozen_weights(frozen.requires_grad_(False), dtype)
        frozen.to(device)
    encoder = PromptEncoder(tokenizers, text_encoders)
    captions = encoder if dataset.captions is not None else None  # else the text encoders leave after this call
    cond_table, pooled_table = encoder([*prompts, ""])
    if sd.xl:
        family = StableDiffusionXLFamily(vae, cond_table, pooled_table, resolution, captions)
    else:
        family = StableDiffusionFamily(vae, cond_table, captions)
    del text_encoders, tokenizers, encoder
    free_memory()
    latent_shape = (vae.config.latent_channels, resolution // vae_scale, resolution // vae_scale)
    return Base(noise_scheduler, vae, unet, prompts, family, latent_shape)


def card(settings: TrainingSettings, prompts: list[str], class_counts: Sequence[int]) -> dict[str, Any]:
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
        widget_prompts=[prompts[c] for c in grid_classes(class_counts)],  # the Hub widget: the grid's classes
    )
