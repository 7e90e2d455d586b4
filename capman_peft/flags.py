"""The training scripts' command line: flags with typed values, and the checks that run before any work (YAML
recipes, read by the same parser, are in ``recipes.py``).

Every bad value is one line on stderr, ``error: <flag or file>: <what is wrong>; <what is allowed>``, and a non-zero
exit, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from diffusers.optimization import SchedulerType

from .data import DATASETS
from .denoiser import FORWARD_MODES
from .errors import ConfigError
from .objective import CM_FORMS, DEFAULT_BAND_UPPER, DEFAULT_MARGIN, DEFAULT_RELATIVE_MARGIN, OBJECTIVES
from .settings import (
    DataSettings,
    HubSettings,
    ObjectiveSettings,
    OptimizationSettings,
    OutputSettings,
    TrainingSettings,
)

logger = logging.getLogger("capman_peft")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``error: --flag: ...`` (no usage block), exit status 2.

    While a recipe is read, errors raise ``ConfigError`` naming the recipe file and key instead.
    """

    recipe_context: str | None = None

    def error(self, message: str) -> None:  # type: ignore[override]
        message = message.removeprefix("argument ")
        if self.recipe_context is not None:
            raise ConfigError(f"{self.recipe_context}: {message}")
        self.exit(2, f"error: {message}\n")


def _value(kind: type, check: Callable[[Any], bool], allowed: str) -> Callable[[str], Any]:
    """An argparse ``type`` that converts with `kind` and accepts only values passing `check`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}")
        return value

    parse.__name__ = allowed
    return parse


positive_int = _value(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _value(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _value(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = _value(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
probability = _value(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_unit = _value(float, lambda v: 0 < v < 1, "a number in (0, 1)")
fraction = _value(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
ratio = _value(float, lambda v: math.isfinite(v) and v >= 1, "a finite number >= 1")
# RMS gaps are in units of the unit-variance noise: beyond 10 a margin only makes the loss overflow.
margin_value = _value(float, lambda v: 0 < v <= 10, "a number in (0, 10]")


def device_value(text: str) -> str:
    """An argparse ``type`` for ``--device``: cpu, or cuda / cuda:N where CUDA is available here."""
    import torch

    if text == "cpu":
        return text
    if re.fullmatch(r"cuda(:\d+)?", text):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"got {text!r}, but no CUDA device is available here; allowed: cpu")
        return text
    raise argparse.ArgumentTypeError(f"got {text!r}; allowed: cpu, cuda or cuda:N")


def module_patterns(text: str) -> str:
    """An argparse ``type`` for layer selections: comma-separated names (suffixes), or one regex that compiles."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: comma-separated layer names or one regex")
    for name in names:
        try:
            re.compile(name)
        except re.error as err:
            raise argparse.ArgumentTypeError(
                f"got {text!r}: {name!r} is not a valid regex ({err}); allowed: comma-separated layer names or one "
                "regex"
            ) from None
    return text


def prompt_template_value(text: str) -> str:
    """An argparse ``type`` for class prompt templates: exactly one ``{}``, where the class name goes."""
    import string

    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"got {text!r}: {err}; allowed: a text with one {{}}") from None
    if fields != [""]:
        raise argparse.ArgumentTypeError(
            f"got {text!r} with {len(fields)} fields {fields}; allowed: a text with exactly one {{}} for the class "
            "name (write {{ and }} for literal braces)"
        )
    return text


# numpy's seeds (the long-tail subsampling, derived seeds) are 32-bit; torch's accept more, the rule is one for all.
seed_value = _value(int, lambda v: 0 <= v < 2**32, "an integer in [0, 4294967295]")


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


