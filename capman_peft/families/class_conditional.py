"""The class-conditional `UNet2DModel` trained from scratch: pixels in, class ids as the condition (paper sec. 4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..randomness import StepDraws
from .base import Condition, ModelFamily


class ClassConditionalFamily(ModelFamily):
    """x0 is the pixels; the condition is the class id itself (``class_labels``), the null class ``num_classes``."""

    name = "class-conditional"

    def encode(self, batch: Mapping[str, Any], draws: StepDraws | None) -> torch.Tensor:
        return batch["pixel_values"]

    def condition(self, class_ids: torch.Tensor, batch: Mapping[str, Any] | None = None) -> Condition:
        return class_ids

    def unet_kwargs(self, cond: Condition) -> dict[str, Any]:
        return {"class_labels": cond}
