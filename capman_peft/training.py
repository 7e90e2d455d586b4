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
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import DATASETS, class_balanced_sampler
from .denoiser import FORWARD_MODES
from .objective import (
    OBJECTIVES,
    build_objective,
    check_cm_stability,
    check_finite,
    class_weights,
    cm_loss,
    format_stability_table,
)

logger = logging.getLogger("capman_peft")


class ConfigError(ValueError):
    """A bad flag or recipe value; scripts print it as one line and exit non-zero."""


def add_underscore_negation(group: argparse._ActionsContainer, flag: str) -> None:
    """argparse spells the negation of a BooleanOptionalAction ``--x_y`` as ``--no-x_y``; accept ``--no_x_y`` too,
    the spelling of every other flag here."""
    group.add_argument(
        f"--no_{flag}", dest=flag, action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def add_data_args(parser: argparse.ArgumentParser, default_dataset: str, default_resolution: int | None) -> None:
    parser.set_defaults(default_dataset=default_dataset)
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default=None,
        help=f"Named dataset: {', '.join(DATASETS)}. Default: {default_dataset}, unless "
        "--train_data_dir or --dataset_name names other data.",
    )
    group.add_argument("--dataset_name", default=None, help="Override the Hub id (or a local path) of --dataset.")
    group.add_argument("--train_data_dir", default=None, help="Local image folder with one sub-folder per class.")
    group.add_argument(
        "--imbalance_ratio", type=float, default=100.0, help="N_max / N_min of the long-tailed training set."
    )
    group.add_argument("--class_order", default=None, help="Comma-separated class names or ids, largest class first.")
    group.add_argument("--data_seed", type=int, default=0, help="Seed of the long-tail subsampling (legacy: 0).")
    group.add_argument("--resolution", type=int, default=default_resolution, help="Training image size.")
    group.add_argument("--center_crop", action="store_true", help="Center crop instead of random crop.")
    group.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    group.add_argument(
        "--sampler",
        choices=["random", "balanced"],
        default="random",
        help="'balanced' draws every class equally often (the paper's RS baseline).",
    )
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading worker processes.")


def add_objective_args(parser: argparse.ArgumentParser, default_objective: str) -> None:
    group = parser.add_argument_group("objective and capacity manipulation")
    group.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default=default_objective,
        help="Base objective L_base (CM adds to any of them).",
    )
    group.add_argument("--cbdm_tau", type=float, default=1.0, help="CBDM regulariser weight tau.")
    group.add_argument("--cbdm_gamma", type=float, default=0.25, help="CBDM commitment weight gamma.")
    group.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (off by default).")
    group.add_argument(
        "--capacity_manipulation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Train with the CM loss and a reserved expert; --no_capacity_manipulation is the baseline.",
    )
    add_underscore_negation(group, "capacity_manipulation")
    group.add_argument("--cm_lambda", type=float, default=1.0, help="Weight lambda of L_CM (paper Eq. 4).")
    group.add_argument(
        "--cm_forward",
        choices=list(FORWARD_MODES),
        default="fused",
        help="How theta and theta^g are computed in one module call (see CMDenoiser).",
    )
    group.add_argument("--no_consistency", action="store_true", help="Ablation: drop L_con.")
    group.add_argument("--no_diversity", action="store_true", help="Ablation: drop L_div.")
    group.add_argument("--cm_consistency_weight", type=float, default=1.0, help="w_con scaling omega_con.")
    group.add_argument(
        "--cm_diversity_weight",
        type=float,
        default=0.2,
        help="w_div scaling omega_div; 0.2 keeps lambda*c_y < 1 on the paper's settings (README).",
    )
    group.add_argument(
        "--cm_max_distance", type=float, default=None, help="Bound the diversity term: it uses min(d, max) per sample."
    )
    group.add_argument(
        "--allow_unstable_cm",
        action="store_true",
        help="Train even when lambda*c_y >= 1 for some class (the objective is unbounded below).",
    )
    group.add_argument(
        "--label_dropout",
        type=float,
        default=0.1,
        help="Probability of replacing the condition by the null one (classifier-free guidance).",
    )


