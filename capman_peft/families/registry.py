"""The table of model families, keyed by the pipeline class their outputs are saved as (``model_index.json``'s
``_class_name``). A family joins it with :func:`register_family`; nothing else in the product lists families."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..tuner import base_model
from .base import ModelFamily

FAMILIES: dict[str, type[ModelFamily]] = {}


def register_family(family: type[ModelFamily]) -> type[ModelFamily]:
    """Add `family` to the table under its ``pipeline_class`` (usable as a class decorator)."""
    if not family.pipeline_class or not family.name or family.denoiser_class is None:
        raise ValueError(f"{family.__name__}: a family needs name, pipeline_class and denoiser_class")
    FAMILIES[family.pipeline_class] = family
    return family


def family_class(pipeline_class: Any, where: str) -> type[ModelFamily]:
    """The family of pipelines saved as `pipeline_class`; an unknown one is one error naming `where` (a flag or a
    file) and the supported pipelines."""
    if pipeline_class not in FAMILIES:
        raise ConfigError(f"{where}: is a {pipeline_class}; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[pipeline_class]


def family_named(name: str) -> type[ModelFamily]:
    """The registered family called `name` (a run's settings record the family by name)."""
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise ConfigError(f"family {name!r}: not registered; allowed: {', '.join(f.name for f in FAMILIES.values())}")


def family_of_pipeline(pipe: Any, prompts: list[str] | None = None) -> ModelFamily:
    """The family of a loaded pipeline, ready to encode images and class ids (`prompts`: one per class, encoded once
    with the pipeline's text encoder(s) for a prompted family)."""
    return family_class(type(pipe).__name__, "pipeline").from_pipeline(pipe, prompts)


def family_of_denoiser(model: nn.Module) -> ModelFamily:
    """The first registered family whose denoiser `model` (or the model a PEFT wrapper holds) is: it can call the
    denoiser, but holds no VAE or prompt table to encode images or class ids."""
    base = base_model(model)
    for family in FAMILIES.values():
        if type(base) is family.denoiser_class:
            return family()
    raise ValueError(f"no registered family has a {type(base).__name__} denoiser; pass the family")


def pipeline_resolution(pipe: Any) -> int:
    """Side length of the images a pipeline generates by default (the denoiser's sample size, times the VAE's factor
    where the family has a VAE)."""
    size = getattr(pipe, "default_sample_size", None)  # the pipeline's own default where it has one (SDXL, SD3, Flux)
    if size is None:
        size = getattr(pipe, family_class(type(pipe).__name__, "pipeline").denoiser).config.sample_size
    size = size if isinstance(size, int) else size[0]
    return int(size * getattr(pipe, "vae_scale_factor", 1)) if hasattr(pipe, "vae") else int(size)
