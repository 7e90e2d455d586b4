"""Is the reserved expert used? Per class, how far the expert moves the prediction, mean (ε_θ − ε_θg)², with the
denoising loss of θ and of θ^g, on fixed noise and timesteps (ε: what the noise schedule predicts, also v, a flow's
velocity or x₀, a consistency model's f; the report names it).

Training measures it at the end of every CM run (``training_summary.json``, the model card, one log line:
:func:`summarize_expert_use`); ``capman-analyze capacity`` measures it on a saved run (:func:`measure_expert_use`).
Both use the same fixed batches (:func:`fixed_batches`), so the two numbers agree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import LabelledImageDataset
from .errors import ConfigError
from .families import Condition, ModelFamily, concat
from .objective import NoiseSchedule, noise_schedule
from .objective.schedule import PREDICTED
from .randomness import derived_seed
from .tuner import expert_disabled

logger = logging.getLogger("capman_peft")


@dataclass
class LossSetup:
    """What the per-class loss needs: the noise schedule and the model family (how pixels become x0, class ids a
    condition, and how the UNet is called).

    (Not a denoising model: :class:`capman_peft.denoiser.CMDenoiser` is that.)
    """

    unet: nn.Module
    schedule: NoiseSchedule
    family: ModelFamily
    device: torch.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> x0 in the UNet's sample space (deterministic: a VAE's posterior mean)."""
        return self.family.encode({"pixel_values": pixels}, None)

    def condition(self, class_ids: torch.Tensor) -> Condition:
        return self.family.condition(class_ids)

    def predict(self, model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """`model`'s prediction (θ, θ^g, a pruned copy: any denoiser of this family) at the schedule's timesteps `t`."""
        return self.schedule.denoise(lambda x, time: self.family.predict(model, x, time, cond), noisy, t)


@dataclass
class FixedBatch:
    class_id: int
    noisy: torch.Tensor
    timesteps: torch.Tensor
    condition: Condition
    target: torch.Tensor


@torch.no_grad()
def fixed_batches(
    loss_setup: LossSetup,
    data: LabelledImageDataset,
    num_classes: int,
    *,
    num_batches: int = 4,
    batch_size: int = 32,
    seed: int = 0,
) -> Iterator[FixedBatch]:
    """``num_batches`` noised batches of ``batch_size`` training images per class, the same on every call."""
    labels = np.asarray(data.labels)
    schedule = loss_setup.schedule
    needed = num_batches * batch_size
    for c in range(num_classes):
        indices = np.flatnonzero(labels == c)
        if len(indices) == 0:
            raise ConfigError(f"class {c} ({data.class_names[c]!r}) has no training images")
        pixels = torch.stack([data[int(i)]["pixel_values"] for i in indices[:needed]])
        for b in range(num_batches):
            rows = torch.arange(b * batch_size, (b + 1) * batch_size) % len(pixels)  # cycle through small classes
            x0 = loss_setup.encode(pixels[rows].to(loss_setup.device))
            generator = torch.Generator().manual_seed(derived_seed(seed, c, b))
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            t = schedule.draw_timesteps(batch_size, generator, "cpu").to(loss_setup.device)
            y = torch.full((batch_size,), c, dtype=torch.long, device=loss_setup.device)
            yield FixedBatch(
                c,
                schedule.add_noise(x0, noise, t),
                t,
                loss_setup.condition(y),
                schedule.target(x0, noise, t),
            )


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def measure_expert_use(
    capman: nn.Module,
    loss_setup: LossSetup,
    data: LabelledImageDataset,
    *,
    num_classes: int,
    num_batches: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    rows_per_call: int = 64,
) -> dict[str, list[float]]:
    """Per class: ``expert_usage`` = mean (ε_θ − ε_θg)², and the loss of θ (``loss_full``) and θ^g
    (``loss_general``), on the fixed batches of ``fixed_batches`` (a CapMan model with its experts, in eval mode).

    The batches of consecutive classes are stacked into UNet calls of about `rows_per_call` rows, so that thousands
    of small classes cost calls in proportion to their images, not to their number."""
    was_training = capman.training
    capman.eval()
    sums = {k: torch.zeros(num_classes, dtype=torch.float64) for k in ("expert_usage", "loss_full", "loss_general")}
    counts = torch.zeros(num_classes, dtype=torch.float64)
    pending: list[FixedBatch] = []

    def measure_pending() -> None:
        noisy, timesteps = torch.cat([b.noisy for b in pending]), torch.cat([b.timesteps for b in pending])
        condition, target = concat([b.condition for b in pending]), torch.cat([b.target for b in pending])
        class_ids = torch.cat([torch.full((len(b.timesteps),), b.class_id) for b in pending])
        full = loss_setup.predict(capman, noisy, timesteps, condition)
        with expert_disabled(capman):
            general = loss_setup.predict(capman, noisy, timesteps, condition)
        for key, (a, b) in {
            "expert_usage": (full, general),
            "loss_full": (full, target),
            "loss_general": (general, target),
        }.items():
            sums[key].index_add_(0, class_ids, per_sample_mse(a, b).double().cpu())
        counts.index_add_(0, class_ids, torch.ones(len(class_ids), dtype=torch.float64))
        pending.clear()

    batches = fixed_batches(loss_setup, data, num_classes, num_batches=num_batches, batch_size=batch_size, seed=seed)
    for batch in tqdm(batches, total=num_classes * num_batches, desc="Per-class expert usage", disable=not progress):
        pending.append(batch)
        if sum(len(b.timesteps) for b in pending) >= rows_per_call:
            measure_pending()
    if pending:
        measure_pending()
    capman.train(was_training)
    return {k: (v / counts).tolist() for k, v in sums.items()}


# Few-class distance / Many-class distance below which the expert counts as unused, and the training images per class
# of the end-of-training check.
EXPERT_USE_RATIO = 10.0
EXPERT_USE_IMAGES = 16


def summarize_expert_use(
    capman: nn.Module,
    noise_scheduler: Any,
    data: Any,
    family: ModelFamily,
    images_per_class: int = EXPERT_USE_IMAGES,
) -> dict[str, Any]:
    """Is the reserved expert used? theta vs theta^g per split on a fixed batch of training images per class
    (fixed noise and timesteps, dropout off), for ``training_summary.json``, the model card and the log line it
    writes.

    Per split: ``distance`` = mean (ε_θ − ε_θg)² (ε: the target of ``prediction_type``), ``loss_full`` /
    ``loss_general`` = the denoising loss of theta / theta^g. The expert counts as used when the Few distance is at
    least 10x the Many distance.
    """
    device = next(capman.parameters()).device
    loss_setup = LossSetup(capman, noise_schedule(noise_scheduler), family, device)
    num_classes = data.num_classes
    values = measure_expert_use(
        capman, loss_setup, data, num_classes=num_classes, num_batches=1, batch_size=images_per_class
    )
    groups = data.splits
    splits = {
        split: {
            "distance": float(np.mean([values["expert_usage"][c] for c in ids])),
            "loss_full": float(np.mean([values["loss_full"][c] for c in ids])),
            "loss_general": float(np.mean([values["loss_general"][c] for c in ids])),
        }
        for split, ids in groups.items()
        if ids
    }
    many, few = splits["many"]["distance"], splits["few"]["distance"]
    # A zero Few distance is an unused (dead) expert, whatever the Many distance is.
    ratio = few / many if many > 0 else (math.inf if few > 0 else 0.0)
    report = {
        "prediction_type": loss_setup.schedule.prediction_type,
        "images_per_class": images_per_class,
        "splits": splits,
        "per_class_distance": values["expert_usage"],
        "few_over_many": ratio,
        "expert_used": ratio >= EXPERT_USE_RATIO,
    }
    logger.info(describe_expert_use(report))
    return report


def describe_expert_use(report: dict[str, Any]) -> str:
    """One line: the per-split distances, theta^g's loss increase, and whether the expert is used."""
    splits = report["splits"]
    distances = ", ".join(f"{k} {v['distance']:.2g}" for k, v in splits.items())
    losses = ", ".join(f"{k} {100 * (v['loss_general'] / v['loss_full'] - 1):+.0f}%" for k, v in splits.items())
    if report["expert_used"]:
        verdict = "the expert is used"
    elif splits["few"]["distance"] == 0:
        verdict = "the expert is unused (theta and theta^g agree exactly): CM acts like plain training here"
    else:
        verdict = f"the expert is barely used (Few/Many < {EXPERT_USE_RATIO:g}x): CM acts like plain training here"
    p = PREDICTED[report["prediction_type"]]
    return (
        f"Expert use: mean ({p}_θ − {p}_θg)² {distances} (Few/Many {report['few_over_many']:.3g}x); "
        f"loss of theta^g over theta {losses}: {verdict}."
    )
