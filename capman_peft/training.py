"""What both training scripts share: flags, YAML recipes, the CM set-up, the per-step loss, seeding and logging.

The scripts (`train_unet_cm.py`, `train_text_to_image_cm.py`) keep the diffusers shape — parse args, build models
and data, prepare, loop, save — and call into this module for everything they have in common.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .checkpointing import (
    CheckpointError,
    ForeignCheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import class_balanced_sampler
from .errors import ConfigError
from .objective import (
    CMWeights,
    build_objective,
    check_cm_bounded,
    check_finite,
    class_weights,
    cm_loss,
    cm_weights,
    format_cm_table,
)

logger = logging.getLogger("capman_peft")


@dataclass
class CMSettings:
    """The CM loss of one run: per-class coefficients, form, and its weight λ in Eq. 4."""

    weights: CMWeights
    form: str
    margin: float
    cm_lambda: float
    general_fraction: float = 1.0

    def general_rows(self, batch_size: int) -> int:
        """Rows of a batch that get a theta^g prediction (the same on every process: DDP-safe)."""
        return max(1, round(self.general_fraction * batch_size))


def prepare_cm(
    args: argparse.Namespace, class_counts: Sequence[int], class_names: Sequence[str], device: torch.device
) -> CMSettings | None:
    """The CM coefficients on the training device, after the boundedness check (DESIGN 'Stability of the CM loss')."""
    if not args.capacity_manipulation:
        return None
    weights = cm_weights(
        class_counts,
        args.cm_diversity,
        consistency_weight=0.0 if args.no_consistency else args.cm_consistency_weight,
        diversity_weight=0.0 if args.no_diversity else args.cm_diversity_weight,
    )
    check_cm_bounded(weights, args.cm_diversity, class_names, args.allow_unbounded_cm)
    logger.info(
        "CM loss, %s form (pull: weight of the distance d; push: weight of the diversity term):\n%s",
        args.cm_diversity,
        format_cm_table(weights, class_counts, class_names),
    )
    return CMSettings(
        CMWeights(weights.pull.to(device), weights.push.to(device)),
        args.cm_diversity,
        args.cm_margin,
        args.cm_lambda,
        args.cm_general_fraction,
    )


def log_training_data(args: argparse.Namespace, class_names: Sequence[str], class_counts: Sequence[int]) -> None:
    """The training set's classes and counts, as a table at the start of the log."""
    source = args.dataset or args.dataset_name or args.train_data_dir
    how = (
        f"long-tail subsampled to imbalance ratio {args.imbalance_ratio:g}"
        if args.imbalance_ratio is not None
        else "the folder's own counts (--imbalance_ratio R subsamples it)"
    )
    rows = "\n".join(
        f"  {k:>4}  {name:<24} {n:>7}" for k, (name, n) in enumerate(zip(class_names, class_counts, strict=True))
    )
    logger.info(
        "Training data: %s, %s: %d images in %d classes\n  %4s  %-24s %7s\n%s",
        source,
        how,
        sum(class_counts),
        len(class_names),
        "id",
        "class",
        "images",
        rows,
    )


def make_objective(args: argparse.Namespace, noise_scheduler: Any, class_counts: Sequence[int]):
    options: dict[str, Any] = {"snr_gamma": args.snr_gamma}
    if args.objective == "cbdm":
        options.update(tau=args.cbdm_tau, gamma=args.cbdm_gamma)
    return build_objective(args.objective, scheduler=noise_scheduler, class_counts=class_counts, **options)


# Independent random streams derived from one step seed (see `step_seed`).
DRAW_STREAM, DROPOUT_STREAM = 0, 1


def step_seed(seed: int, step: int, process_index: int, stream: int = DRAW_STREAM) -> int:
    """A seed per (run, step, process, stream): the random choices of a step depend only on these, so a resumed run
    takes exactly the steps an uninterrupted one would. Hashing a tuple of ints is stable across processes."""
    return hash((seed, step, process_index, stream)) % (2**63)


