"""Families fine-tuned from a pretrained pipeline (``train_text_to_image_cm.py``): the interface such a family adds to
:class:`ModelFamily` (:class:`PretrainedFamily`), and what every one of them shares — the script's model settings,
reading the base pipeline's family from its ``model_index.json``, loading its components, the adapter, and the
per-class sample grid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from peft import LoraConfig, PeftConfig, get_peft_model
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..data import LabelledImageDataset, grid_classes
from ..errors import ConfigError
from ..hub import hub_source
from ..objective import FlowWeighting
from ..pipelines import image_grid
from ..settings import TrainingSettings, identity
from ..tuner import CapManConfig
from .base import ModelFamily
from .registry import FAMILIES


@dataclass(frozen=True)
class PretrainedModelSettings:
    """The model, adapter, prompt and export flags of the fine-tuning script.

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
    weighting_scheme: str | None = identity()
    """Flow-matching families: how σ is drawn and the loss weighted (None for the others)."""
    logit_mean: float = identity()
    logit_std: float = identity()
    mode_scale: float = identity()
    max_sequence_length: int | None = identity()
    drop_t5: bool = identity()
    """Train without the T5 text encoder (SD3; its part of the prompt embedding is zeros, as diffusers gives it)."""
    guidance_embedding: float | None = identity()
    """The guidance input a guidance-distilled denoiser (FLUX.1-dev) is trained with: ``--guidance_scale``, as
    diffusers' Flux script passes it (None for families without one)."""
    cache_latents: bool
    push_merged_pipeline: bool
    license: str | None
    pretrained_vae_model_name_or_path: str | None
    validation_prompts_per_class: str | None
    """A JSON file {class name: prompt} for the class prompts (validation, the expert-use report, evaluation)."""
    family: str
    """The name of the base pipeline's family (:class:`PretrainedFamily`), read from its model_index.json."""
    model_config_name_or_path: str | None
    expert_rank_ratio: float = identity()
    unet_config: dict | None = identity(None)
    """From scratch: the denoiser's config (--model_config_name_or_path's content, sized to the base's VAE and text
    encoder: a moved file does not matter); None: the base's denoiser is fine-tuned."""


@dataclass
class Base:
    """The frozen parts of the base pipeline after the work done once per run."""

    noise_scheduler: SchedulerMixin
    denoiser: nn.Module
    prompts: list[str]
    family: PretrainedFamily
    """The step's x0 and condition: the VAE, and the text embeddings of the C class prompts and, in row C, of the
    empty prompt (the null condition)."""
    latent_shape: tuple[int, int, int]


