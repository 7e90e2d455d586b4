"""The training loop both scripts run: batches in a resumable order, the Eq. 4 loss of each micro-batch, backward
and optimizer step, logs averaged over processes, checkpoints and validation grids."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpointing import list_checkpoints, save_training_checkpoint
from ..errors import TrainingStepOutOfMemory, TrainingStopped
from ..families import ModelFamily
from ..objective import CMSettings, ConsistencyObjective, CoralSettings, check_finite, consistency_loss, diffusion_loss
from ..randomness import StepDraws, StepRandomness, epoch_order_seed
from ..settings import TrainingSettings
from .preemption import SignalRequests


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
        order.manual_seed(epoch_order_seed(seed, epoch))
        batches, start = dataloader, 0
        if epoch == first_epoch and skip:
            start = skip * accumulation
            batches = accelerator.skip_first_batches(dataloader, start)
        for micro, batch in enumerate(batches, start):
            yield epoch, micro, batch


def validation_due(validation_epochs: int, step: int, per_epoch: int) -> bool:
    """Whether a validation grid is due after optimizer step `step`: at the end of every `validation_epochs`-th epoch
    (0: never)."""
    epochs_done, epoch_end = divmod(step, per_epoch)
    return bool(validation_epochs) and epoch_end == 0 and epochs_done % validation_epochs == 0


def backward_and_step(
    accelerator: Accelerator,
    loss: torch.Tensor,
    params: Sequence[nn.Parameter],
    *,
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


def guard_finite(accelerator: Accelerator, step: int, logs: dict[str, torch.Tensor]) -> None:
    """Stop on a non-finite loss, naming the term (base loss, L_con or L_div) and the step. With several processes
    every process checks every process's terms (one gather), so all stop at the same step with the same message
    instead of the others waiting for the stopped one in the gradient all-reduce."""
    terms = {k: logs[k] for k in ("base_loss", "cm_consistency", "cm_diversity") if k in logs}
    if accelerator.num_processes == 1 or not terms:
        check_finite(step, **terms)
        return
    local = torch.stack([value.detach().float().reshape(()) for value in terms.values()]).to(accelerator.device)
    every = accelerator.gather(local[None])  # (processes, terms)
    bad = (~torch.isfinite(every)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        check_finite(step, process=bad[0], **dict(zip(terms, every[bad[0]], strict=True)))


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
    *,
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


@dataclass
class Training:
    """What the loop needs, as `prepare_training` leaves it: the prepared objects, the trainable parameters and
    their EMA, the per-step randomness, the step counts, the place a resumed run starts from and the run's id."""

    denoiser: nn.Module
    params: list[nn.Parameter]
    ema: Any
    optimizer: torch.optim.Optimizer
    dataloader: DataLoader
    order: torch.Generator
    lr_scheduler: Any
    randomness: StepRandomness
    max_steps: int
    per_epoch: int
    global_step: int
    run_id: str
    coral: CoralSettings | None = None
    """CORAL's loss settings when ``--coral`` is on (its head is on the model)."""


