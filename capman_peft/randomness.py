"""Every seed the project derives, in one place, and the random choices of a training step.

* :func:`step_seed`: training steps draw from a generator seeded by (seed, step, process, stream), so a resumed run
  takes exactly the steps an uninterrupted one would, and gradient accumulation equals one larger batch;
* :func:`epoch_order_seed`: the data order of an epoch;
* :func:`derived_seed`: evaluation and analysis (an image's noise from (seed, class, index), a fixed batch's from
  (seed, class, batch)), independent of batch size and of the other classes.

The three formulas differ because checkpoints and published numbers depend on them: a run resumed from an existing
checkpoint must draw what it would have drawn, so none of them may change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

# Independent random streams derived from one step seed (see `step_seed`).
DRAW_STREAM, DROPOUT_STREAM = 0, 1


def step_seed(seed: int, step: int, process_index: int, stream: int = DRAW_STREAM) -> int:
    """A seed per (run, step, process, stream): the random choices of a step depend only on these, so a resumed run
    takes exactly the steps an uninterrupted one would. Hashing a tuple of ints is stable across processes."""
    return hash((seed, step, process_index, stream)) % (2**63)


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's data order: a resumed run sees its batches in the order an uninterrupted one would."""
    return seed * 100_003 + epoch


def derived_seed(*keys: int) -> int:
    """A 32-bit seed derived from ``keys`` (``numpy.random.SeedSequence``): e.g. ``(seed, class_id, index)`` for an
    image, independent of batch size and of the other classes generated, or ``(seed, class_id, batch)``."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@dataclass
class StepDraws:
    """The random choices of a batch, one row per sample.

    ``noise`` and ``timesteps`` make x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; ``label_dropped`` swaps the
    condition for the null one; ``extra_labels`` is CBDM's y' (None for other objectives). Latent-diffusion training
    adds ``flip`` (horizontal flip of the image) and ``latent_noise`` (VAE posterior sample z = mean + std * noise).
    ``general_draw`` (uniform in [0, 1)) picks the rows of the theta^g pass when it runs on part of the batch.
    ``augment`` holds the +ADA baseline's augmentation parameters (:func:`draw_augmentation`). ``caption_draw``
    (uniform in [0, 1)) picks one of an image's alternative captions (the lines of its caption).
    """

    noise: torch.Tensor
    timesteps: torch.Tensor
    label_dropped: torch.Tensor
    extra_labels: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    latent_noise: torch.Tensor | None = None
    general_draw: torch.Tensor | None = None
    augment: torch.Tensor | None = None
    caption_draw: torch.Tensor | None = None

    def rows(self, start: int, stop: int, device: torch.device | str) -> StepDraws:
        """Rows ``start:stop`` on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return StepDraws(
            **{k: None if v is None else v[start:stop].to(device, non_blocking=True) for k, v in values.items()}
        )


def draw_step(
    generator: torch.Generator | None,
    num_samples: int,
    sample_shape: Sequence[int],
    *,
    label_dropout: float,
    objective: Any,
    noise_offset: float = 0.0,
    flip: bool = False,
    latent_noise: bool = False,
    general_draw: bool = False,
    augment_probability: float = 0.0,
    caption_draw: bool = False,
) -> StepDraws:
    """Draw every random choice of `num_samples` samples at once, on the generator's device (None: the global RNG,
    on the CPU).

    Args:
        sample_shape: shape of one x0 (C, H, W).
        noise_offset: adds ``noise_offset * N(0, 1)`` per sample and channel to the noise (diffusers' flag).
        flip, latent_noise: also draw flips (p = 0.5) and VAE posterior noise of `sample_shape`.
        general_draw: also draw one uniform per sample for choosing the rows of a partial theta^g pass.
        augment_probability: > 0 also draws the +ADA augmentation of every sample (:func:`draw_augmentation`).
        caption_draw: also draw one uniform per sample for choosing among its captions (drawn last: the other draws
            are those of a run without captions).
    """
    rng = {"generator": generator, "device": generator.device if generator is not None else "cpu"}
    shape = (num_samples, *sample_shape)
    noise = torch.randn(shape, **rng)
    if noise_offset:
        noise += noise_offset * torch.randn((num_samples, shape[1], *[1] * (len(shape) - 2)), **rng)
    timesteps = objective.schedule.draw_timesteps(num_samples, **rng)
    dropped = torch.rand(num_samples, **rng) < label_dropout
    # CBDM's y' ~ Categorical(N_c) does not depend on y, so placeholder labels of the right length suffice.
    extra = objective.extra_labels(
        torch.zeros(num_samples, dtype=torch.long, device=rng["device"]), generator=generator
    )
    flips = torch.rand(num_samples, **rng) < 0.5 if flip else None
    posterior = torch.randn(shape, **rng) if latent_noise else None
    general = torch.rand(num_samples, **rng) if general_draw else None
    augment = draw_augmentation(num_samples, augment_probability, **rng) if augment_probability > 0 else None
    captions = torch.rand(num_samples, **rng) if caption_draw else None
    return StepDraws(noise, timesteps, dropped, extra, flips, posterior, general, augment, captions)


