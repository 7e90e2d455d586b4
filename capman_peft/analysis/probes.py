"""The shared setup of the per-class analyses: the run's pipeline, its training data, and the loss setup of
:mod:`capman_peft.expert_use` for that pipeline."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import (
    LabelledImageDataset,
    class_prompts,
    get_dataset_spec,
    load_imbalanced_dataset,
)
from ..errors import ConfigError
from ..expert_use import LossSetup
from ..families import family_of_pipeline, pipeline_resolution
from ..objective import noise_schedule
from ..run_folder import PipelineFolder, load_pipeline, read_pipeline_folder


def make_loss_setup(pipe: Any, folder: PipelineFolder, class_names: list[str], dataset: str) -> LossSetup:
    """A :class:`LossSetup` for a loaded pipeline (class-conditional, or Stable Diffusion with class prompts)."""
    denoiser = getattr(pipe, folder.family.denoiser)
    noise_scheduler = folder.family.scheduler_class.from_config(pipe.scheduler.config)
    prompts = None
    if folder.family.prompted:
        template = folder.args.get("prompt_template") or get_dataset_spec(dataset).prompt_template
        prompts = class_prompts(class_names, template)
    family = family_of_pipeline(pipe, prompts)
    return LossSetup(denoiser, noise_schedule(noise_scheduler), family, denoiser.device)


# ----------------------------------------------------------------------------------------------------------
# Shared setup: pipeline, training data aligned with the pipeline's class ids
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AnalysisSetup:
    folder: PipelineFolder
    pipe: Any
    data: LabelledImageDataset
    class_names: list[str]
    dataset: str
    imbalance_ratio: float | None
    resolution: int

    @property
    def denoiser(self) -> Any:
        """The pipeline's trained component (UNet or transformer)."""
        return getattr(self.pipe, self.folder.family.denoiser)


def prepare_analysis(
    pipeline: str | os.PathLike,
    dataset: str | None = None,
    *,
    imbalance_ratio: float | None = None,
    resolution: int | None = None,
    dataset_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    device: str | None = None,
) -> AnalysisSetup:
    """Load the merged pipeline and the long-tailed training set, labels in the pipeline's class ids.

    Defaults come from ``training_summary.json`` (dataset, imbalance_ratio, resolution, sources); the subsampling
    seed is the legacy 0, and the pipeline's class names (its id order) are passed as ``class_order`` so that class
    ids and sizes match training.
    """
    folder = read_pipeline_folder(pipeline)
    args = folder.args
    dataset = dataset or args.get("dataset")
    local = train_data_dir or dataset_name or args.get("train_data_dir") or args.get("dataset_name")
    if dataset is None and not local:
        raise ConfigError(f"no dataset given and {str(folder.path)!r} has no training_summary.json naming one")
    get_dataset_spec(dataset)
    if imbalance_ratio is None:
        imbalance_ratio = args.get("imbalance_ratio", 100)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(folder, expert="on", scheduler="pipeline", device=device)
    if getattr(pipe.config, "class_groups", None) is not None:
        raise ConfigError(
            f"{str(folder.path)!r} holds one UNet per class group (--group_experts), and capman-analyze measures one "
            "UNet; allowed: capman-eval for this output, or capman-analyze on a CM or baseline run"
        )
    resolution = resolution or args.get("resolution") or pipeline_resolution(pipe)
    names = folder.family.class_names(pipe, folder.summary)
    data_kwargs = dict(
        name=dataset,
        imbalance_ratio=imbalance_ratio,
        resolution=resolution,
        dataset_name=dataset_name or args.get("dataset_name"),
        train_data_dir=train_data_dir or args.get("train_data_dir"),
        center_crop=True,
        split_thresholds=args.get("split_thresholds"),
        **folder.data_columns,
    )
    try:
        data = load_imbalanced_dataset(**data_kwargs, class_order=names)
    except ValueError:
        if names is None:
            raise
        data = load_imbalanced_dataset(**data_kwargs)  # names differ from the dataset's: match by class id
    num_classes = folder.family.num_classes(pipe, folder.summary) or len(names or data.class_names)
    if num_classes != data.num_classes:
        raise ConfigError(
            f"the pipeline has {num_classes} classes but {dataset!r} has {data.num_classes}; "
            "pass the dataset the model was trained on"
        )
    counts = folder.summary.get("class_counts")
    if counts is not None and list(counts) != data.class_counts:
        print(
            f"capman-analyze: warning: training class counts {list(counts)[:5]}... differ from the reloaded data "
            f"{data.class_counts[:5]}...; check --imbalance_ratio / --dataset",
            file=sys.stderr,
        )
    return AnalysisSetup(folder, pipe, data, list(names or data.class_names), dataset, imbalance_ratio, resolution)


def split_means(per_class: dict[str, list[float]], splits: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per split (the training set's ``splits``), the mean over its classes that have a value (NaN where none has)."""
    out = {}
    for split, ids in splits.items():
        if ids:
            out[split] = {}
            for key, values in per_class.items():
                known = [values[c] for c in ids if not math.isnan(values[c])]
                out[split][key] = float(np.mean(known)) if known else math.nan
    return out


def _common_record(
    setup: AnalysisSetup, loss_setup: LossSetup, num_batches: int, batch_size: int, seed: int
) -> dict[str, Any]:
    return {
        "pipeline": str(setup.folder.path),
        "dataset": setup.dataset,
        "imbalance_ratio": setup.imbalance_ratio,
        "resolution": setup.resolution,
        "num_batches": num_batches,
        "batch_size": batch_size,
        "samples_per_class": num_batches * batch_size,
        "seed": seed,
        "prediction_type": loss_setup.schedule.prediction_type,
        "class_names": setup.class_names,
        "class_counts": setup.data.class_counts,
        "class_splits": setup.data.splits,
        "order_by_size": sorted(range(len(setup.class_names)), key=lambda c: -setup.data.class_counts[c]),
    }


def _check_sampling(num_batches: int, batch_size: int, seed: int) -> None:
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
