"""The flags both training scripts share, by group (data, objective, training, validation), with the script's
defaults; each script adds its model's flags."""

from __future__ import annotations

import argparse
import os

from diffusers.optimization import SchedulerType

from ..data import DATASETS
from ..denoiser import FORWARD_MODES
from ..objective import CM_FORMS, CONSISTENCY, DEFAULT_BAND_UPPER, DEFAULT_MARGIN, DEFAULT_RELATIVE_MARGIN, OBJECTIVES
from .values import (
    ArgumentParser,
    add_underscore_negation,
    fraction,
    margin_value,
    nonnegative_float,
    nonnegative_int,
    open_unit,
    positive_float,
    positive_int,
    probability,
    ratio,
    seed_value,
)


def add_data_args(parser: argparse.ArgumentParser, default_dataset: str, default_resolution: int | None) -> None:
    parser.set_defaults(default_dataset=default_dataset)
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=None,
        help=f"Named dataset. Default: {default_dataset}, unless --train_data_dir or --dataset_name names other data.",
    )
    group.add_argument("--dataset_name", default=None, help="Override the Hub id (or a local path) of --dataset.")
    group.add_argument(
        "--train_data_dir",
        type=os.path.expanduser,
        default=None,
        help="Local image folder: one sub-folder per class, or images with a metadata.jsonl (diffusers' imagefolder "
        "format; name the class with --class_column). Its counts are kept unless --imbalance_ratio is given. With "
        "--dataset imb-imagenet-lt or imb-inaturalist: the folder with the official list files and the images.",
    )
    group.add_argument(
        "--image_column", default=None, help="Image column of a --dataset_name or metadata.jsonl (default: image)."
    )
    group.add_argument(
        "--class_column",
        default=None,
        help="Class column of a --dataset_name or metadata.jsonl: a ClassLabel, integer ids, or class names as text "
        "(default: label). The class decides the CM weights, the Many/Medium/Few splits and the per-class evaluation.",
    )
    group.add_argument(
        "--imbalance_ratio",
        type=ratio,
        default=None,
        help="N_max / N_min of the long-tailed training set (Cao et al. subsampling). Default: 100 for a named "
        "dataset; a --train_data_dir folder keeps its own counts unless this is given.",
    )
    group.add_argument("--class_order", default=None, help="Comma-separated class names or ids, largest class first.")
    group.add_argument(
        "--split_thresholds",
        type=nonnegative_int,
        nargs=2,
        metavar=("MANY_ABOVE", "FEW_BELOW"),
        default=None,
        help="Many/Medium/Few by image count: Many has more than MANY_ABOVE training images, Few fewer than "
        "FEW_BELOW (e.g. 100 20, ImageNet-LT's convention, the default of imb-imagenet-lt and imb-inaturalist). "
        "Default: the thirds of the classes ranked by size (the paper's).",
    )
    group.add_argument("--data_seed", type=seed_value, default=0, help="Seed of the long-tail subsampling (legacy: 0).")
    group.add_argument("--resolution", type=positive_int, default=default_resolution, help="Training image size.")
    group.add_argument("--center_crop", action="store_true", help="Center crop instead of random crop.")
    group.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    group.add_argument(
        "--sampler",
        choices=["random", "balanced"],
        default="random",
        help="'balanced' draws every class equally often (the paper's RS baseline).",
    )
    group.add_argument(
        "--dataloader_num_workers", type=nonnegative_int, default=0, help="Data loading worker processes."
    )


def add_objective_args(parser: argparse.ArgumentParser, default_objective: str) -> None:
    group = parser.add_argument_group("objective")
    group.add_argument(
        "--objective",
        choices=[*OBJECTIVES, CONSISTENCY],
        default=default_objective,
        help="Base objective L_base (CM adds to any of them): ddpm, cbdm, oc, or consistency (train_unet_cm.py only: "
        "consistency training with iCT's choices; the output is a diffusers ConsistencyModelPipeline).",
    )
    group.add_argument("--cbdm_tau", type=nonnegative_float, default=1.0, help="CBDM regulariser weight tau.")
    group.add_argument("--cbdm_gamma", type=nonnegative_float, default=0.25, help="CBDM commitment weight gamma.")
    group.add_argument(
        "--oc_transfer_label_dropped",
        action="store_true",
        help="OC: label-dropped samples draw a reference by their true class too, as the OC authors' trainer does "
        "(default: they keep their own target, the unconditional one; docs/method.md \"Fidelity to the authors' "
        'code").',
    )
    group.add_argument(
        "--snr_gamma", type=positive_float, default=None, help="Min-SNR-gamma loss weighting (off by default)."
    )
    group.add_argument(
        "--focal_gamma",
        type=nonnegative_float,
        default=None,
        help="The paper's +Focal baseline: weight each sample's loss L by (1 - exp(-L))^gamma (focal loss, Lin et al. "
        "2017, with -log p = L); 2 is Lin et al.'s value. Off by default; combines with every --objective and CM.",
    )
    group.add_argument(
        "--coral",
        action="store_true",
        help="CORAL (Rodriguez et al. 2025): a supervised contrastive loss on the UNet's average-pooled mid-block "
        "output through a 128-d projection head trained alongside (not exported); adds to every --objective and CM. "
        "UNet bases only.",
    )
    group.add_argument(
        "--coral_weight", type=nonnegative_float, default=0.5, help="CORAL's weight (the authors' --supcon_weight)."
    )
    group.add_argument(
        "--coral_time_temperature",
        type=positive_float,
        default=0.3,
        help="CORAL's timestep scale exp((1 - t/T) / this) (the authors' --temperature_scaling).",
    )
    group.add_argument(
        "--coral_temperature",
        type=positive_float,
        default=0.1,
        help="SupCon's temperature, also the factor CORAL's loss is added with (the authors' --supcon_temp).",
    )
    group.add_argument(
        "--label_dropout",
        type=probability,
        default=0.1,
        help="Probability of replacing the condition by the null one (classifier-free guidance).",
    )


