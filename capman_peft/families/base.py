"""What a model family is to the rest of the product: how a batch becomes the denoiser's input, how class ids become
the UNet's condition, and how the UNet is called with it. Training, the expert-use report and `CMDenoiser` go through
this interface and never ask which family they hold.

A condition is one tensor, or a dict of tensors (e.g. SDXL's text embeddings, pooled embeddings and time ids), with one
row per sample in every tensor: it can be stacked and indexed by rows like the batch itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import cast_training_params
from torch import nn

from ..randomness import StepDraws

Condition = torch.Tensor | dict[str, torch.Tensor]
# The modules of a diffusers UNet that run after the up path begins: `CMDenoiser`'s shared_prefix mode duplicates the
# batch there, so with it experts may sit only in these.
AFTER_SPLIT = ("up_blocks.", "conv_norm_out", "conv_out")


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to `dtype` (memory); trainable ones to float32 (optimizer updates must not round away)."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)
    cast_training_params(model, torch.float32)


def take_rows(cond: Condition, rows: torch.Tensor) -> Condition:
    """The rows `rows` of every tensor of a condition."""
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    return {key: value[rows] for key, value in cond.items()}


def concat(conds: Sequence[Condition]) -> Condition:
    """Conditions stacked along the rows, as the batch they belong to is stacked."""
    if isinstance(conds[0], torch.Tensor):
        return torch.cat(list(conds))
    return {key: torch.cat([cond[key] for cond in conds]) for key in conds[0]}


class ModelFamily:
    """One model family (class-conditional UNet, Stable Diffusion, ...): everything that differs between families.

    A family is one plugin, registered by the pipeline class its outputs are saved as
    (:func:`capman_peft.families.register_family`): the rest of the product looks it up from a ``model_index.json``
    or a loaded pipeline and never asks which family it holds. An instance is the per-run part (a training step's x0
    and condition, and how the denoiser is called); the class methods are what a saved output needs (loading it,
    its class names and prompts).

    Subclasses set ``name``, ``pipeline_class`` and ``denoiser_class`` and implement :meth:`encode`,
    :meth:`condition`, :meth:`unet_kwargs` and :meth:`from_pipeline`.
    """

    name: str = ""
    pipeline_class: str = ""
    """``_class_name`` in the ``model_index.json`` of the family's pipelines: the registry's key."""
    denoiser: str = "unet"
    """The pipeline component that is trained."""
    denoiser_class: type[nn.Module] | None = None
    """The diffusers class of that component (the base a saved adapter is loaded onto)."""
    prompted: bool = False
    """Whether classes are given to the model as text prompts (else as class ids)."""
    loader: Any = DiffusionPipeline
    """The class whose ``from_pretrained`` loads a saved output of this family."""
    scheduler_class: Any = DDPMScheduler
    """The training scheduler (from the saved sampler's config): the noise schedule follows from it."""
    bottleneck_module: str | None = "mid_block"
    """The denoiser's bottleneck, whose output ``--coral`` contrasts (None: the family has none, e.g. a transformer)."""
    guided: bool = True
    """Whether the pipeline takes a guidance scale (a consistency model samples without one)."""

    @classmethod
    def from_pipeline(cls, pipe: Any, prompts: list[str] | None = None) -> ModelFamily:
        """The family of a loaded pipeline, ready to encode images and class ids (`prompts`: one per class, for a
        prompted family)."""
        raise NotImplementedError

    @classmethod
    def load_kwargs(cls, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``loader.from_pretrained`` that load a saved output as it was trained (`summary`: its
        ``training_summary.json``)."""
        return {}

    @classmethod
    def class_names(cls, pipe: Any, summary: Mapping[str, Any]) -> list[str] | None:
        """The class names of a saved output in its class-id order (`summary`: its ``training_summary.json``)."""
        return summary.get("class_names")

    @classmethod
    def num_classes(cls, pipe: Any, summary: Mapping[str, Any]) -> int | None:
        """C, the number of real classes of a saved output, where the output says (else None)."""
        names = cls.class_names(pipe, summary)
        return None if names is None else len(names)

    @classmethod
    def sampling_kwargs(cls, count: int, steps: int, guidance_scale: float) -> dict[str, Any]:
        """How the saved pipeline is asked for `count` images in `steps` steps at `guidance_scale`."""
        return {"num_inference_steps": steps, "guidance_scale": guidance_scale}

    def encode(self, batch: Mapping[str, Any], draws: StepDraws | None) -> torch.Tensor:
        """The batch in the denoiser's input space (pixels, or VAE latents): x0. `draws` carries the step's flips and
        posterior noise where the family draws them; None gives the deterministic encoding (the posterior mean)."""
        raise NotImplementedError

    def condition(
        self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None, draws: StepDraws | None = None
    ) -> Condition:
        """The UNet's condition for `class_ids` (the null class is ``num_classes``); `batch` gives what a family
        takes per image besides the class (e.g. original sizes), `draws` the step's random choices it conditions on
        (e.g. the +ADA augmentation); without them, the condition a sampler uses."""
        raise NotImplementedError

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        """The UNet call's keyword arguments for a condition."""
        raise NotImplementedError

    def predict(self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The UNet's prediction for `sample` at `timestep` under `cond`."""
        return unet(sample, timestep, **self.unet_kwargs(cond), return_dict=False)[0]

    @classmethod
    def bottleneck_channels(cls, denoiser: nn.Module) -> int:
        """The channels of the bottleneck's output (a UNet's deepest level)."""
        return denoiser.config.block_out_channels[-1]

    @classmethod
    def split_modules(cls, denoiser: nn.Module) -> list[nn.Module]:
        """Where ``--cm_forward shared_prefix`` duplicates the batch into θ and θ^g rows: every module after the split
        that takes batch-sized inputs computed before it (a UNet's up blocks); what runs before them runs once."""
        return list(denoiser.up_blocks)

    @classmethod
    def after_split(cls, denoiser: nn.Module) -> tuple[str, ...]:
        """Prefixes of the module names after the split: the only places experts may sit under shared_prefix."""
        return AFTER_SPLIT
