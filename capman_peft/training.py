"""What both training scripts share: flags, YAML recipes, the CM set-up, the per-step loss, seeding and logging.

The scripts (`train_unet_cm.py`, `train_text_to_image_cm.py`) keep the diffusers shape — parse args, build models
and data, prepare, loop, save — and call into this module for everything they have in common.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .data import DATASETS
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
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(recipe) - valid)
        if unknown:
            parser.error(f"--config {known.config}: unknown keys {unknown}")
        parser.set_defaults(**recipe)
    return parser.parse_args(argv)


def check_common_args(args: argparse.Namespace) -> None:
    """Reject values that would only fail (or silently mislead) later; the message names the flag and value.

    Also resolves ``--dataset``: the script's default named dataset unless other data was named.
    """
    if args.dataset is None and not (args.train_data_dir or args.dataset_name):
        args.dataset = args.default_dataset
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


def step_seed(seed: int, step: int, process_index: int) -> int:
    """A seed per (run, step, process): noise, timesteps, label dropout and model dropout of a step depend only on
    these, so a resumed run takes exactly the steps an uninterrupted one would."""
    return hash((seed, step, process_index)) % (2**63)


def diffusion_loss(
    denoiser: nn.Module,
    objective: Any,
    noise_scheduler: Any,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    label_dropout: float,
    cm: CMWeights | None,
    generator: torch.Generator,
    cond_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_base + lambda * L_CM for one batch (paper Eq. 4), with one call of the denoiser module.

    The condition of sample i is class id ``labels[i]`` (UNet2DModel) or ``cond_table[labels[i]]`` (text
    embeddings); a dropped label uses the null entry ``num_classes``. CM and the objectives see the true labels.
    """
    batch = x0.shape[0]
    device = x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device
    )
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    dropped = torch.rand(batch, generator=generator, device=device) < label_dropout
    cond_labels = torch.where(dropped, torch.full_like(labels, num_classes), labels)
    extra_labels = objective.extra_labels(labels, generator=generator)

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


def log_values(logs: dict[str, torch.Tensor], lr: float) -> dict[str, float]:
    values = {k: float(v) for k, v in logs.items()}
    values["lr"] = lr
    return values


def total_steps(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_epochs) from whichever of the two the user gave."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        if args.num_train_epochs is None:
            raise ConfigError("give --max_train_steps or --num_train_epochs")
        return args.num_train_epochs * steps_per_epoch, args.num_train_epochs
    return args.max_train_steps, math.ceil(args.max_train_steps / steps_per_epoch)


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