def add_cm_args(parser: ArgumentParser, capacity_manipulation: bool | None, capacity_manipulation_help: str) -> None:
    """The CM switch and the flags that only act with CM (recorded in ``parser.cm_only``)."""
    group = parser.add_argument_group("capacity manipulation")
    group.add_argument(
        "--capacity_manipulation",
        action=argparse.BooleanOptionalAction,
        default=capacity_manipulation,
        help=capacity_manipulation_help,
    )
    add_underscore_negation(group, "capacity_manipulation")
    switches = {action.dest for action in parser._actions}
    group.add_argument(
        "--cm_lambda", type=nonnegative_float, default=1.0, help="Weight lambda of L_CM (paper Eq. 4; 0: no CM)."
    )
    group.add_argument(
        "--cm_forward",
        choices=list(FORWARD_MODES),
        default="fused",
        help="How theta and theta^g are computed in one call; shared_prefix runs the layers before the experts once.",
    )
    group.add_argument("--no_consistency", action="store_true", help="Ablation: drop L_con (w_con = 0).")
    group.add_argument("--no_diversity", action="store_true", help="Ablation: drop L_div (w_div = 0).")
    group.add_argument(
        "--cm_consistency_weight", type=nonnegative_float, default=1.0, help="w_con scaling omega_con (Eq. 3)."
    )
    group.add_argument(
        "--cm_diversity_weight",
        type=nonnegative_float,
        default=1.0,
        help="w_div scaling omega_div (Eq. 3; paper: 1).",
    )
    group.add_argument(
        "--cm_form",
        choices=list(CM_FORMS),
        default="relative",
        help="How L_CM pushes apart the classes with net weight c_y = w_div*omega_div - w_con*omega_con > 0 (the "
        "minorities); classes with c_y < 0 are pulled together with weight -c_y. 'relative' (default, chosen by the "
        "study's pre-registered rule, docs/study.md): such a class pays c_y * max(0, margin - "
        "RMS(eps_theta - eps_theta^g)) with a margin per sample of --cm_relative_margin times theta's own RMS error, "
        "bounded below by 0, and the push moves theta^g only. 'hinge': a fixed margin --cm_margin, and the push "
        "moves both predictions (the expert may meet the margin by perturbing theta itself). 'hinge_general': the "
        "fixed margin, theta^g only. 'band': 'relative' with an upper wall --cm_band_upper past which theta^g is "
        "pulled back, so the gap stays in a band. 'paper': Eq. 2 as written, unbounded below as soon as a class has "
        "c_y > 0 (refused unless --allow_unbounded_cm).",
    )
    group.add_argument(
        "--cm_margin",
        type=margin_value,
        default=DEFAULT_MARGIN,
        help="The m of 'hinge' and 'hinge_general': the RMS gap between theta's and theta^g's predictions that a "
        f"pushed class should reach, in units of the (unit-variance) noise. Default {DEFAULT_MARGIN}, chosen a "
        "priori, not tuned.",
    )
    group.add_argument(
        "--cm_relative_margin",
        type=margin_value,
        default=DEFAULT_RELATIVE_MARGIN,
        help="The margin of 'relative' and the lower margin of 'band' as a fraction of theta's own RMS error on each "
        "sample (theta^g's loss is then about 1 + rho^2 times theta's on a pushed class). Default "
        f"{DEFAULT_RELATIVE_MARGIN}, chosen a priori.",
    )
    group.add_argument(
        "--cm_band_upper",
        type=margin_value,
        default=DEFAULT_BAND_UPPER,
        help="The upper wall of 'band' as a fraction of theta's own RMS error: a pushed class whose gap goes past it "
        "pulls theta^g back, so theta^g's loss there stays below about 1 + upper^2 times theta's. Must be above "
        f"--cm_relative_margin. Default {DEFAULT_BAND_UPPER}, chosen a priori.",
    )
    group.add_argument(
        "--cm_push_warmup_steps",
        type=nonnegative_int,
        default=0,
        help="Ramp the push linearly from 0 to its full weight over this many optimizer steps (the pull is never "
        "ramped), so a class is pushed apart only once theta has begun to fit it. Default 0: full from the start.",
    )
    group.add_argument(
        "--cm_general_fraction",
        type=fraction,
        default=1.0,
        help="Fraction of each batch on which theta^g is computed (rows drawn with probability proportional to "
        "their CM weight, importance-weighted so that L_CM is unbiased). Below 1 the general pass costs less; "
        "needs --cm_forward fused or shared_prefix. Default here: %(default)s.",
    )
    group.add_argument(
        "--allow_unbounded_cm",
        action="store_true",
        help="Train the 'paper' form even where it is unbounded below (to reproduce the paper's literal Eq. 2).",
    )
    parser.cm_only.update(action.dest for action in parser._actions if action.dest not in switches)


