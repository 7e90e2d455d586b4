#!/usr/bin/env python
"""Fine-tune Stable Diffusion with LoRA and Capacity Manipulation on class-imbalanced data (paper sec. 4.2).

    accelerate launch train_text_to_image_cm.py --dataset imb-artbench10 --imbalance_ratio 100

The defaults are the paper's Imb. ArtBench-10 recipe: lambdalabs/miniSD-diffusers at 256 px, a CapMan adapter in lora
mode on the attention projections (general rank 128, expert rank 8, dropout 0.1), the prompt "a {class} painting",
AdamW (lr 3e-4, weight decay 1e-6), batch 64, 100 epochs. With --no_capacity_manipulation the same script trains the
plain rank-128 LoRA baseline. The output folder is an ordinary StableDiffusionPipeline with the adapter merged into
the UNet (no capman_peft needed to load it), plus adapter/, training_summary.json and a model card.

Work done once per run: the C class prompts and the empty prompt are encoded in one text-encoder call, after which
the text encoder leaves the device; with --cache_latents every image is VAE-encoded once per flip state before
training.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import free_memory
from diffusers.utils.import_utils import is_xformers_available
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from capman_peft import CapManConfig
from capman_peft.checkpointing import trainable_state
from capman_peft.data import LabelledImageDataset, class_prompts, encode_prompts, get_dataset_spec
from capman_peft.errors import ConfigError, run_cli
from capman_peft.expert_use import summarize_expert_use
from capman_peft.families import StableDiffusionFamily
from capman_peft.flags import (
    module_patterns,
    nonnegative_float,
    positive_float,
    positive_int,
    probability,
    prompt_template_value,
    script_parser,
    section,
)
from capman_peft.hub import card_license, hub_source
from capman_peft.pipelines import image_grid, save_adapter_and_merge, save_lora_weights, save_plain_lora_and_merge
from capman_peft.recipes import parse_settings
from capman_peft.settings import TrainingSettings
from capman_peft.training.export import (
    cm_card_settings,
    final_model,
    finish_export,
    publish_export,
    publish_image,
    staged_export,
)
from capman_peft.training.loop import TrainingCallbacks, family_step_loss, train
from capman_peft.training.setup import (
    cast_frozen_weights,
    frozen_weight_dtype,
    load_training_data,
    make_accelerator,
    make_objective,
    prepare_cm,
    prepare_training,
)

logger = logging.getLogger("capman_peft")

BASE_MODEL = "lambdalabs/miniSD-diffusers"
BASE_LICENSE = "creativeml-openrail-m"  # miniSD's, inherited from Stable Diffusion v1
ATTENTION_PROJECTIONS = "to_q,to_k,to_v,to_out.0"
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


def parse_args(argv: Sequence[str] | None = None) -> TrainingSettings:
    """The run's typed settings from the command line (and ``--config``), checked before any work."""
    parser = script_parser(
        __doc__, dataset="imb-artbench10", resolution=256, objective="ddpm", validation_epochs=10, guidance_scale=7.5
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        default=BASE_MODEL,
        help="Stable Diffusion pipeline to fine-tune (Hub id or local folder); the paper uses miniSD (256 px).",
    )
    group.add_argument("--revision", default=None, help="Revision of the base model on the Hub.")
    group.add_argument("--variant", default=None, help='Weight variant of the base model files, e.g. "fp16".')
    group.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")
    group.add_argument("--rank", type=positive_int, default=128, help="Rank of the general LoRA adapter (paper: 128).")
    group.add_argument("--expert_rank", type=positive_int, default=8, help="Rank of the reserved expert (paper: 8).")
    group.add_argument(
        "--lora_alpha", type=positive_float, default=None, help="General adapter alpha (default: --rank)."
    )
    group.add_argument(
        "--expert_alpha", type=positive_float, default=None, help="Expert alpha (default: --expert_rank)."
    )
    group.add_argument(
        "--lora_dropout", type=probability, default=0.1, help="Dropout on the adapter input (paper: 0.1)."
    )
    group.add_argument(
        "--target_modules",
        type=module_patterns,
        default=ATTENTION_PROJECTIONS,
        help="UNet layers that get the adapter: comma-separated names or name suffixes, or one regex.",
    )
    group.add_argument(
        "--expert_target_modules",
        type=module_patterns,
        default=None,
        help="Layers that also get the expert (default: all targets).",
    )
    group.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention."
    )
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (saves memory).")
    group = parser.add_argument_group("text and latents")
    group.add_argument(
        "--prompt_template",
        type=prompt_template_value,
        default=None,
        help='Class prompt; "{}" is the class name ("a" before it becomes "an" before a vowel). Default: the named '
        'dataset\'s ("a {} painting" for imb-artbench10, "a photo of a {}" for CIFAR), else "a {} painting".',
    )
    group.add_argument(
        "--caption_dropout",
        "--proportion_empty_prompts",
        dest="label_dropout",
        type=probability,
        default=argparse.SUPPRESS,
        help="Probability of training on the empty prompt instead (classifier-free guidance); same as "
        "--label_dropout. Default 0.1, as in Stable Diffusion's own training.",
    )
    group.add_argument(
        "--noise_offset", type=nonnegative_float, default=0.0, help="Noise offset (diffusers' flag; 0: off)."
    )
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="VAE-encode every training image once per flip state before training (implies a center crop).",
    )
    group = parser.add_argument_group("export")
    group.add_argument(
        "--push_merged_pipeline",
        action="store_true",
        help="With --push_to_hub, upload the whole merged pipeline folder instead of only the LoRA file and card.",
    )
    group.add_argument(
        "--license",
        default=None,
        help=f"License in the model card; default: the base model card's, else {BASE_LICENSE}.",
    )
    # theta^g on a quarter of each batch: the CM step costs ~1.25x plain LoRA instead of ~2x (README "Benchmarks"),
    # with the same CM loss in expectation (importance-weighted rows).
    parser.set_defaults(
        learning_rate=3e-4,
        adam_weight_decay=1e-6,
        num_train_epochs=100,
        lr_warmup_steps=0,
        label_dropout=0.1,
        cm_general_fraction=0.25,
    )
    args, settings = parse_settings(parser, argv)
    template = args.prompt_template or get_dataset_spec(settings.data.dataset).prompt_template
    model = section(StableDiffusionSettings, args, prompt_template=template)
    settings = dataclasses.replace(settings, model=model)
    check_text_to_image_settings(settings)
    return settings