class PretrainedFamily(ModelFamily):
    """A family the fine-tuning script trains: besides a step's x0 and condition, it loads its base pipeline's
    components, samples the validation grid and writes its pipeline and LoRA files.

    Subclasses set ``flag_defaults`` and ``pipeline_type`` (the diffusers pipeline class their outputs are) and
    implement :meth:`load_base`, :meth:`grid_pipeline`, :meth:`grid_prompts`,
    :meth:`cache_latents` and :meth:`write_lora`.
    """

    prompted = True
    flag_defaults: Mapping[str, Any] = {}
    """The family's values of the flags a user leaves unset: ``resolution``, ``target_modules`` (where the adapter
    goes), ``guidance_scale`` and, for families with T5 or a flow schedule, ``max_sequence_length`` and
    ``weighting_scheme``."""
    trains_from_scratch = False
    """Whether ``--model_config_name_or_path`` can train the family's denoiser from scratch (SD 1.x/2.x)."""
    guidance_embedded = False
    """Whether the denoiser takes the guidance scale as an input (guidance-distilled Flux)."""
    optional_text_encoders: tuple[str, ...] = ()
    """Text encoders the pipeline can do without (its ``encode_prompt`` fills their part with zeros): left out under
    ``--drop_t5``."""
    pipeline_type: Any = None
    vae: Any = None
    sampler = "DDIM (the paper samples with 50 steps)"
    """The saved pipeline's scheduler, for the model card."""

    @classmethod
    def resolve(cls, settings: TrainingSettings) -> TrainingSettings:
        """Settings that follow from the base model, resolved once when the flags are read (none here)."""
        return settings

    @classmethod
    def check_settings(cls, settings: TrainingSettings) -> None:
        """What the family requires of the flags, checked before any work."""
        objective = settings.objective
        if settings.model.model_config_name_or_path and not cls.trains_from_scratch:
            raise ConfigError(
                f"--model_config_name_or_path {settings.model.model_config_name_or_path}: trains a UNet from scratch "
                f"in the latent space of a Stable Diffusion 1.x/2.x base; the base is a {cls.pipeline_class}; "
                "allowed: an SD 1.x/2.x base, or leave it unset to fine-tune"
            )
        if objective.capacity_manipulation and objective.cm_forward == "shared_prefix":
            if not settings.model.expert_target_modules:
                raise ConfigError(
                    "--cm_forward shared_prefix: computes the down path once for theta and theta^g, but the experts "
                    "sit on every target layer, the down path's too; allowed: --cm_forward fused, or "
                    "--expert_target_modules with up_blocks layers only (e.g. 'up_blocks.*(to_q|to_k|to_v|to_out.0)')"
                )
        cls.check_text_encoders(settings)
        if settings.model.weighting_scheme is not None:
            raise ConfigError(
                f"--weighting_scheme {settings.model.weighting_scheme}: draws the timesteps of flow-matching families; "
                f"the base is a {cls.pipeline_class}; allowed: leave it unset"
            )

    @classmethod
    def check_text_encoders(cls, settings: TrainingSettings) -> None:
        """``--drop_t5`` only where the family's pipeline can do without T5."""
        if settings.model.drop_t5 and not cls.optional_text_encoders:
            raise ConfigError(
                f"--drop_t5: the base is a {cls.pipeline_class}, which cannot do without a text encoder; allowed: "
                "--drop_t5 with an SD3 base only"
            )

    @classmethod
    def card_note(cls, settings: TrainingSettings) -> str:
        """What the model card says of this family's run beyond the common part (none here)."""
        return ""

    @classmethod
    def weighting(cls, settings: TrainingSettings) -> FlowWeighting | None:
        """How a flow-matching family draws σ and weights the loss (None: a DDPM family)."""
        return None

    @classmethod
    def inference_scheduler(cls, noise_scheduler: SchedulerMixin) -> SchedulerMixin:
        """The scheduler of the grid and of the saved pipeline: DDIM, the paper's sampler (latents not clipped)."""
        return DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False)

    @classmethod
    def load_base(
        cls, settings: TrainingSettings, dataset: LabelledImageDataset, dtype: torch.dtype, device: torch.device
    ) -> Base:
        """The base pipeline's frozen parts and the family of this run, after the work done once (prompt encoding)."""
        raise NotImplementedError

    def grid_pipeline(self, denoiser: nn.Module, noise_scheduler: SchedulerMixin) -> Any:
        """A sampling pipeline around the model being trained, without text encoders (the prompts are embedded)."""
        raise NotImplementedError

    def grid_prompts(self, class_id: int, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's prompt arguments for `n` images of class `class_id`, the null condition as the negative."""
        raise NotImplementedError

    def cache_latents(
        self, dataset: LabelledImageDataset, flip: bool, settings: TrainingSettings, disable_bar: bool
    ) -> Dataset:
        """The training set encoded once (``--cache_latents``): items the family's :meth:`encode` reads."""
        raise NotImplementedError

    @classmethod
    def write_lora(cls, layers: dict[str, torch.Tensor], output_dir: Path, weight_name: str) -> None:
        """Write diffusers-format LoRA `layers` of the denoiser as the family's pipeline's ``load_lora_weights``
        reads them."""
        raise NotImplementedError


def base_family(name_or_path: str, *, cache_dir: str | None, revision: str | None) -> type[PretrainedFamily]:
    """The family of the base pipeline, from its ``model_index.json`` (no weights are read)."""
    from diffusers import DiffusionPipeline

    flag = "--pretrained_model_name_or_path"
    fine_tunable = [name for name, family in FAMILIES.items() if issubclass(family, PretrainedFamily)]
    source = hub_source(name_or_path, flag, "model", cache_dir, revision)
    try:
        config = DiffusionPipeline.load_config(source, cache_dir=cache_dir, revision=revision)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{flag} {name_or_path}: no readable model_index.json ({reason}); allowed: a folder or Hub id of a "
            f"{', '.join(fine_tunable)}"
        ) from None
    kind = config.get("_class_name")
    family = FAMILIES.get(kind)
    if family is None or not issubclass(family, PretrainedFamily):
        raise ConfigError(f"{flag} {name_or_path}: is a {kind}; allowed: {', '.join(fine_tunable)}")
    return family


