"""Balanced, seeded generation: the same number of images for every class, each from its own seeded noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..families import family_class, pipeline_resolution
from ..randomness import derived_seed


def _check_settings(num_images_per_class: int, steps: int, guidance_scale: float, batch_size: int, seed: int) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1

    if not positive_int(num_images_per_class):
        raise ConfigError(f"num_images_per_class must be an integer >= 1, got {num_images_per_class!r}")
    if not positive_int(steps):
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not positive_int(batch_size):
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {guidance_scale!r}")


@torch.no_grad()
def generate_balanced(
    pipe: Any,
    num_images_per_class: int,
    num_classes: int,
    *,
    prompts: Sequence[str] | None = None,
    steps: int = 50,
    guidance_scale: float = 1.5,
    seed: int = 0,
    batch_size: int = 64,
    resolution: int | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images_per_class`` images of every class as uint8 ``N x 3 x H x W`` (class-major order) and labels.

    Image k of class c starts from its own seeded noise (:func:`derived_seed` of ``(seed, c, k)``), so a set is
    reproducible whatever the batch size. ``prompts`` (one per class) switches to a text-to-image call;
    ``resolution`` is the SD height/width, and class-conditional images of another size are resized (bilinear,
    antialiased) to it.
    """
    from tqdm.auto import tqdm

    family = family_class(type(pipe).__name__, "pipeline")
    jobs = [(c, k) for c in range(num_classes) for k in range(num_images_per_class)]
    chunks = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="Generating", unit="batch", disable=not progress):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(derived_seed(seed, c, k)) for c, k in batch]
        labels = [c for c, _ in batch]
        kwargs = family.sampling_kwargs(len(batch), steps, guidance_scale)
        kwargs.update(generator=generators, output_type="pt")
        if prompts is None:
            images = pipe(class_labels=labels, **kwargs).images
        else:
            size = resolution or pipeline_resolution(pipe)
            images = pipe(prompt=[prompts[c] for c in labels], height=size, width=size, **kwargs).images
        images = images.float().cpu()
        if resolution is not None and images.shape[-1] != resolution:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
        chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8))
    labels = torch.tensor([c for c, _ in jobs])
    return torch.cat(chunks), labels