def check_text_to_image_settings(settings: TrainingSettings) -> None:
    objective, model = settings.objective, settings.model
    if settings.data.resolution is None or settings.data.resolution % 8:
        raise ConfigError(
            f"--resolution {settings.data.resolution}: the VAE downsamples by 8; allowed: a positive multiple of 8"
        )
    if objective.capacity_manipulation and not model.expert_rank < model.rank:
        raise ConfigError(
            f"--expert_rank {model.expert_rank}: not below --rank {model.rank}; allowed: 1 .. rank - 1 (paper: "
            "r_e < r_g)"
        )
    if objective.capacity_manipulation and objective.cm_forward == "shared_prefix" and not model.expert_target_modules:
        raise ConfigError(
            "--cm_forward shared_prefix: computes the down path once for theta and theta^g, but the experts sit on "
            "every target layer, the down path's too; allowed: --cm_forward fused, or --expert_target_modules with "
            "up_blocks layers only (e.g. 'up_blocks.*(to_q|to_k|to_v|to_out.0)')"
        )
    if model.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "--use_8bit_adam: needs bitsandbytes, which is not installed; allowed: pip install bitsandbytes"
        )
    if model.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise ConfigError(
            "--enable_xformers_memory_efficient_attention: needs xformers, which is not installed; allowed: pip "
            "install xformers"
        )


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


