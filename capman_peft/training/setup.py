"""Setting a training run up: the accelerator, the training data, the CM settings, the optimizer and schedule,
``accelerator.prepare`` and resuming. Everything here runs before the first step."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..checkpointing import remove_earlier_checkpoints, remove_incomplete_writes, resume_training
from ..data import (
    LISTED_CLASSES,
    LISTED_ENDS,
    LabelledImageDataset,
    class_balanced_sampler,
    listed_classes,
    load_imbalanced_dataset,
)
from ..denoiser import CMDenoiser
from ..errors import ConfigError
from ..families import ModelFamily
from ..objective import (
    CONSISTENCY,
    CMSettings,
    ConsistencyObjective,
    CoralSettings,
    FlowWeighting,
    attach_coral_head,
    build_objective,
    check_cm_bounded,
    cm_weights,
    format_cm_table,
)
from ..randomness import StepRandomness
from ..run_folder import lock_output_dir
from ..settings import DataSettings, ObjectiveSettings, OptimizationSettings, TrainingSettings
from ..tuner import base_model
from .loop import Training, steps_per_epoch

logger = logging.getLogger("capman_peft")


def setup_logging(is_main_process: bool) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if is_main_process else logging.WARNING,
        stream=sys.stdout,
    )


# Sharded training keeps optimizer state on several processes; our checkpoints save it from the main process only.
UNSUPPORTED_DISTRIBUTED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def make_accelerator(settings: TrainingSettings) -> Accelerator:
    """The run's Accelerator (accumulation, mixed precision, trackers under ``output_dir``), plus logging, TF32 and
    the initialisation seed."""
    optimization, output = settings.optimization, settings.output
    output_dir = Path(output.output_dir)
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if (optimization.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")) == "fp16" and on_cpu:
        raise ConfigError(
            "--mixed_precision fp16: needs a CUDA device, and this run is on the CPU; allowed: bf16 or no"
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=optimization.gradient_accumulation_steps,
        mixed_precision=optimization.mixed_precision,
        log_with=None if output.report_to == "none" else output.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / output.logging_dir)
        ),
    )
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        lock_output_dir(output_dir)
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
    if optimization.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(optimization.seed)
    return accelerator


def init_trackers(accelerator: Accelerator, project_name: str, settings: TrainingSettings) -> None:
    if accelerator.is_main_process:
        config = {k: v for k, v in settings.flags().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config=config)


def frozen_weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype for frozen weights: the mixed precision in effect (the flag or accelerate's config), else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_train_dataloader(
    dataset: Dataset, labels: Sequence[int], *, batch_size: int, sampler: str, num_workers: int
) -> tuple[DataLoader, torch.Generator]:
    """The training DataLoader (random or class-balanced order, full batches) and the generator of its order, which
    `train_batches` reseeds per epoch so that the order depends only on (seed, epoch)."""
    order = torch.Generator()
    order_sampler = (
        class_balanced_sampler(labels, generator=order)
        if sampler == "balanced"
        else RandomSampler(dataset, generator=order)
    )
    dataloader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order_sampler,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    if len(dataloader) == 0:
        raise ConfigError(f"--train_batch_size {batch_size} exceeds the {len(dataset)} training images")
    return dataloader, order


def make_lr_scheduler(
    optimization: OptimizationSettings, optimizer: torch.optim.Optimizer, max_steps: int, num_processes: int
) -> Any:
    # accelerate steps a prepared scheduler once per process per optimizer step.
    return get_scheduler(
        optimization.lr_scheduler,
        optimizer,
        num_warmup_steps=optimization.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
    )


def prepare_cm(objective: ObjectiveSettings, dataset: LabelledImageDataset, device: torch.device) -> CMSettings | None:
    """The CM coefficients on the training device, after the boundedness check (docs/method.md)."""
    if not objective.capacity_manipulation:
        return None
    class_counts, class_names = dataset.class_counts, dataset.class_names
    if len(class_counts) < 2:
        raise ConfigError(
            f"capacity manipulation: the data has {len(class_counts)} class ({class_names[0]!r}), so there is no "
            "capacity to allocate between classes; allowed: --no_capacity_manipulation, or data with 2+ classes"
        )
    weights = cm_weights(
        class_counts,
        objective.cm_form,
        consistency_weight=objective.consistency_weight,
        diversity_weight=objective.diversity_weight,
        splits=dataset.splits,
    )
    check_cm_bounded(weights, objective.cm_form, class_names, objective.allow_unbounded_cm)
    logger.info(
        "CM loss, %s form (pull: weight of the distance d; push: weight of the diversity term):\n%s",
        objective.cm_form,
        format_cm_table(weights, class_counts, class_names),
    )
    return CMSettings(
        weights.to(device),
        objective.cm_form,
        objective.cm_margin,
        objective.cm_lambda,
        objective.cm_general_fraction,
        objective.cm_relative_margin,
        objective.cm_band_upper,
        objective.cm_push_warmup_steps,
    )


def log_training_data(data: DataSettings, dataset: LabelledImageDataset) -> None:
    """The training set's classes and counts, as a table at the start of the log."""
    class_names, class_counts = dataset.class_names, dataset.class_counts
    how = (
        f"long-tail subsampled to imbalance ratio {data.imbalance_ratio:g}"
        if data.imbalance_ratio is not None
        else "the folder's own counts (--imbalance_ratio R subsamples it)"
    )
    splits = dataset.splits
    split_of = {c: split for split, ids in splits.items() for c in ids}
    rows = [
        f"  ... {len(class_names) - LISTED_ENDS * 2} more classes ..."
        if k is None
        else f"  {k:>4}  {class_names[k]:<24} {class_counts[k]:>7}  {split_of[k]}"
        for k in listed_classes(class_counts)
    ]
    if len(class_names) > LISTED_CLASSES:  # thousands of classes: each split in one line too
        rows += [
            f"  {name}: {len(ids)} classes, {sum(class_counts[c] for c in ids)} images "
            f"({min(class_counts[c] for c in ids)} ... {max(class_counts[c] for c in ids)} per class)"
            for name, ids in splits.items()
            if ids
        ]
    achieved = max(class_counts) / min(class_counts)
    if data.imbalance_ratio is not None and abs(achieved / data.imbalance_ratio - 1) > 0.1:
        logger.warning(
            "--imbalance_ratio %g: the classes have %d ... %d images (ratio %.3g): a class cannot get more images "
            "than its source has, so the ratio asked for is not reached",
            data.imbalance_ratio,
            max(class_counts),
            min(class_counts),
            achieved,
        )
    logger.info(
        "Training data: %s, %s: %d images in %d classes (Many / Medium / Few by size)\n  %4s  %-24s %7s  %s\n%s",
        data.source,
        how,
        sum(class_counts),
        len(class_names),
        "id",
        "class",
        "images",
        "split",
        "\n".join(rows),
    )