def family_step_loss(
    family: ModelFamily,
    denoiser: nn.Module,
    objective: Any,
    *,
    num_classes: int,
    cm: CMSettings | None,
    coral: CoralSettings | None = None,
) -> Callable[[Any, StepDraws, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Eq. 4 for one micro-batch of any model family: the family encodes the batch to x0 and turns class ids into
    its condition; :func:`diffusion_loss` (or :func:`consistency_loss`) does the rest."""

    batch_loss = consistency_loss if isinstance(objective, ConsistencyObjective) else diffusion_loss

    def step_loss(batch: Any, draws: StepDraws, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch_loss(
            denoiser, objective, family.encode(batch, draws), batch["label"], num_classes=num_classes,
            cm=cm, draws=draws, condition=lambda ids: family.condition(ids, batch, draws), step=step, coral=coral,
        )  # fmt: skip

    return step_loss


@dataclass
class TrainingCallbacks:
    """Code that runs inside :func:`train` without changing it: benchmarks, the study, your own monitoring.

    ``on_step_end(step, values)`` runs on every process after each optimizer step, with the step's logged values
    averaged over processes (``loss``, ``base_loss``, the CM terms, ``lr``); ``on_checkpoint(step, path)`` runs on the
    main process after ``checkpoint-<step>`` is written.
    """

    on_step_end: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None


class Trained(NamedTuple):
    """What a finished loop reports: the last step's logs, the step reached and the seconds spent."""

    logs: dict[str, float]
    steps: int
    seconds: float


@contextmanager
def stop_when_out_of_memory(settings: TrainingSettings, step: int) -> Iterator[None]:
    """An out-of-memory error in a training step becomes one line naming the step, the batch and what to try; nothing
    is written, so the last checkpoint stays as it was."""
    try:
        yield
    except torch.OutOfMemoryError:
        optimization = settings.optimization
        found = list_checkpoints(settings.output.output_dir)
        last = f"the last checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written yet"
        raise TrainingStepOutOfMemory(
            f"step {step}: out of accelerator memory with --train_batch_size {optimization.train_batch_size}; try "
            "--gradient_checkpointing, a smaller --train_batch_size with a larger --gradient_accumulation_steps (the "
            f"same effective batch), or a smaller --cm_general_fraction (θ^g on fewer rows); {last} "
            "(--resume_from_checkpoint latest continues from it)"
        ) from None


def train(
    accelerator: Accelerator,
    settings: TrainingSettings,
    run: Training,
    *,
    step_loss: Callable[[Any, StepDraws, int], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    validate: Callable[[nn.Module, int, int], Any] | None = None,
    callbacks: TrainingCallbacks | None = None,
) -> Trained:
    """Train from ``run.global_step`` to ``run.max_steps``.

    `step_loss(batch, draws, step)` is Eq. 4 for one micro-batch of optimizer step `step` (0 for the first; the
    scripts differ only in how a batch becomes x0 and a condition). On the main process a checkpoint is written every
    ``--checkpointing_steps`` and, when due, `validate(model, epoch, step)` runs with the EMA weights; `callbacks` run
    after each step and checkpoint.
    """
    callbacks = callbacks or TrainingCallbacks()
    output, max_grad_norm = settings.output, settings.optimization.max_grad_norm
    logs: dict[str, float] = {}
    params, ema, global_step = run.params, run.ema, run.global_step
    start = time.time()
    bar = tqdm(total=run.max_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process)
    with bar, SignalRequests() as signals:
        seed = settings.optimization.seed
        for epoch, micro, batch in train_batches(accelerator, run.dataloader, run.order, seed, global_step):
            if global_step >= run.max_steps:
                break
            draws = run.randomness.micro_batch(global_step, micro)
            with accelerator.accumulate(run.denoiser), stop_when_out_of_memory(settings, global_step + 1):
                loss, step_logs = step_loss(batch, draws, global_step)
                guard_finite(accelerator, global_step + 1, step_logs)
                backward_and_step(
                    accelerator,
                    loss,
                    params,
                    optimizer=run.optimizer,
                    lr_scheduler=run.lr_scheduler,
                    max_grad_norm=max_grad_norm,
                )
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = finish_step(
                accelerator,
                bar,
                ema=ema,
                params=params,
                step_logs=step_logs,
                lr_scheduler=run.lr_scheduler,
                step=global_step,
            )
            if callbacks.on_step_end is not None:
                callbacks.on_step_end(global_step, logs)
            stop, save_now = signals.poll(accelerator)
            if accelerator.is_main_process:
                model = accelerator.unwrap_model(run.denoiser).unet
                if global_step % output.checkpointing_steps == 0 or stop or save_now:
                    saved = save_training_checkpoint(
                        settings, global_step, model, run_id=run.run_id, optimizer=run.optimizer,
                        lr_scheduler=run.lr_scheduler, ema=ema,
                    )  # fmt: skip
                    if callbacks.on_checkpoint is not None:
                        callbacks.on_checkpoint(global_step, saved)
                due = validate is not None and validation_due(output.validation_epochs, global_step, run.per_epoch)
                if due and not stop:
                    with ema_weights(ema, params):
                        validate(model, epoch + 1, global_step)
            if stop:
                accelerator.wait_for_everyone()
                raise TrainingStopped(stop, global_step, Path(output.output_dir) / f"checkpoint-{global_step}")
    return Trained(logs, global_step, time.time() - start)