def add_objective_args(
    parser: argparse.ArgumentParser,
    default_objective: str,
    capacity_manipulation: bool,
    capacity_manipulation_help: str,
) -> None:
    group = parser.add_argument_group("objective and capacity manipulation")
    group.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default=default_objective,
        help="Base objective L_base (CM adds to any of them).",
    )
    group.add_argument("--cbdm_tau", type=nonnegative_float, default=1.0, help="CBDM regulariser weight tau.")
    group.add_argument("--cbdm_gamma", type=nonnegative_float, default=0.25, help="CBDM commitment weight gamma.")
    group.add_argument(
        "--oc_transfer_label_dropped",
        action="store_true",
        help="OC: label-dropped samples draw a reference by their true class too, as the OC authors' trainer does "
        "(default: they keep their own target, the unconditional one; docs/design.md \"Fidelity to the authors' "
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
        "--capacity_manipulation",
        action=argparse.BooleanOptionalAction,
        default=capacity_manipulation,
        help=capacity_manipulation_help,
    )
    add_underscore_negation(group, "capacity_manipulation")
    group.add_argument(
        "--cm_lambda", type=nonnegative_float, default=1.0, help="Weight lambda of L_CM (paper Eq. 4; 0: no CM)."
    )
    group.add_argument(
        "--cm_forward",
        choices=list(FORWARD_MODES),
        default="fused",
        help="How theta and theta^g are computed in one module call (see CMDenoiser).",
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
        'study\'s pre-registered rule, README "Does CM help?"): such a class pays c_y * max(0, margin - '
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
    group.add_argument(
        "--label_dropout",
        type=probability,
        default=0.1,
        help="Probability of replacing the condition by the null one (classifier-free guidance).",
    )


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


def add_validation_args(parser: argparse.ArgumentParser, validation_epochs: int, guidance_scale: float) -> None:
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
    group.add_argument(
        "--guidance_scale", type=nonnegative_float, default=guidance_scale, help="Classifier-free guidance scale."
    )


def script_parser(
    description: str,
    *,
    dataset: str,
    resolution: int,
    objective: str,
    validation_epochs: int,
    guidance_scale: float,
    capacity_manipulation: bool,
    capacity_manipulation_help: str,
) -> ArgumentParser:
    """The flags both training scripts have, with the script's defaults (whether CM is on, and the help that says
    what that default rests on); the script adds its model's flags."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, dataset, resolution)
    add_objective_args(parser, objective, capacity_manipulation, capacity_manipulation_help)
    add_training_args(parser)
    add_validation_args(parser, validation_epochs, guidance_scale)
    return parser


# --- checks before any work ------------------------------------------------------------------------------------


def section(cls: type, args: argparse.Namespace, **resolved: Any) -> Any:
    """One frozen settings section from the parsed flags of the same names; `resolved` gives derived values."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **resolved})


def training_settings(args: argparse.Namespace) -> TrainingSettings:
    """The typed settings of a training run from its parsed flags, after the checks both scripts share.

    Resolved here, once: ``--dataset`` (the script's default named dataset unless other data was named), the default
    ``--imbalance_ratio`` (100 for a named dataset, the folder's own counts for ``--train_data_dir``) and
    ``--cm_lambda 0``, which is training without CM: no expert and no second prediction.
    """
    dataset = args.dataset
    if dataset is None and not (args.train_data_dir or args.dataset_name):
        dataset = args.default_dataset
    imbalance_ratio = args.imbalance_ratio
    if imbalance_ratio is None and dataset is not None and not args.train_data_dir:
        imbalance_ratio = 100.0
    capacity_manipulation = args.capacity_manipulation
    if args.cm_lambda == 0 and capacity_manipulation:
        logger.info("--cm_lambda 0: training without capacity manipulation (one prediction per step)")
        capacity_manipulation = False
    settings = TrainingSettings(
        data=section(DataSettings, args, dataset=dataset, imbalance_ratio=imbalance_ratio),
        objective=section(ObjectiveSettings, args, capacity_manipulation=capacity_manipulation),
        optimization=section(OptimizationSettings, args),
        output=section(OutputSettings, args),
        hub=section(HubSettings, args),
        config=args.config,
    )
    check_training_settings(settings)
    return settings


def check_output_dir(output: OutputSettings) -> None:
    """The output folder policy: a new or empty folder, unless resuming this run there or ``--overwrite_output_dir``.

    An earlier run's pipeline, adapter and checkpoints are never mixed into a new run silently, no file of the
    user's (a README.md, say) is replaced without being asked, and resuming only ever continues the run whose
    checkpoints are in this folder.
    """
    from .checkpointing import LOCK_FILE, list_checkpoints
    from .run_folder import check_writable_folder

    if not output.output_dir or not str(output.output_dir).strip():
        raise ConfigError("--output_dir: is empty; allowed: a folder for the pipeline and checkpoints")
    path = Path(output.output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {path}: is a file; allowed: a new or empty folder")
    check_writable_folder(path)
    entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []
    if not entries or output.overwrite_output_dir:
        return
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    resume = output.resume_from_checkpoint
    if not resume:
        raise ConfigError(
            f"--output_dir {path}: is not empty ({shown}); allowed: a new or empty folder, "
            "--resume_from_checkpoint latest to continue the run there, or --overwrite_output_dir"
        )
    if resume == "latest" and not list_checkpoints(path):
        raise ConfigError(
            f"--resume_from_checkpoint latest: {path} has no checkpoint to continue, and it is not empty ({shown}); "
            "allowed: a folder with this run's checkpoints, a new or empty --output_dir, or --overwrite_output_dir"
        )
    if resume != "latest":
        checkpoint = Path(resume) if Path(resume).exists() else path / resume
        if checkpoint.resolve().parent != path.resolve():
            raise ConfigError(
                f"--resume_from_checkpoint {resume}: continues a run in {checkpoint.parent}, but --output_dir {path} "
                f"is another folder and not empty ({shown}); allowed: the checkpoint's own folder as --output_dir, "
                "or a new or empty one"
            )


def check_training_settings(settings: TrainingSettings) -> None:
    """Reject combinations that would only fail (or silently mislead) later; the message names the flag and value."""
    data, objective, optimization = settings.data, settings.objective, settings.optimization
    output, hub = settings.output, settings.hub
    if optimization.max_train_steps is None and optimization.num_train_epochs is None:
        raise ConfigError("--max_train_steps: not given; allowed: --max_train_steps or --num_train_epochs >= 1")
    if hub.push_to_hub and not hub.hub_model_id:
        raise ConfigError("--hub_model_id: missing; --push_to_hub needs the user/name of the repository")
    if hub.push_to_hub:
        from .hub import check_hub_upload

        check_hub_upload(hub.hub_model_id, hub.hub_token)
    if objective.capacity_manipulation and objective.no_consistency and objective.no_diversity:
        raise ConfigError(
            "--no_diversity: together with --no_consistency it leaves no CM loss; "
            "allowed: one of them, or --no_capacity_manipulation"
        )
    if objective.cm_form == "band" and not objective.cm_band_upper > objective.cm_relative_margin:
        raise ConfigError(
            f"--cm_band_upper {objective.cm_band_upper}: the band's upper wall must be above its lower margin "
            f"--cm_relative_margin {objective.cm_relative_margin}; allowed: a value above it"
        )
    if objective.cm_general_fraction < 1 and objective.cm_forward == "sequential":
        raise ConfigError(
            f"--cm_general_fraction {objective.cm_general_fraction}: needs --cm_forward fused or shared_prefix "
            "(sequential computes theta^g on every row); allowed: 1 with sequential"
        )
    if optimization.learning_rate is None:
        raise ConfigError("--learning_rate: missing; allowed: a finite number > 0")
    if data.split_thresholds and data.split_thresholds[1] > data.split_thresholds[0] + 1:
        many_above, few_below = data.split_thresholds
        raise ConfigError(
            f"--split_thresholds {many_above} {few_below}: a class cannot have more than {many_above} and fewer than "
            f"{few_below} images at once; allowed: MANY_ABOVE FEW_BELOW with FEW_BELOW <= MANY_ABOVE + 1, e.g. 100 20"
        )
    if data.train_data_dir and data.dataset and not DATASETS[data.dataset].list_files:
        raise ConfigError(
            f"--train_data_dir {data.train_data_dir}: given together with --dataset {data.dataset}; allowed: one of "
            "them (a local copy of a named dataset's Hub files goes in --dataset_name)"
        )
    if output.report_to in ("wandb", "comet_ml"):  # ("all" takes the trackers that are installed)
        import importlib.util

        if importlib.util.find_spec(output.report_to) is None:
            raise ConfigError(
                f"--report_to {output.report_to}: needs {output.report_to}, which is not installed; allowed: "
                f"pip install {output.report_to}, or --report_to tensorboard / none"
            )
    logging_dir = Path(output.output_dir, output.logging_dir).resolve()
    if not logging_dir.is_relative_to(Path(output.output_dir).resolve()):
        logger.warning(
            "--logging_dir %s: the tracker logs go to %s, outside --output_dir", output.logging_dir, logging_dir
        )
    check_output_dir(output)