def make_objective(
    objective: ObjectiveSettings,
    noise_scheduler: Any,
    class_counts: Sequence[int],
    weighting: FlowWeighting | None = None,
    total_steps: int | None = None,
) -> Any:
    """The base objective of the flags, on the family's noise schedule (`weighting`: a flow-matching family's;
    `total_steps`: the run's length, which consistency training's discretisation curriculum follows)."""
    if objective.objective == CONSISTENCY:
        return ConsistencyObjective(noise_scheduler, total_steps=total_steps)
    options: dict[str, Any] = {"snr_gamma": objective.snr_gamma, "focal_gamma": objective.focal_gamma}
    if weighting is not None:
        options["weighting"] = weighting
    if objective.objective == "cbdm":
        options.update(tau=objective.cbdm_tau, gamma=objective.cbdm_gamma)
    if objective.objective == "oc":
        options.update(transfer_label_dropped=objective.oc_transfer_label_dropped)
    return build_objective(objective.objective, scheduler=noise_scheduler, class_counts=class_counts, **options)


def attach_coral(
    settings: ObjectiveSettings, model: nn.Module, family: ModelFamily, objective: Any
) -> CoralSettings | None:
    """With ``--coral``: CORAL's projection head on the model's UNet (trained, checkpointed and averaged with it,
    dropped at export) and its loss settings; else None."""
    if not settings.coral:
        return None
    unet = base_model(model)
    if family.bottleneck_module is None or not isinstance(getattr(unet, family.bottleneck_module, None), nn.Module):
        raise ConfigError(f"--coral: the {family.name} model has no bottleneck (a UNet's mid block) to contrast")
    attach_coral_head(unet, family.bottleneck_channels(unet))
    return CoralSettings(
        weight=settings.coral_weight,
        time_temperature=settings.coral_time_temperature,
        temperature=settings.coral_temperature,
        num_train_timesteps=objective.schedule.num_train_timesteps,
    )


def load_training_data(data: DataSettings, *, center_crop: bool, random_flip: bool) -> LabelledImageDataset:
    """The long-tailed training set the settings name (Cao et al. subsampling, class 0 largest), logged as a table."""
    dataset = load_imbalanced_dataset(
        data.dataset,
        split="train",
        imbalance_ratio=data.imbalance_ratio,
        resolution=data.resolution,
        dataset_name=data.dataset_name,
        train_data_dir=data.train_data_dir,
        class_order=data.class_order_names,
        seed=data.data_seed,
        center_crop=center_crop,
        random_flip=random_flip,
        image_column=data.image_column,
        label_column=data.class_column,
        caption_column=data.caption_column,
        cache_dir=data.cache_dir,
        split_thresholds=data.split_thresholds,
    )
    log_training_data(data, dataset)
    return dataset