def add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", default="capman-output", help="Where the pipeline and checkpoints go.")
    group.add_argument("--seed", type=int, default=0, help="Seed of initialisation, noise and timesteps.")
    group.add_argument("--train_batch_size", type=int, default=64, help="Batch size per device.")
    group.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps.")
    group.add_argument("--num_train_epochs", type=int, default=None, help="Used when --max_train_steps is unset.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per step.")
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    group.add_argument("--learning_rate", type=float, help="Peak learning rate.")
    group.add_argument(
        "--lr_scheduler",
        default="constant_with_warmup",
        help='diffusers schedule name: "constant", "constant_with_warmup", "linear", "cosine", ...',
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up steps.")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam_weight_decay", type=float, default=0.0, help="Weight decay.")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    group.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Keep an EMA of the weights; the exported pipeline uses it.",
    )
    add_underscore_negation(group, "use_ema")
    group.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay.")
    group.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Overrides accelerate's config; frozen weights use this dtype, trainable ones fp32.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--checkpointing_steps", type=int, default=5000, help="Save a resumable checkpoint every N.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='A checkpoint folder, or "latest" for the newest in --output_dir.',
    )
    group.add_argument(
        "--report_to", default="tensorboard", help='"tensorboard", "wandb", "comet_ml", "all" or "none".'
    )
    group.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the exported pipeline to the Hub.")
    group.add_argument("--hub_model_id", default=None, help="Hub repository for --push_to_hub (user/name).")
    group.add_argument("--hub_token", default=None, help="Hub token (else the cached login is used).")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe; ``base: other.yaml`` (relative to the file) is loaded first and overridden by this one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    recipe = yaml.safe_load(path.read_text()) or {}
    base = recipe.pop("base", None)
    return {**load_recipe(path.parent / base), **recipe} if base else recipe


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--config recipe.yaml`` supplies defaults; flags on the command line override them."""
    parser.add_argument("--config", default=None, help="YAML recipe of flag values; command-line flags win.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:
            recipe = load_recipe(known.config)
        except ConfigError as err:
            parser.error(str(err))
        # A key may be a flag's dest or another name of a value flag (an alias such as caption_dropout).
        aliases = {
            opt.lstrip("-"): action.dest
            for action in parser._actions
            if type(action) is argparse._StoreAction
            for opt in action.option_strings
        }
        recipe = {aliases.get(key, key): value for key, value in recipe.items()}
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(recipe) - valid)
        if unknown:
            parser.error(f"--config {known.config}: unknown keys {unknown}")
        parser.set_defaults(**recipe)
    return parser.parse_args(argv)


def check_common_args(args: argparse.Namespace) -> None:
    """Reject values that would only fail (or silently mislead) later; the message names the flag and value.

    Also resolves ``--dataset`` (the script's default named dataset unless other data was named) and ``--cm_lambda
    0``, which is training without CM: no expert and no second prediction, rather than a second pass weighted by 0.
    """
    if args.dataset is None and not (args.train_data_dir or args.dataset_name):
        args.dataset = args.default_dataset
    if args.cm_lambda < 0:
        raise ConfigError(f"--cm_lambda must be >= 0, got {args.cm_lambda}")
    if args.cm_lambda == 0 and args.capacity_manipulation:
        logger.info("--cm_lambda 0: training without capacity manipulation (one prediction per step)")
        args.capacity_manipulation = False
    if args.imbalance_ratio is not None and not args.imbalance_ratio >= 1:
        raise ConfigError(f"--imbalance_ratio must be >= 1, got {args.imbalance_ratio}")
    if args.push_to_hub and not args.hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id (user/name of the repository to create or update)")
    if not 0 <= args.label_dropout < 1:
        raise ConfigError(f"--label_dropout must be in [0, 1), got {args.label_dropout}")
    if args.capacity_manipulation and args.no_consistency and args.no_diversity:
        raise ConfigError(
            "--no_consistency together with --no_diversity leaves no CM loss; use --no_capacity_manipulation"
        )
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")


@dataclass
class CMWeights:
    """Per-class weights of the CM loss and the switches of one run."""

    omega_con: torch.Tensor
    omega_div: torch.Tensor
    cm_lambda: float
    consistency_weight: float
    diversity_weight: float
    use_consistency: bool
    use_diversity: bool
    max_distance: float | None


def prepare_cm(
    args: argparse.Namespace, class_counts: Sequence[int], class_names: Sequence[str], device: torch.device
) -> CMWeights | None:
    """Eq. 3 weights on the training device, after the stability check (DESIGN 'Stability of the CM loss')."""
    if not args.capacity_manipulation:
        return None
    stability = check_cm_stability(
        class_counts,
        args.cm_lambda,
        args.cm_consistency_weight,
        args.cm_diversity_weight if not args.no_diversity else 0.0,
        class_names=class_names,
        allow_unstable=args.allow_unstable_cm,
    )
    logger.info("CM stability (lambda * c_y must stay below 1):\n%s", format_stability_table(stability, class_names))
    omega_con, omega_div = class_weights(class_counts)
    return CMWeights(
        omega_con.to(device),
        omega_div.to(device),
        args.cm_lambda,
        args.cm_consistency_weight,
        args.cm_diversity_weight,
        not args.no_consistency,
        not args.no_diversity,
        args.cm_max_distance,
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
    """

    noise: torch.Tensor
    timesteps: torch.Tensor
    label_dropped: torch.Tensor
    extra_labels: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    latent_noise: torch.Tensor | None = None

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
) -> StepDraws:
    """Draw every random choice of `num_samples` samples at once, on the generator's device (None: the global RNG,
    on the CPU).

    Args:
        sample_shape: shape of one x0 (C, H, W).
        noise_offset: adds ``noise_offset * N(0, 1)`` per sample and channel to the noise (diffusers' flag).
        flip, latent_noise: also draw flips (p = 0.5) and VAE posterior noise of `sample_shape`.
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
    return StepDraws(noise, timesteps, dropped, extra, flips, posterior)


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


def diffusion_loss(
    denoiser: nn.Module,
    objective: Any,
    noise_scheduler: Any,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    cm: CMWeights | None,
    draws: StepDraws,
    cond_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_base + lambda * L_CM for one batch (paper Eq. 4), with one call of the denoiser module.

    The condition of sample i is class id ``labels[i]`` (UNet2DModel) or ``cond_table[labels[i]]`` (text
    embeddings); a dropped label uses the null entry ``num_classes``. CM and the objectives see the true labels.
    `draws` holds the batch's noise, timesteps, label dropout and CBDM labels (the training scripts take them from
    `StepRandomness`; elsewhere use `draw_step(...).rows(0, batch, device)`).
    """
    if draws.noise.shape != x0.shape:
        raise ValueError(f"draws for shape {tuple(draws.noise.shape)} but x0 has shape {tuple(x0.shape)}")
    noise, timesteps, dropped = draws.noise.to(x0.dtype), draws.timesteps, draws.label_dropped
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    cond_labels = torch.where(dropped, torch.full_like(labels, num_classes), labels)
    extra_labels = draws.extra_labels

    def condition(ids: torch.Tensor | None) -> torch.Tensor | None:
        return ids if ids is None or cond_table is None else cond_table[ids]

    outputs = denoiser(x_t, timesteps, condition(cond_labels), condition(extra_labels))
    eps_full, eps_general = outputs[0], outputs[1]
    loss, logs = objective(
        eps_full,
        x0=x0,
        noise=noise,
        x_t=x_t,
        timesteps=timesteps,
        labels=labels,
        pred_extra=outputs[2] if extra_labels is not None else None,
        label_dropped=dropped,
    )
    logs = dict(logs)
    if cm is not None:
        cm_value, cm_logs = cm_loss(
            eps_full,
            eps_general,
            labels,
            cm.omega_con,
            cm.omega_div,
            consistency_weight=cm.consistency_weight,
            diversity_weight=cm.diversity_weight,
            use_consistency=cm.use_consistency,
            use_diversity=cm.use_diversity,
            max_distance=cm.max_distance,
        )
        loss = loss + cm.cm_lambda * cm_value
        logs.update(cm_logs)
    logs["loss"] = loss.detach()
    return loss, logs


