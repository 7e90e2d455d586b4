"""The class-conditional `UNet2DModel` trained from scratch: pixels in, class ids as the condition (paper sec. 4).

The family's parts: its settings (:class:`UNetSettings`), the UNet config (the paper's preset or a file) and the
model (:func:`build_unet`), where the experts may sit (:func:`check_expert_placement`), the step's x0 and condition
(:class:`ClassConditionalFamily`), the +ADA baseline's class embedding (:class:`AugmentedClassEmbedding`) and the
per-class grid (:func:`class_grid`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerMixin,
    UNet2DModel,
)
from torch import nn

from ..data import grid_classes
from ..data.augment import AUGMENT_CONDITION_DIM, augment_condition, augment_images
from ..errors import ConfigError
from ..hub import load_model_config
from ..pipelines import image_grid
from ..randomness import StepDraws
from ..settings import TrainingSettings, identity
from ..tuner import group_experts
from .base import AFTER_SPLIT, Condition, ModelFamily
from .class_conditional_pipeline import ClassConditionalPipeline
from .registry import register_family

logger = logging.getLogger("capman_peft")


@register_family
class ClassConditionalFamily(ModelFamily):
    """x0 is the pixels; the condition is the class id itself (``class_labels``), the null class ``num_classes``.

    With the +ADA baseline (``draws.augment``), x0 is the augmented pixels and the condition packs each class id with
    its augmentation's conditioning vector, a (B, 1 + 9) float tensor that :class:`AugmentedClassEmbedding` reads.
    """

    name = "class-conditional"
    pipeline_class = "ClassConditionalPipeline"
    denoiser_class = UNet2DModel
    loader = ClassConditionalPipeline

    @classmethod
    def from_pipeline(cls, pipe: Any, prompts: list[str] | None = None) -> ModelFamily:
        return cls()

    @classmethod
    def class_names(cls, pipe: Any, summary: Mapping[str, Any]) -> list[str] | None:
        """The pipeline's own names (a ``ClassConditionalPipeline`` keeps them), else the training summary's."""
        names = getattr(pipe, "class_names", None)
        return names if names is not None else super().class_names(pipe, summary)

    @classmethod
    def num_classes(cls, pipe: Any, summary: Mapping[str, Any]) -> int | None:
        count = getattr(pipe, "num_classes", None)
        return count if count is not None else super().num_classes(pipe, summary)

    def encode(self, batch: Mapping[str, Any], draws: StepDraws | None) -> torch.Tensor:
        if draws is None or draws.augment is None:
            return batch["pixel_values"]
        return augment_images(batch["pixel_values"], draws.augment)

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        if draws is None or draws.augment is None:
            return class_ids
        return torch.cat([class_ids[:, None].float(), augment_condition(draws.augment)], dim=1)

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        return {"class_labels": cond}


@register_family
class ConsistencyFamily(ClassConditionalFamily):
    """The class-conditional UNet trained as a consistency model (``--objective consistency``): the same denoiser
    and condition, saved as diffusers' ``ConsistencyModelPipeline``, which samples in one or two steps without
    guidance."""

    name = "consistency"
    pipeline_class = "ConsistencyModelPipeline"
    loader = ConsistencyModelPipeline
    scheduler_class = CMStochasticIterativeScheduler
    guided = False

    @classmethod
    def sampling_kwargs(cls, count: int, steps: int, guidance_scale: float) -> dict[str, Any]:
        return {"batch_size": count, "num_inference_steps": steps}


class GroupExpertFamily(ClassConditionalFamily):
    """The Group-Expert LoRA baseline (paper sec. E.4): each sample runs through the expert block of its class's group
    (`capman_peft.tuner.group_experts`). Routing is by class, so a label-dropped sample keeps its true class's group
    (the unconditional branch of guidance uses the requested class's group too), and CBDM's extra pass for y' uses
    y''s group. `class_groups[c]` is class c's group index (0 Many, 1 Medium, 2 Few)."""

    name = "class-conditional group experts"

    def __init__(self, class_groups: Sequence[int]) -> None:
        self.class_groups = torch.as_tensor(list(class_groups), dtype=torch.long)

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        null = len(self.class_groups)
        routed = class_ids if batch is None else torch.where(class_ids == null, batch["label"], class_ids)
        if batch is None and bool((routed == null).any()):
            raise ValueError("a group expert is chosen by the requested class; the null class alone has no group")
        groups = self.class_groups.to(routed.device)[routed]
        return {"class_labels": super().condition(class_ids, batch, draws), "group": groups}

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        return {"class_labels": cond["class_labels"]}

    def predict(self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> torch.Tensor:
        with group_experts(unet, cond["group"]):
            return super().predict(unet, sample, timestep, cond)


class AugmentedClassEmbedding(nn.Module):
    """The class embedding plus a bias-free linear embedding of the +ADA conditioning vector (the CBDM code's
    ``augm_embedding``), both added to the time embedding. Integer class ids (what a sampler passes) give the class
    embedding alone, the model's output without augmentation; so :func:`drop_augment_embedding` removes the linear
    part for export without changing any sample."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.augment = nn.Linear(AUGMENT_CONDITION_DIM, embedding.embedding_dim, bias=False)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if not labels.is_floating_point():
            return self.embedding(labels)
        return self.embedding(labels[:, 0].long()) + self.augment(labels[:, 1:])


def add_augment_embedding(unet: UNet2DModel) -> UNet2DModel:
    """`unet` with :class:`AugmentedClassEmbedding` in place of its class embedding (+ADA training)."""
    unet.class_embedding = AugmentedClassEmbedding(unet.class_embedding)
    return unet


def drop_augment_embedding(model: nn.Module) -> nn.Module:
    """`model` (a UNet, or the PEFT model around one) with its plain class embedding back: a diffusers UNet2DModel
    to export, sampled as ADA samples, with zero augmentation conditioning."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AugmentedClassEmbedding):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.embedding)
    return model


PIPELINE_NOTE = (
    "Load with `capman_peft.ClassConditionalPipeline.from_pretrained(path)` or "
    '`DiffusionPipeline.from_pretrained(path, custom_pipeline="pipeline", trust_remote_code=True)`.'
)
CONSISTENCY_PIPELINE_NOTE = (
    "A diffusers `ConsistencyModelPipeline`: `DiffusionPipeline.from_pretrained(path)`, then "
    "`pipe(batch_size=n, class_labels=[...], num_inference_steps=1)` (or 2); the class names are in class_names.json."
)
# What a CM run's card says about CM's measured effect (docs/study.md).
CM_QUALITY_NOTE = (
    " What CM does to the rare classes is measured in capman-peft's study (docs/study.md): no CM form has "
    "passed its rule on every testbed yet, and the shipped relative hinge made the rare classes worse than plain "
    "training on 16-px MNIST. Compare with a `--no_capacity_manipulation` run of the same data before relying on it."
)

# The paper's expert placement: every weight matrix of the up path (G.1): the resnets' convs and time-embedding
# projections, the attention projections and the upsampler convs.
UP_PATH_TARGETS = (
    r"up_blocks\..*\.(conv1|conv2|conv_shortcut|time_emb_proj|to_q|to_k|to_v|to_out\.0|upsamplers\.\d+\.conv)"
)


@dataclass(frozen=True)
class UNetSettings:
    """The model flags of this script, and the UNet config they resolve to.

    Not identity: the config's path (its content, ``unet_config``, is: a moved file does not matter).
    """

    model_config_name_or_path: str | None
    expert_rank_ratio: float = identity()
    expert_target_modules: str = identity()
    ada_probability: float = identity()
    group_experts: bool = identity()
    unet_config: dict = identity()
    """The content of --model_config_name_or_path (or the paper's preset): a moved config file does not matter."""


def check_expert_placement(settings: TrainingSettings) -> None:
    """``--cm_forward shared_prefix`` runs the down path once for θ and θ^g, so every expert must sit after it (the
    layers the regex selects are found on a model built without memory, before any data is read), and the UNet must
    not use the timesteps after the up path (a Fourier time embedding does)."""
    objective, model = settings.objective, settings.model
    if not objective.capacity_manipulation or objective.cm_forward != "shared_prefix":
        return
    if model.unet_config.get("time_embedding_type") == "fourier":
        # UNet2DModel divides its output by the timesteps of the batch it was given, which the duplicated up path
        # does not match.
        raise ConfigError(
            "--cm_forward shared_prefix: does not work with a Fourier time embedding (--model_config_name_or_path "
            "has time_embedding_type 'fourier'); allowed: --cm_forward fused"
        )
    with torch.device("meta"):
        unet = build_unet(model.unet_config, settings.data.resolution, 2)
    chosen = [name for name, _ in unet.named_modules() if re.fullmatch(model.expert_target_modules, name)]
    outside = [name for name in chosen if not name.startswith(AFTER_SPLIT)]
    if outside:
        raise ConfigError(
            f"--expert_target_modules {model.expert_target_modules}: puts experts before the up path ({outside[0]}, "
            f"{len(outside)} layers), which --cm_forward shared_prefix computes once for theta and theta^g; allowed: "
            "--cm_forward fused, or experts in up_blocks only"
        )


def unet_config(model_config_name_or_path: str | None, resolution: int) -> dict:
    """The UNet2DModel config: ``--model_config_name_or_path`` or the paper's preset, checked against --resolution."""
    if model_config_name_or_path:
        config = load_model_config(UNet2DModel, model_config_name_or_path)
    else:
        levels = 4
        attention = [resolution // 2**i == 16 for i in range(levels)]
        config = dict(
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            dropout=0.1,
            attention_head_dim=64,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        )
    factor = 2 ** (len(config.get("block_out_channels", ())) - 1)
    if resolution % factor:
        raise ConfigError(
            f"--resolution {resolution}: the UNet downsamples by {factor}; allowed: a multiple of {factor}"
        )
    return config


def build_unet(config: dict, resolution: int, num_classes: int) -> UNet2DModel:
    """The UNet from `config`, with one class embedding per class plus the null class."""
    return UNet2DModel.from_config({**config, "sample_size": resolution, "num_class_embeds": num_classes + 1})


def class_grid(
    unet: torch.nn.Module | Sequence[torch.nn.Module],
    scheduler: DDPMScheduler,
    class_names: list[str],
    class_counts: Sequence[int],
    settings: TrainingSettings,
    device,
    class_groups: Sequence[int] | None = None,
):
    """A per-class sample grid (rows = classes; ``grid_classes`` of them for a set with many) with DDIM and
    guidance, from fixed seeds; with `class_groups`, `unet` is one UNet per group. A consistency model's scheduler
    (``CMStochasticIterativeScheduler``) samples in one step instead, without guidance."""
    output = settings.output
    shown = grid_classes(class_counts)
    labels = [c for c in shown for _ in range(output.num_validation_images)]
    if isinstance(scheduler, CMStochasticIterativeScheduler):
        pipeline = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
        options = ConsistencyFamily.sampling_kwargs(len(labels), 1, output.guidance_scale)
    else:
        ddim = DDIMScheduler.from_config(scheduler.config)
        pipeline = class_conditional_pipeline(unet, ddim, class_names, class_groups)
        options = {"num_inference_steps": output.num_inference_steps, "guidance_scale": output.guidance_scale}
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(settings.optimization.seed)
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    with torch.no_grad():
        images = pipeline(class_labels=labels, generator=generator, **options).images
    pipeline.unet.train(was_training)
    return image_grid(images, rows=len(shown), cols=output.num_validation_images)


def class_conditional_pipeline(
    unets: UNet2DModel | Sequence[UNet2DModel],
    scheduler: SchedulerMixin,
    class_names: list[str] | None,
    class_groups: Sequence[int] | None = None,
) -> ClassConditionalPipeline:
    """The pipeline of one UNet, or of one UNet per class group (Many, Medium, Few; the Group-Expert LoRA baseline)
    with `class_groups[c]` the group of class c."""
    unets = [unets] if isinstance(unets, torch.nn.Module) else list(unets)
    id2label = None if class_names is None else dict(enumerate(class_names))
    groups = {}
    if class_groups is not None:
        groups = dict(unet_medium=unets[1], unet_few=unets[2], class_groups=dict(enumerate(class_groups)))
    return ClassConditionalPipeline(unet=unets[0], scheduler=scheduler, id2label=id2label, **groups)


def save_class_conditional_pipeline(
    unets: UNet2DModel | Sequence[UNet2DModel],
    scheduler: SchedulerMixin,
    class_names: list[str] | None,
    output_dir: str | Path,
    class_groups: Sequence[int] | None = None,
) -> Path:
    """Write a loadable pipeline folder: model_index.json, unet/ (and unet_medium/, unet_few/ with class groups),
    scheduler/ and pipeline.py.

    Weights are written as safetensors only. The folder loads with
    `ClassConditionalPipeline.from_pretrained(output_dir)` and, without capman_peft, with
    `DiffusionPipeline.from_pretrained(output_dir, custom_pipeline="pipeline", trust_remote_code=True)`.

    Args:
        class_names: names of the classes 0..C-1 in id order (the null class C is not named).
    """
    pipeline = class_conditional_pipeline(unets, scheduler, class_names, class_groups)
    output_dir = Path(output_dir)
    pipeline.save_pretrained(str(output_dir), safe_serialization=True)
    return output_dir


def check_consistency_flags(settings: TrainingSettings) -> None:
    """``--objective consistency``: refuse what does not carry over to consistency training (one line each)."""
    objective, model = settings.objective, settings.model
    refused = {
        "--coral": objective.coral,
        "--group_experts": model.group_experts,
        f"--ada_probability {model.ada_probability}": model.ada_probability > 0,
        f"--focal_gamma {objective.focal_gamma}": objective.focal_gamma is not None,
        f"--snr_gamma {objective.snr_gamma}": objective.snr_gamma is not None,
    }
    for flag, given in refused.items():
        if given:
            raise ConfigError(
                f"{flag}: has no meaning in consistency training (--objective consistency); allowed: the flag "
                "with --objective ddpm, cbdm or oc"
            )
    if objective.label_dropout > 0:
        logger.warning(
            "--label_dropout %g: a consistency model samples without guidance, so the null class this trains is never "
            "used; --label_dropout 0 (the recipes') gives every image its class",
            objective.label_dropout,
        )


def training_scheduler(consistency: bool) -> SchedulerMixin:
    """The schedule a UNet trains on: DDPM's linear betas (paper G.1), or the consistency model's (its sampler)."""
    if consistency:
        return CMStochasticIterativeScheduler()
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def save_trained_pipeline(
    unets: UNet2DModel | Sequence[UNet2DModel],
    scheduler: SchedulerMixin,
    class_names: list[str],
    output_dir: str | Path,
    class_groups: Sequence[int] | None = None,
) -> Path:
    """The output folder of a run on `scheduler` (its training schedule): a diffusers ``ConsistencyModelPipeline``
    with the class names in id order (class_names.json) for a consistency model, else the class-conditional
    pipeline with DDIM (``save_class_conditional_pipeline``). Safetensors only; both load with plain diffusers."""
    if not isinstance(scheduler, CMStochasticIterativeScheduler):
        ddim = DDIMScheduler.from_config(scheduler.config)
        return save_class_conditional_pipeline(unets, ddim, class_names, output_dir, class_groups)
    output_dir = Path(output_dir)
    ConsistencyModelPipeline(unet=unets, scheduler=scheduler).save_pretrained(str(output_dir), safe_serialization=True)
    (output_dir / "class_names.json").write_text(json.dumps(class_names, indent=1))
    return output_dir