@dataclass
class StepDraws:
    """The random choices of a batch, one row per sample.

    ``noise`` and ``timesteps`` make x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; ``label_dropped`` swaps the
    condition for the null one; ``extra_labels`` is CBDM's y' (None for other objectives). Latent-diffusion training
    adds ``flip`` (horizontal flip of the image) and ``latent_noise`` (VAE posterior sample z = mean + std * noise).
    ``general_draw`` (uniform in [0, 1)) picks the rows of the theta^g pass when it runs on part of the batch.
    """

    noise: torch.Tensor
    timesteps: torch.Tensor
    label_dropped: torch.Tensor
    extra_labels: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    latent_noise: torch.Tensor | None = None
    general_draw: torch.Tensor | None = None

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
    num_train_timesteps: int,
    label_dropout: float,
    objective: Any,
    noise_offset: float = 0.0,
    flip: bool = False,
    latent_noise: bool = False,
    general_draw: bool = False,
) -> StepDraws:
    """Draw every random choice of `num_samples` samples at once, on the generator's device (None: the global RNG,
    on the CPU).

    Args:
        sample_shape: shape of one x0 (C, H, W).
        noise_offset: adds ``noise_offset * N(0, 1)`` per sample and channel to the noise (diffusers' flag).
        flip, latent_noise: also draw flips (p = 0.5) and VAE posterior noise of `sample_shape`.
        general_draw: also draw one uniform per sample for choosing the rows of a partial theta^g pass.
    """
    rng = {"generator": generator, "device": generator.device if generator is not None else "cpu"}
    shape = (num_samples, *sample_shape)
    noise = torch.randn(shape, **rng)
    if noise_offset:
        noise += noise_offset * torch.randn((num_samples, shape[1], *[1] * (len(shape) - 2)), **rng)
    timesteps = torch.randint(0, num_train_timesteps, (num_samples,), **rng)
    dropped = torch.rand(num_samples, **rng) < label_dropout
    # CBDM's y' ~ Categorical(N_c) does not depend on y, so placeholder labels of the right length suffice.
    extra = objective.extra_labels(
        torch.zeros(num_samples, dtype=torch.long, device=rng["device"]), generator=generator
    )
    flips = torch.rand(num_samples, **rng) < 0.5 if flip else None
    posterior = torch.randn(shape, **rng) if latent_noise else None
    general = torch.rand(num_samples, **rng) if general_draw else None
    return StepDraws(noise, timesteps, dropped, extra, flips, posterior, general)


class StepRandomness:
    """Per-step random choices that make resume exact and gradient accumulation equal to one larger batch.

    The choices of a whole optimizer step (accumulation x batch rows) are drawn at once from a generator seeded by
    (seed, step, process); micro-batch m takes rows ``m*B:(m+1)*B``. Sample j of a step therefore gets the same
    noise, timestep and label-dropout decision whether the step is 1 x 2B or 2 x B, and since every objective term is a
    per-sample mean, 2 x B accumulated equals 1 x 2B (OC, whose references come from the batch, is the exception).
    Model dropout uses the global RNG, reseeded per micro-batch from an independent stream.
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
        process = self.accelerator.process_index
        index = micro % accumulation
        if self._step != global_step:
            generator = torch.Generator().manual_seed(step_seed(self.seed, global_step, process))
            self._draws = draw_step(generator, accumulation * self.batch_size, self.sample_shape, **self.draw_options)
            self._step = global_step
        torch.manual_seed(step_seed(self.seed, global_step * accumulation + index, process, DROPOUT_STREAM))
        start = index * self.batch_size
        return self._draws.rows(start, start + self.batch_size, self.accelerator.device)


def importance_rows(row_weights: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k = len(uniforms) rows drawn with replacement with probability p_i ∝ row_weights[i], and the factor
    1 / (B·p_i) that makes the mean over the drawn rows of factor·L an unbiased estimate of the batch mean of L
    (rows of weight 0 are never drawn; they must contribute 0). No host sync."""
    batch = len(row_weights)
    total = row_weights.sum()
    probs = row_weights / total.clamp(min=torch.finfo(row_weights.dtype).tiny)
    cdf = probs.cumsum(0)
    rows = torch.searchsorted(cdf, uniforms.to(cdf) * cdf[-1], right=True).clamp(max=batch - 1)
    chosen = probs[rows]
    factor = torch.where(chosen > 0, 1 / (batch * chosen.clamp(min=torch.finfo(chosen.dtype).tiny)), 0.0)
    return rows, factor