def guard_finite(step: int, logs: dict[str, torch.Tensor]) -> None:
    """Stop on a non-finite loss, naming the term (base loss, L_con or L_div) and the step."""
    terms = {k: logs[k] for k in ("base_loss", "cm_consistency", "cm_diversity") if k in logs}
    check_finite(step, **terms)


def finish_step(
    accelerator: Accelerator,
    progress: Any,
    ema: Any,
    params: list[nn.Parameter],
    step_logs: dict[str, torch.Tensor],
    lr_scheduler: Any,
    step: int,
) -> dict[str, float]:
    """After an optimizer step: EMA update, progress bar, tracker log. Returns the step's values as floats."""
    if ema is not None:
        ema.step(params)
    values = {k: float(v) for k, v in step_logs.items()}
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


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's Accelerator (accumulation, mixed precision, trackers under ``output_dir``), plus logging, TF32 and
    the initialisation seed."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    setup_logging(accelerator.is_main_process)
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


def save_training_checkpoint(
    args: argparse.Namespace,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None = None,
) -> Path:
    """``output_dir/checkpoint-<step>``: the trainable parameters of `model` and the optimizer/LR/EMA state."""
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return save_checkpoint(args.output_dir, step, model, state, args.checkpoints_total_limit)


def resume_training(
    args: argparse.Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None = None,
) -> int:
    """Load ``--resume_from_checkpoint`` (if any) into the model and training state; the step to continue from."""
    if not args.resume_from_checkpoint:
        return 0
    path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        logger.info("No checkpoint in %s; starting from scratch", args.output_dir)
        return 0
    state = load_checkpoint(path, model)
    if ema is not None and "ema" not in state:
        raise ConfigError(f"checkpoint {path} has no EMA state; resume it without --use_ema")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    logger.info("Resumed from %s at step %d", path, state["step"])
    return state["step"]


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
        "objective": args.objective,
    }


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
        "args": {k: v for k, v in vars(args).items() if k != "hub_token"},
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


def run_cli(main: Any, argv: Sequence[str] | None = None) -> None:
    """Call a script's main; expected user errors become one line on stderr and exit code 1."""
    from .objective import NonFiniteLossError

    try:
        main(argv)
    except (ConfigError, ValueError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
