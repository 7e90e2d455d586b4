"""From parsed flags to typed settings, and the checks that run before any work: every bad combination is one
``ConfigError`` naming the flag and value, raised before anything is written."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..data import DATASETS
from ..errors import ConfigError
from ..settings import (
    DataSettings,
    HubSettings,
    ObjectiveSettings,
    OptimizationSettings,
    OutputSettings,
    TrainingSettings,
)

logger = logging.getLogger("capman_peft")


# Parsed values that are not settings: the recipe file (``TrainingSettings.config``) and the script's default dataset
# (resolved into ``--dataset``).
NOT_SETTINGS = frozenset({"config", "default_dataset"})


def check_every_flag_placed(args: argparse.Namespace, settings: TrainingSettings) -> None:
    """Every parsed flag must land in a settings section (the script's model section included): one that lands
    nowhere would be accepted and silently do nothing. A programming error, so it raises on every run."""
    unplaced = sorted(set(vars(args)) - set(settings.flags()) - NOT_SETTINGS - {"hub_token"})
    if unplaced:
        raise RuntimeError(f"flags parsed but in no settings section: {', '.join('--' + k for k in unplaced)}")


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
    from ..checkpointing import list_checkpoints
    from ..run_folder import LOCK_FILE, check_writable_folder

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
        from ..hub import check_hub_upload

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
    if data.train_data_dir and data.dataset and not DATASETS[data.dataset].local_copy:
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