def total_steps(optimization: OptimizationSettings, batches_per_epoch: int) -> int:
    """``--max_train_steps``, or ``--num_train_epochs`` times the optimizer steps of an epoch."""
    if optimization.max_train_steps is not None:
        return optimization.max_train_steps
    return optimization.num_train_epochs * steps_per_epoch(batches_per_epoch, optimization.gradient_accumulation_steps)


def make_optimizer(
    optimization: OptimizationSettings,
    optimizer_cls: type,
    params: list[nn.Parameter],
    dataloader: DataLoader,
    accelerator: Accelerator,
) -> tuple[Any, Any, int]:
    """The optimizer, the LR schedule and the number of optimizer steps, after checking that an epoch has enough
    micro-batches per process for one accumulated step."""
    optimizer = optimizer_cls(
        params,
        lr=optimization.learning_rate,
        betas=(optimization.adam_beta1, optimization.adam_beta2),
        weight_decay=optimization.adam_weight_decay,
        eps=optimization.adam_epsilon,
    )
    accumulation = optimization.gradient_accumulation_steps
    micro_batches = len(dataloader) // accelerator.num_processes
    if accumulation > micro_batches:
        raise ConfigError(
            f"--gradient_accumulation_steps {accumulation}: an epoch has only {micro_batches} "
            f"micro-batches per process (each optimizer step would use {micro_batches}); allowed: at most "
            f"{micro_batches}, or a smaller --train_batch_size"
        )
    max_steps = total_steps(optimization, micro_batches)
    return optimizer, make_lr_scheduler(optimization, optimizer, max_steps, accelerator.num_processes), max_steps


def prepare_training(
    accelerator: Accelerator,
    settings: TrainingSettings,
    model: nn.Module,
    *,
    cm: CMSettings | None,
    objective: Any,
    optimizer_cls: type,
    train_set: Dataset,
    labels: Sequence[int],
    sample_shape: Sequence[int],
    project: str,
    family: ModelFamily,
    **draw_options: Any,
) -> Training:
    """Everything between the model and the first step, in this order: the CM forward module, EMA, data loader,
    optimizer, LR schedule, ``accelerator.prepare``, resume from ``--resume_from_checkpoint``, the trackers, and the
    per-step randomness (`sample_shape`: one x0; `draw_options`: latent-diffusion extras of ``draw_step``)."""
    optimization, output = settings.optimization, settings.output
    forward = settings.objective.cm_forward
    coral = attach_coral(settings.objective, model, family, objective)
    try:
        denoiser = CMDenoiser(model, forward_mode=forward, capacity_manipulation=cm is not None, family=family)
    except ValueError as err:
        raise ConfigError(f"--cm_forward {forward}: {err}") from None
    params = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=optimization.ema_decay) if optimization.use_ema else None
    dataloader, order = make_train_dataloader(
        train_set,
        labels,
        batch_size=optimization.train_batch_size,
        sampler=settings.data.sampler,
        num_workers=settings.data.dataloader_num_workers,
    )
    optimizer, lr_scheduler, max_steps = make_optimizer(optimization, optimizer_cls, params, dataloader, accelerator)
    accumulation = optimization.gradient_accumulation_steps
    denoiser, optimizer, dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    per_epoch = steps_per_epoch(len(dataloader), accumulation)
    if accelerator.is_main_process:
        leftovers = remove_incomplete_writes(output.output_dir)
        if leftovers:
            logger.info("Removed what an interrupted write left in --output_dir: %s", ", ".join(leftovers))
    if output.overwrite_output_dir and not output.resume_from_checkpoint and accelerator.is_main_process:
        removed = remove_earlier_checkpoints(output.output_dir)
        if removed:
            logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(removed))
    accelerator.wait_for_everyone()
    resumed = resume_training(
        settings, accelerator.unwrap_model(denoiser).unet, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema
    )
    init_trackers(accelerator, project, settings)
    logger.info(
        "Training %d steps (%d epochs), batch %d x %d processes x %d accumulation",
        max_steps,
        -(-max_steps // per_epoch),
        optimization.train_batch_size,
        accelerator.num_processes,
        accumulation,
    )
    randomness = StepRandomness(
        accelerator,
        optimization.seed,
        optimization.train_batch_size,
        sample_shape,
        label_dropout=settings.objective.label_dropout,
        objective=objective,
        general_draw=cm is not None and cm.general_fraction < 1,
        **draw_options,
    )
    return Training(
        denoiser=denoiser,
        params=params,
        ema=ema,
        optimizer=optimizer,
        dataloader=dataloader,
        order=order,
        lr_scheduler=lr_scheduler,
        randomness=randomness,
        max_steps=max_steps,
        per_epoch=per_epoch,
        global_step=resumed.step,
        run_id=resumed.run_id,
        coral=coral,
    )