def publish_validation_grid(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    *,
    vae: AutoencoderKL,
    noise_scheduler: SchedulerMixin,
    cond_table: torch.Tensor,
    settings: TrainingSettings,
    epoch: int,
    step: int,
) -> Path:
    """A per-class grid from the model being trained (adapters active, dropout off), saved and sent to trackers."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=inference_scheduler(noise_scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    grid = sample_class_grid(pipeline, cond_table, settings, frozen_weight_dtype(accelerator))
    unet.train(was_training)
    path = Path(settings.output.output_dir) / "validation" / f"epoch-{epoch:03d}.png"
    return publish_image(accelerator, grid, path, step)


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


def main(argv: Sequence[str] | None = None, callbacks: TrainingCallbacks | None = None) -> None:
    settings = parse_args(argv)
    data, model_settings = settings.data, settings.model
    accelerator = make_accelerator(settings)
    device = accelerator.device
    # Frozen weights (VAE, text encoder, UNet base) in the precision in effect, adapters in float32.
    weight_dtype = frozen_weight_dtype(accelerator)
    # Flips are drawn per step (see StepRandomness), not by the data transform.
    center_crop = data.center_crop or model_settings.cache_latents
    dataset = load_training_data(data, center_crop=center_crop, random_flip=False)
    cm = prepare_cm(settings.objective, dataset, device)
    base = load_base(settings, dataset, weight_dtype, device)
    vae, noise_scheduler, unet = base.vae, base.noise_scheduler, base.unet
    train_set: Dataset = dataset
    if model_settings.cache_latents:
        train_set = cache_latents(vae, dataset, data.random_flip, settings, not accelerator.is_main_process)

    if settings.optimization.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if model_settings.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    torch.manual_seed(settings.optimization.seed)  # adapter initialisation independent of the data work above
    model = add_adapter(unet, settings)
    cast_frozen_weights(model, weight_dtype)
    objective = make_objective(settings.objective, noise_scheduler, dataset.class_counts)
    optimizer_cls = torch.optim.AdamW
    if model_settings.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    family = StableDiffusionFamily(vae, base.cond_table.to(device))
    run = prepare_training(
        accelerator,
        settings,
        model,
        cm=cm,
        objective=objective,
        optimizer_cls=optimizer_cls,
        train_set=train_set,
        labels=dataset.labels,
        sample_shape=base.latent_shape,
        project="capman-text-to-image",
        family=family,
        noise_offset=model_settings.noise_offset,
        flip=data.random_flip,
        latent_noise=True,
    )
    logger.info("Frozen weights in %s, adapters in float32", weight_dtype)
    cond_table = family.cond_table
    step_loss = family_step_loss(
        family, run.denoiser, objective, noise_scheduler, num_classes=dataset.num_classes, cm=cm
    )

    def validate_grid(trained: torch.nn.Module, epoch: int, step: int) -> None:
        publish_validation_grid(
            accelerator,
            trained.get_base_model(),
            vae=vae,
            noise_scheduler=noise_scheduler,
            cond_table=cond_table,
            settings=settings,
            epoch=epoch,
            step=step,
        )

    trained = train(accelerator, settings, run, step_loss=step_loss, validate=validate_grid, callbacks=callbacks)

    # Export: the merged pipeline (EMA weights where EMA is on) with the unmerged adapter beside it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model, report = final_model(accelerator, run), None
        if cm is not None:
            with accelerator.autocast():
                report = summarize_expert_use(model, noise_scheduler, dataset, family)
        with staged_export(settings.output.output_dir) as out:
            pipeline = export_pipeline(settings, model, noise_scheduler, out, run.run_id)
            pipeline.set_progress_bar_config(disable=True)
            samples = sample_class_grid(pipeline.to(device), cond_table, settings, torch.float32)
            finish_export(
                accelerator, settings, out, run_id=run.run_id, dataset=dataset, trained=trained,
                expert_report=report, samples=samples, card=card(settings, base.prompts),
                summary=dict(prompts=base.prompts),
            )  # fmt: skip
        # A CM run shares its LoRA file (and card); the merged 4 GB pipeline only when asked.
        lora_only = settings.objective.capacity_manipulation and not model_settings.push_merged_pipeline
        publish_export(settings, trained, lora_only=lora_only)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