def draw_augmentation(
    num_samples: int, probability: float, *, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """The parameters (B, 8) of k-diffusion's `KarrasAugmentationPipeline`, which the CBDM authors' code uses for
    its ADA baseline: a0 x-flip (always drawn, p = 1/2), a1 y-flip, a2 log-scale ~ N(0, 1), a3 rotation ~ U[-pi, pi),
    a4 anisotropy angle ~ U[-pi, pi) and a5 its log-strength ~ N(0, 1), a6 and a7 translation ~ N(0, 1); each
    group after the x-flip is applied with probability `probability` (else 0, the identity). The images and the
    model's conditioning vector are made from them by `capman_peft.data.augment`."""
    rng = {"generator": generator, "device": device}
    do = (torch.rand(num_samples, 5, **rng) < probability).float()  # y-flip, scale, rotation, anisotropy, translation
    flips = torch.randint(0, 2, (num_samples, 2), **rng).float()
    angles = torch.rand(num_samples, 2, **rng) * 2 * math.pi - math.pi
    normals = torch.randn(num_samples, 4, **rng)  # scale, anisotropy strength, translation x and y
    return torch.stack(
        [
            flips[:, 0],
            flips[:, 1] * do[:, 0],
            normals[:, 0] * do[:, 1],
            angles[:, 0] * do[:, 2],
            angles[:, 1] * do[:, 3],
            normals[:, 1] * do[:, 3],
            normals[:, 2] * do[:, 4],
            normals[:, 3] * do[:, 4],
        ],
        dim=1,
    )


class StepRandomness:
    """Per-step random choices that make resume exact and gradient accumulation equal to one larger batch.

    The choices of a whole optimizer step (processes x accumulation x batch rows) are drawn at once from a generator
    seeded by (seed, step); the micro-batch that is block k of the step takes rows ``k*B:(k+1)*B``, where k counts the
    step's batches in the order the data loader deals them (micro-batch m of process p is block m*P + p). Sample j
    of a step therefore gets the same noise, timestep and label-dropout decision whether the step is 1 x 2B, 2 x B
    accumulated or 2 processes x B, and since every objective term is a per-sample mean, these train the same model
    (OC, whose references come from the batch, is the exception). Model dropout uses the global RNG, reseeded per
    block from an independent stream. Every process draws the whole step (P times the noise of its own rows).
    """

    def __init__(
        self, accelerator: Accelerator, seed: int, batch_size: int, sample_shape: Sequence[int], **draw_options: Any
    ) -> None:
        self.accelerator = accelerator
        self.seed = seed
        self.batch_size = batch_size
        self.sample_shape = tuple(sample_shape)
        self.draw_options = draw_options
        self._step: int | None = None
        self._draws: StepDraws | None = None

    def micro_batch(self, global_step: int, micro: int) -> StepDraws:
        """The draws of micro-batch `micro` (its index in the epoch) of optimizer step `global_step` (0-based)."""
        accumulation = self.accelerator.gradient_accumulation_steps
        processes = self.accelerator.num_processes
        blocks = accumulation * processes
        block = (micro % accumulation) * processes + self.accelerator.process_index
        if self._step != global_step:
            generator = torch.Generator().manual_seed(step_seed(self.seed, global_step, 0))
            self._draws = draw_step(generator, blocks * self.batch_size, self.sample_shape, **self.draw_options)
            self._step = global_step
        torch.manual_seed(step_seed(self.seed, global_step * blocks + block, 0, DROPOUT_STREAM))
        start = block * self.batch_size
        return self._draws.rows(start, start + self.batch_size, self.accelerator.device)