def diffusion_loss(
    denoiser: nn.Module,
    objective: Any,
    noise_scheduler: Any,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    cm: CMSettings | None,
    draws: StepDraws,
    cond_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_base + lambda * L_CM for one batch (paper Eq. 4), with one call of the denoiser module.

    The condition of sample i is class id ``labels[i]`` (UNet2DModel) or ``cond_table[labels[i]]`` (text
    embeddings); a dropped label uses the null entry ``num_classes``. The objectives see the true labels. L_CM
    leaves label-dropped samples out: both predictions were made without the class, so there is no class to
    allocate capacity for (their weight is 0 in the batch mean). With ``cm.general_fraction < 1`` theta^g runs on
    rows drawn by ``importance_rows`` only. `draws` holds the batch's noise, timesteps, label dropout and CBDM
    labels (the training scripts take them from `StepRandomness`; elsewhere use `draw_step(...).rows(0, batch,
    device)`).
    """
    if draws.noise.shape != x0.shape:
        raise ValueError(f"draws for shape {tuple(draws.noise.shape)} but x0 has shape {tuple(x0.shape)}")
    noise, timesteps, dropped = draws.noise.to(x0.dtype), draws.timesteps, draws.label_dropped
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    cond_labels = torch.where(dropped, torch.full_like(labels, num_classes), labels)
    extra_labels = draws.extra_labels

    def condition(ids: torch.Tensor | None) -> torch.Tensor | None:
        return ids if ids is None or cond_table is None else cond_table[ids]

    general_rows = sample_weight = None
    if cm is not None:
        kept = (~dropped).float()
        batch, k = len(labels), cm.general_rows(len(labels))
        if k < batch:
            row_weights = (cm.weights.pull + cm.weights.push)[labels] * kept
            general_rows, sample_weight = importance_rows(row_weights, draws.general_draw[:k])
        else:
            sample_weight = kept

    outputs = denoiser(x_t, timesteps, condition(cond_labels), condition(extra_labels), general_rows)
    loss, logs = objective(
        outputs.full,
        x0=x0,
        noise=noise,
        x_t=x_t,
        timesteps=timesteps,
        labels=labels,
        pred_extra=outputs.extra,
        label_dropped=dropped,
    )
    logs = dict(logs)
    if cm is not None:
        cm_value, cm_logs = cm_loss(
            outputs.full if general_rows is None else outputs.full[general_rows],
            outputs.general,
            labels if general_rows is None else labels[general_rows],
            cm.weights,
            form=cm.form,
            margin=cm.margin,
            sample_weight=sample_weight,
        )
        loss = loss + cm.cm_lambda * cm_value
        logs.update(cm_logs)
    logs["loss"] = loss.detach()
    return loss, logs


def guard_finite(step: int, logs: dict[str, torch.Tensor]) -> None:
    """Stop on a non-finite loss, naming the term (base loss, L_con or L_div) and the step."""
    terms = {k: logs[k] for k in ("base_loss", "cm_consistency", "cm_diversity") if k in logs}
    check_finite(step, **terms)


def reduce_logs(accelerator: Accelerator, logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean of each logged scalar over processes, in one collective; a value missing on some processes (NaN, such
    as the distance of a class group absent from that process's batch) is averaged over the others, and dropped when
    it is missing everywhere."""
    keys = sorted(logs)
    local = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).to(accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.gather(local[None]).nanmean(0)
    return {k: v for k, v in zip(keys, local.tolist(), strict=True) if math.isfinite(v)}


def finish_step(
    accelerator: Accelerator,
    progress: Any,
    ema: Any,
    params: list[nn.Parameter],
    step_logs: dict[str, torch.Tensor],
    lr_scheduler: Any,
    step: int,
) -> dict[str, float]:
    """After an optimizer step: EMA update, progress bar, tracker log. Returns the step's values as floats, averaged
    over processes (every process must call this)."""
    if ema is not None:
        ema.step(params)
    values = reduce_logs(accelerator, step_logs)
    values["lr"] = lr_scheduler.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(loss=f"{values['loss']:.4f}")
    accelerator.log(values, step=step)
    return values


@contextmanager
def ema_weights(ema: Any, params: list[nn.Parameter]) -> Iterator[None]:
    """Sample with the EMA weights (when EMA is on), then put the training weights back."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def total_steps(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_epochs) from whichever of the two the user gave."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        if args.num_train_epochs is None:
            raise ConfigError("give --max_train_steps or --num_train_epochs")
        return args.num_train_epochs * steps_per_epoch, args.num_train_epochs
    return args.max_train_steps, math.ceil(args.max_train_steps / steps_per_epoch)


# Sharded training keeps optimizer state on several processes; our checkpoints save it from the main process only.
UNSUPPORTED_DISTRIBUTED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's Accelerator (accumulation, mixed precision, trackers under ``output_dir``), plus logging, TF32 and
    the initialisation seed."""
    output_dir = Path(args.output_dir)
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if (args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")) == "fp16" and on_cpu:
        raise ConfigError(
            "--mixed_precision fp16: needs a CUDA device, and this run is on the CPU; allowed: bf16 or no"
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    setup_logging(accelerator.is_main_process)
    if accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED:
        raise ConfigError(
            f"accelerate config: distributed_type {accelerator.distributed_type.value} is not supported (checkpoints "
            "gather the optimizer state on one process, which cannot capture state sharded by FSDP or DeepSpeed); "
            "allowed: a single device, or DDP (multi-GPU/multi-CPU)"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError(
            "--mixed_precision fp16: needs a CUDA device, and this run is on the CPU; allowed: bf16 or no"
        )
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    return accelerator


def init_trackers(accelerator: Accelerator, project_name: str, args: argparse.Namespace) -> None:
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(project_name, config=config)


def frozen_weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype for frozen weights: the mixed precision in effect (the flag or accelerate's config), else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to `dtype` (memory); trainable ones to float32 (optimizer updates must not round away)."""
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else dtype)


def make_train_dataloader(
    dataset: Dataset, labels: Sequence[int], args: argparse.Namespace
) -> tuple[DataLoader, torch.Generator]:
    """The training DataLoader (random or class-balanced order, full batches) and the generator of its order, which
    `train_batches` reseeds per epoch so that the order depends only on (seed, epoch)."""
    order = torch.Generator()
    sampler = (
        class_balanced_sampler(labels, generator=order)
        if args.sampler == "balanced"
        else RandomSampler(dataset, generator=order)
    )
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    if len(dataloader) == 0:
        raise ConfigError(f"--train_batch_size {args.train_batch_size} exceeds the {len(dataset)} training images")
    return dataloader, order


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in an epoch; accelerate also steps on the last, shorter accumulation of an epoch."""
    return max(1, math.ceil(num_batches / gradient_accumulation_steps))


def train_batches(
    accelerator: Accelerator, dataloader: DataLoader, order: torch.Generator, seed: int, global_step: int
) -> Iterator[tuple[int, int, Any]]:
    """``(epoch, micro, batch)`` from optimizer step `global_step` on, endlessly (the caller stops at its last step).

    `micro` is the batch's index within the epoch's iteration, so ``micro % accumulation`` is its place in the
    optimizer step; a resumed run skips the batches of the steps already taken in its first epoch.
    """
    accumulation = accelerator.gradient_accumulation_steps
    first_epoch, skip = divmod(global_step, steps_per_epoch(len(dataloader), accumulation))
    for epoch in itertools.count(first_epoch):
        order.manual_seed(seed * 100_003 + epoch)
        batches = dataloader
        if epoch == first_epoch and skip:
            batches = accelerator.skip_first_batches(dataloader, skip * accumulation)
        for micro, batch in enumerate(batches):
            yield epoch, micro, batch


def validation_due(args: argparse.Namespace, step: int, per_epoch: int) -> bool:
    """Whether a validation grid is due after optimizer step `step`: at the end of every ``--validation_epochs``-th
    epoch, or every ``--validation_steps`` steps (the UNet script's first-release flag)."""
    epochs_done, epoch_end = divmod(step, per_epoch)
    by_epoch = bool(args.validation_epochs) and epoch_end == 0 and epochs_done % args.validation_epochs == 0
    by_step = bool(getattr(args, "validation_steps", None)) and step % args.validation_steps == 0
    return by_epoch or by_step


def make_lr_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, max_steps: int, num_processes: int):
    # accelerate steps a prepared scheduler once per process per optimizer step.
    return get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
    )


def backward_and_step(
    accelerator: Accelerator,
    loss: torch.Tensor,
    params: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    max_grad_norm: float,
) -> None:
    """Backward, clip on the steps that update, optimizer and LR step (no-ops while gradients accumulate)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# The settings that define what a run trains (data, model, objective): a checkpoint written with other values of
# these is refused on resume. Learning rate, step counts and logging may change when a run is continued.
RUN_IDENTITY_FLAGS = (
    "dataset",
    "dataset_name",
    "train_data_dir",
    "imbalance_ratio",
    "class_order",
    "data_seed",
    "resolution",
    "unet_config",  # the content of --model_config_name_or_path, so a moved config file does not matter
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "rank",
    "expert_rank",
    "lora_alpha",
    "expert_alpha",
    "target_modules",
    "expert_target_modules",
    "expert_rank_ratio",
    "prompt_template",
    "objective",
    "capacity_manipulation",
    "cm_lambda",
    "cm_diversity",
    "cm_consistency_weight",
    "cm_diversity_weight",
    "cm_margin",
    "no_consistency",
    "no_diversity",
    "use_ema",
)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's identity: the values of ``RUN_IDENTITY_FLAGS`` this script has."""
    return {k: getattr(args, k) for k in RUN_IDENTITY_FLAGS if hasattr(args, k)}


def save_training_checkpoint(
    args: argparse.Namespace,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None = None,
) -> Path:
    """``output_dir/checkpoint-<step>``: the trainable parameters of `model`, the optimizer/LR/EMA state and the
    run's identity (``args.run_id`` and ``run_config``)."""
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "run": {"id": args.run_id, "config": run_config(args)},
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    return save_checkpoint(args.output_dir, step, model, state, args.checkpoints_total_limit)


def _restore(path: Path, state: dict[str, Any], optimizer: Any, lr_scheduler: Any, ema: Any | None) -> None:
    if ema is not None and "ema" not in state:
        raise ForeignCheckpointError(f"{path}: has no EMA state; allowed: resume it without --use_ema")
    try:
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(
            f"{path / 'state.safetensors'}: the optimizer, LR or EMA state does not fit this run ({reason})"
        ) from None


def resume_training(
    args: argparse.Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None = None,
) -> int:
    """Load ``--resume_from_checkpoint`` (if any) into the model and training state; the step to continue from.

    Sets ``args.run_id``: the checkpoint's on resume, a new one otherwise. With ``latest``, a checkpoint that cannot
    be read is skipped with a warning naming it and the reason, and the next older one is tried; a checkpoint of
    another run configuration is refused.
    """
    args.run_id = uuid.uuid4().hex
    if not args.resume_from_checkpoint:
        return 0
    candidates = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if not candidates:
        logger.info("No checkpoint in %s; starting from scratch", args.output_dir)
        return 0
    skipped = []
    for path in candidates:
        try:
            state = load_checkpoint(path, model, run_config(args))
            _restore(path, state, optimizer, lr_scheduler, ema)
        except CheckpointError as err:
            if args.resume_from_checkpoint != "latest" or isinstance(err, ForeignCheckpointError):
                raise
            logger.warning("Skipping %s: %s", path.name, err)
            skipped.append(path.name)
            continue
        args.run_id = state.get("run", {}).get("id", args.run_id)
        logger.info("Resumed from %s at step %d%s", path, state["step"], f" (skipped {skipped})" if skipped else "")
        return state["step"]
    raise CheckpointError(
        f"--resume_from_checkpoint latest: no readable checkpoint in {args.output_dir} (skipped {skipped}; see the "
        "warnings above); allowed: a folder with a valid checkpoint, or no --resume_from_checkpoint"
    )


def publish_image(accelerator: Accelerator, image: Image.Image, path: Path, step: int, key: str = "validation") -> Path:
    """Save `image` as PNG at `path` and send it to the trackers (tensorboard, wandb)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(key, np.asarray(image)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({key: wandb.Image(image)}, step=step)
    return path


def cm_card_settings(args: argparse.Namespace, **adapter: Any) -> dict[str, Any] | None:
    """The CM settings a model card lists (None for a baseline run): the adapter's shape, then the loss weights."""
    if not args.capacity_manipulation:
        return None
    return {
        **adapter,
        "lambda": args.cm_lambda,
        "w_con": args.cm_consistency_weight,
        "w_div": args.cm_diversity_weight,
        "form": args.cm_diversity,
        "objective": args.objective,
    }


# Few-class distance / Many-class distance below which the expert counts as unused (issue 11's criterion), and the
# training images per class of the end-of-training check.
EXPERT_USE_RATIO = 10.0
EXPERT_USE_IMAGES = 16


def expert_use(
    capman: nn.Module,
    noise_scheduler: Any,
    data: Any,
    num_classes: int,
    encode: Any,
    condition: Any,
    images_per_class: int = EXPERT_USE_IMAGES,
) -> dict[str, Any]:
    """Is the reserved expert used? theta vs theta^g per split on a fixed batch of training images per class
    (fixed noise and timesteps, dropout off), for ``training_summary.json``, the model card and one log line.

    Per split: ``distance`` = mean (eps_theta - eps_theta^g)^2, ``loss_full`` / ``loss_general`` = the denoising
    loss of theta / theta^g. The expert counts as used when the Few distance is at least 10x the Many distance.
    """
    from .analysis import Denoiser, measure_expert_use
    from .data import class_splits

    device = next(capman.parameters()).device
    denoiser = Denoiser(capman, noise_scheduler, encode, condition, device)
    values = measure_expert_use(capman, denoiser, data, num_classes, num_batches=1, batch_size=images_per_class)
    splits = {
        split: {
            "distance": float(np.mean([values["expert_usage"][c] for c in ids])),
            "loss_full": float(np.mean([values["loss_full"][c] for c in ids])),
            "loss_general": float(np.mean([values["loss_general"][c] for c in ids])),
        }
        for split, ids in class_splits(num_classes).items()
        if ids
    }
    many, few = splits["many"]["distance"], splits.get("few", splits["many"])["distance"]
    ratio = few / many if many > 0 else math.inf
    return {
        "images_per_class": images_per_class,
        "splits": splits,
        "per_class_distance": values["expert_usage"],
        "few_over_many": ratio,
        "expert_used": ratio >= EXPERT_USE_RATIO,
    }


def describe_expert_use(report: dict[str, Any]) -> str:
    """One line: the per-split distances, theta^g's loss increase, and whether the expert is used."""
    splits = report["splits"]
    distances = ", ".join(f"{k} {v['distance']:.2g}" for k, v in splits.items())
    losses = ", ".join(f"{k} {100 * (v['loss_general'] / v['loss_full'] - 1):+.0f}%" for k, v in splits.items())
    verdict = (
        "the expert is used"
        if report["expert_used"]
        else f"the expert is barely used (Few/Many < {EXPERT_USE_RATIO:g}x): CM acts like plain training here"
    )
    return (
        f"Expert use: mean (eps_theta - eps_theta^g)^2 {distances} (Few/Many {report['few_over_many']:.3g}x); "
        f"loss of theta^g over theta {losses}: {verdict}."
    )


def write_training_summary(
    path: Path,
    args: argparse.Namespace,
    class_names: Sequence[str],
    class_counts: Sequence[int],
    final_logs: dict[str, float],
    **extra: Any,
) -> None:
    """``training_summary.json``: what was trained on what, the omega tables and the final losses."""
    omega_con, omega_div = class_weights(class_counts)
    summary = {
        "run_id": args.run_id,
        "args": {k: v for k, v in vars(args).items() if k not in ("hub_token", "run_id")},
        "class_names": list(class_names),
        "class_counts": list(class_counts),
        "omega_con": omega_con.tolist(),
        "omega_div": omega_div.tolist(),
        "final_losses": final_logs,
        **extra,
    }
    path.write_text(json.dumps(summary, indent=2, default=str))


def setup_logging(is_main_process: bool) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if is_main_process else logging.WARNING,
        stream=sys.stdout,
    )