def add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--output_dir",
        type=os.path.expanduser,
        default="capman-output",
        help="Where the pipeline and checkpoints go: a new or empty folder, unless resuming or --overwrite_output_dir.",
    )
    group.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Write into a non-empty --output_dir (its files of the same names are replaced).",
    )
    group.add_argument("--seed", type=seed_value, default=0, help="Seed of initialisation, noise and timesteps.")
    group.add_argument("--train_batch_size", type=positive_int, default=64, help="Batch size per device.")
    group.add_argument("--max_train_steps", type=positive_int, default=None, help="Total optimizer steps.")
    group.add_argument(
        "--num_train_epochs", type=positive_int, default=None, help="Used when --max_train_steps is unset."
    )
    group.add_argument(
        "--gradient_accumulation_steps", type=positive_int, default=1, help="Micro-batches per optimizer step."
    )
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    group.add_argument("--learning_rate", type=positive_float, help="Peak learning rate.")
    group.add_argument(
        "--lr_scheduler",
        choices=[s.value for s in SchedulerType if s.value != "piecewise_constant"],
        default="constant_with_warmup",
        help="diffusers' learning-rate schedule.",
    )
    group.add_argument("--lr_warmup_steps", type=nonnegative_int, default=0, help="Linear warm-up steps.")
    group.add_argument("--adam_beta1", type=probability, default=0.9, help="Adam beta1.")
    group.add_argument("--adam_beta2", type=probability, default=0.999, help="Adam beta2.")
    group.add_argument("--adam_weight_decay", type=nonnegative_float, default=0.0, help="Weight decay.")
    group.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="Adam epsilon.")
    group.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="Gradient clipping norm.")
    group.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Keep an EMA of the weights; the exported pipeline uses it.",
    )
    add_underscore_negation(group, "use_ema")
    group.add_argument("--ema_decay", type=open_unit, default=0.9999, help="EMA decay.")
    group.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Overrides accelerate's config; frozen weights use this dtype, trainable ones fp32 (fp16 needs CUDA).",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument(
        "--checkpointing_steps", type=positive_int, default=5000, help="Save a resumable checkpoint every N steps."
    )
    group.add_argument(
        "--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints."
    )
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='A checkpoint folder, or "latest" for the newest valid one in --output_dir.',
    )
    group.add_argument(
        "--report_to",
        choices=["tensorboard", "wandb", "comet_ml", "all", "none"],
        default="tensorboard",
        help="Experiment tracker.",
    )
    group.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the exported pipeline to the Hub.")
    group.add_argument("--hub_model_id", default=None, help="Hub repository for --push_to_hub (user/name).")
    group.add_argument("--hub_token", default=None, help="Hub token (else the cached login is used).")


def add_validation_args(parser: argparse.ArgumentParser, validation_epochs: int, guidance_scale: float | None) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument(
        "--validation_epochs",
        type=nonnegative_int,
        default=validation_epochs,
        help="Sample a per-class grid every N epochs (0: only at the end).",
    )
    group.add_argument(
        "--num_validation_images", type=positive_int, default=4, help="Images per class in the grids (columns)."
    )
    group.add_argument(
        "--num_inference_steps", type=positive_int, default=50, help="DDIM steps for the grids (paper: 50)."
    )
    family_default = (
        "Default: the family's (SD 7.5; Flux 3.5, its guidance input, which a guidance-distilled Flux is also trained "
        "with, as in diffusers' Flux script)."
    )
    group.add_argument(
        "--guidance_scale",
        type=nonnegative_float,
        default=guidance_scale,
        help="Classifier-free guidance scale of the grids. "
        + (f"Default {guidance_scale}." if guidance_scale is not None else family_default),
    )


def script_parser(
    description: str,
    *,
    dataset: str,
    resolution: int,
    objective: str,
    validation_epochs: int,
    guidance_scale: float | None,
    capacity_manipulation: bool | None,
    capacity_manipulation_help: str,
) -> ArgumentParser:
    """The flags both training scripts have, with the script's defaults (whether CM is on, None: on when
    fine-tuning and off from scratch; and the help that says what that default rests on); the script adds its
    model's flags."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, dataset, resolution)
    add_objective_args(parser, objective)
    add_cm_args(parser, capacity_manipulation, capacity_manipulation_help)
    add_training_args(parser)
    add_validation_args(parser, validation_epochs, guidance_scale)
    return parser