def module_spec(value: str) -> list[str] | str:
    """``"to_q,to_k"`` -> a list (PEFT matches names and suffixes); a single regex stays a string."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if len(names) == 1 and re.search(r"[\\*+?()\[\]|^$]", names[0]):
        return names[0]
    return names


def adapter_config(settings: TrainingSettings) -> PeftConfig:
    """The CapMan dual adapter (lora mode), or a plain LoRA of the same general rank for the baseline; from scratch,
    the CapMan expert in full mode (the denoiser's own weights are θ^g)."""
    sd = settings.model
    if sd.unet_config is not None:
        return CapManConfig(
            mode="full", expert_rank_ratio=sd.expert_rank_ratio, target_modules=module_spec(sd.expert_target_modules)
        )
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


def add_adapter(denoiser: nn.Module, settings: TrainingSettings) -> nn.Module:
    """The adapter on the denoiser; from scratch without CM, the denoiser itself (every weight trains)."""
    if settings.model.unet_config is not None and not settings.objective.capacity_manipulation:
        return denoiser.requires_grad_(True)
    try:
        model = get_peft_model(denoiser, adapter_config(settings))
    except ValueError as err:
        raise ConfigError(f"--target_modules / --expert_target_modules: {err}") from None
    # get_peft_model takes the base's name from the model, and diffusers models carry none; capman-eval and
    # PeftModel users find the base model through it (from scratch there is none: the adapter holds every weight).
    if settings.model.unet_config is None:
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
            f"allowed: a {sd.family} pipeline folder with a {subfolder}/ component"
        )
    try:
        return cls.from_pretrained(
            name, subfolder=subfolder, revision=sd.revision, cache_dir=settings.data.cache_dir, **kwargs
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--pretrained_model_name_or_path {sd.pretrained_model_name_or_path}: cannot load {subfolder} "
            f"({first_line}); allowed: a {sd.family} pipeline folder or Hub id"
        ) from err


def load_denoiser(family: type[ModelFamily], settings: TrainingSettings) -> nn.Module:
    """The base pipeline's denoiser (safetensors only: a base with nothing but pickled .bin files is refused), or
    from scratch one initialised from ``--model_config_name_or_path`` (the same weights for the same ``--seed``)."""
    if settings.model.unet_config is not None:
        torch.manual_seed(settings.optimization.seed)
        return family.denoiser_class.from_config(settings.model.unet_config)
    denoiser = load_component(
        family.denoiser_class, settings, family.denoiser, variant=settings.model.variant, use_safetensors=True
    )
    for param in denoiser.parameters():  # a variant's files may be fp16; the base is cast per run (cast_frozen_weights)
        param.data = param.data.float()
    return denoiser


def load_vae(settings: TrainingSettings) -> Any:
    """The base pipeline's VAE, or ``--pretrained_vae_model_name_or_path`` (e.g. SDXL's fp16-safe VAE)."""
    from diffusers import AutoencoderKL

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


@torch.no_grad()
def sample_class_grid(
    pipeline: Any,
    family: PretrainedFamily,
    settings: TrainingSettings,
    dtype: torch.dtype,
    class_counts: Sequence[int],
) -> Image.Image:
    """``--num_validation_images`` per class (rows = classes; ``grid_classes`` of them for a set with many) from the
    precomputed prompt embeddings: the text encoders are not needed. Class c always starts from the same seeded
    noise, so grids compare across epochs."""
    device = getattr(pipeline, family.denoiser).device
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
