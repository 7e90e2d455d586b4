"""Evaluating one trained model: :func:`evaluate_pipeline` (``batch.py`` runs it over several for capman-eval).

One model is evaluated in four steps: resolve (the run folder, dataset, feature extractor and its weights, the real
reference), generate (a class-balanced seeded set), measure (torch-fidelity metrics) and record (``metrics.json``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..data import DATASETS, class_prompts, class_splits, get_dataset_spec, load_reference_dataset
from ..errors import ConfigError
from ..families import pipeline_resolution
from ..run_folder import (
    PipelineFolder,
    load_pipeline,
    read_pipeline_folder,
)
from .digits import (
    DIGITS_CLASSIFIER,
    DigitsClassifier,
    classifier_accuracy,
    digits_classifier_file,
    load_digits_classifier,
    resolve_feature_extractor,
)
from .fidelity import (
    METRIC_NAMES,
    _check_metrics,
    _reference_cache_prefix,
    build_feature_extractor,
    default_cache_dir,
    measure_fidelity,
    safe_weights_file,
)
from .report import write_model_outputs
from .sampling import _check_settings, generate_balanced

EXPERT_SETTINGS = ("on", "off", "both")


@dataclass
class EvalSettings:
    """How one model is sampled and measured (``capman-eval``'s flags; the defaults are its defaults).

    Attributes:
        metrics: any of ``fid``, ``kid``, ``isc``, ``prc`` (a list or a comma-separated string).
        scheduler: ``ddim``, ``dpm`` (DPM-Solver++ multistep) or ``pipeline`` (keep the saved one); None: ddim, or
            the saved one for a flow-matching model.
        expert: ``"on"`` (θ, the merged model) or ``"off"`` (θ^g, from ``output_dir/adapter``).
        feature_extractor: a torch-fidelity extractor name; default ``inception-v3-compat``, or
            ``digits-classifier`` for ``imb-digits``.
        feature_extractor_weights_path: local weights for the extractor (offline machines).
        resolution: image side for generation (SD) and the reference; default: the pipeline's sample size.
        num_images: a total budget of generated images spread evenly over the classes (the paper's 50,000 for
            ImageNet-LT or iNaturalist): ``num_images // C`` per class, replacing ``num_images_per_class``.
        reference_images_per_class: real images per class; default: as many as the smallest class has.
        dataset_name, train_data_dir: passed to the data module (Hub id / local copy, class-folder tree); default:
            the training summary's.
        prompt_template: SD prompt template; default: the training summary's, else the dataset's.
        cache_dir: digits classifier and reference-feature cache; default ``~/.cache/capman_peft``.
        cache: cache the reference features.
        device: default ``cuda`` when available, else ``cpu``.
    """

    num_images_per_class: int = 500
    num_images: int | None = None
    metrics: Sequence[str] | str = METRIC_NAMES
    scheduler: str | None = None
    steps: int = 50
    guidance_scale: float = 1.5
    expert: str = "on"
    feature_extractor: str | None = None
    feature_extractor_weights_path: str | os.PathLike | None = None
    batch_size: int = 64
    seed: int = 0
    per_class_fid: bool = False
    resolution: int | None = None
    reference_images_per_class: int | None = None
    dataset_name: str | None = None
    train_data_dir: str | os.PathLike | None = None
    prompt_template: str | None = None
    cache_dir: str | os.PathLike | None = None
    cache: bool = True
    device: str | None = None
    progress: bool = True


def _with_overrides(settings: EvalSettings | None, overrides: dict[str, Any]) -> EvalSettings:
    """``settings`` (default: all defaults) with the fields named in ``overrides`` replaced."""
    return replace(settings if settings is not None else EvalSettings(), **overrides)


@dataclass
class _Run:
    """What the resolve step settles before any sampling."""

    folder: PipelineFolder
    dataset: str
    spec: Any
    dataset_name: str | None
    train_data_dir: str | os.PathLike | None
    metrics: list[str]
    extractor: str
    weights: str | None
    cache_dir: Path
    device: str
    resolution: int
    reference: Any
    reference_labels: torch.Tensor
    class_names: list[str]
    num_classes: int
    prompts: list[str] | None
    training_counts: list[int] | int

    @property
    def splits(self) -> dict[str, list[int]]:
        """Many / Medium / Few as the training run recorded them; else by its class counts (by class id when the
        folder records neither)."""
        recorded = self.folder.summary.get("splits")
        if isinstance(recorded, dict) and sorted(c for ids in recorded.values() for c in ids) == list(
            range(self.num_classes)
        ):
            return {name: list(recorded.get(name, [])) for name in ("many", "medium", "few")}
        return class_splits(self.training_counts)

    @property
    def reference_per_class(self) -> int:
        return len(self.reference) // self.num_classes


def evaluate_pipeline(
    pipeline: str | os.PathLike,
    dataset: str | None = None,
    settings: EvalSettings | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    label: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Generate a balanced set from one pipeline folder and return its metrics (the ``metrics.json`` dict).

    Args:
        pipeline: a training run's ``output_dir`` (must hold ``model_index.json``).
        dataset: a :data:`capman_peft.data.DATASETS` name; default: the one in ``training_summary.json``.
        settings: an :class:`EvalSettings`; default: all its defaults.
        output_dir: where ``metrics.json`` and ``samples.png`` go; ``None`` writes nothing.
        label: the model's name in the results; default: the pipeline folder's name.
        overrides: :class:`EvalSettings` fields replacing those of ``settings``, e.g. ``num_images_per_class=3``.
    """
    settings = _with_overrides(settings, overrides)
    run, pipe = _resolve(pipeline, dataset, settings)
    if settings.num_images is not None:
        settings = replace(settings, num_images_per_class=settings.num_images // run.num_classes)
    images, labels = _generate(pipe, run, settings)
    del pipe
    measured = _measure(run, settings, images, labels)
    return _record(run, settings, measured, images, labels, output_dir=output_dir, label=label)


def _resolve(pipeline: str | os.PathLike, dataset: str | None, settings: EvalSettings) -> tuple[_Run, Any]:
    """Check the settings, read the folder, settle dataset, extractor and weights; load the model and the reference."""
    s = settings
    metrics = _check_metrics(s.metrics)
    _check_settings(s.num_images_per_class, s.steps, s.guidance_scale, s.batch_size, s.seed)
    if s.expert not in ("on", "off"):
        raise ConfigError(f"expert must be 'on' or 'off', got {s.expert!r}")
    folder = read_pipeline_folder(pipeline)
    dataset_name = s.dataset_name or folder.args.get("dataset_name")
    train_data_dir = s.train_data_dir or folder.args.get("train_data_dir")
    dataset = _resolve_dataset(folder, dataset, local_data=bool(train_data_dir or dataset_name))
    spec = get_dataset_spec(dataset)
    extractor = resolve_feature_extractor(dataset, s.feature_extractor)
    cache_dir = Path(s.cache_dir or default_cache_dir())
    weights = _resolve_weights(extractor, s.feature_extractor_weights_path, cache_dir)
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")

    pipe = load_pipeline(folder, expert=s.expert, scheduler=s.scheduler, device=device)
    resolution = s.resolution or pipeline_resolution(pipe)
    reference = load_reference_dataset(
        dataset,
        resolution,
        s.reference_images_per_class,
        dataset_name=dataset_name,
        train_data_dir=train_data_dir,
        **folder.data_columns,
    )
    class_names, num_classes, prompts = _model_classes(pipe, folder, reference, spec, s.prompt_template)
    if s.num_images is not None and s.num_images < num_classes:
        raise ConfigError(
            f"--num_images {s.num_images}: fewer than one image for each of the {num_classes} classes; allowed: at "
            f"least {num_classes}"
        )
    reference_labels = _align_reference_labels(reference.labels, reference.class_names, class_names, num_classes)
    class_names = list(class_names or reference.class_names)
    run = _Run(
        folder=folder,
        dataset=dataset,
        spec=spec,
        dataset_name=dataset_name,
        train_data_dir=train_data_dir,
        metrics=metrics,
        extractor=extractor,
        weights=weights,
        cache_dir=cache_dir,
        device=device,
        resolution=resolution,
        reference=reference,
        reference_labels=reference_labels,
        class_names=class_names,
        num_classes=num_classes,
        prompts=prompts,
        training_counts=_training_counts(folder, num_classes),
    )
    return run, pipe


def _training_counts(folder: PipelineFolder, num_classes: int) -> list[int] | int:
    """The run's training count per class id from training_summary.json, else the number of classes."""
    counts = folder.summary.get("class_counts")
    return list(counts) if isinstance(counts, list) and len(counts) == num_classes else num_classes


def _resolve_dataset(folder: PipelineFolder, dataset: str | None, local_data: bool) -> str | None:
    """The named dataset to compare with; None for a run on its own folder or Hub data (``local_data``), which is
    then its own reference (balanced: the same number of images per class)."""
    dataset = dataset or folder.args.get("dataset")
    if dataset is None and not local_data:
        raise ConfigError(
            f"no dataset given and {str(folder.path / 'training_summary.json')!r} names none; "
            f"pass --dataset (one of {', '.join(_known_datasets())})"
        )
    return dataset


def _resolve_weights(extractor: str, weights_path: str | os.PathLike | None, cache_dir: Path) -> str | None:
    """The extractor's weights as safetensors (the digits classifier's cached file when none is given, trained on
    first use), checked by building the extractor once on the CPU: a bad file fails here, before any sampling."""
    if extractor == DIGITS_CLASSIFIER and weights_path is None:
        weights_path = digits_classifier_file(cache_dir)
    weights = safe_weights_file(extractor, weights_path, cache_dir)
    weights = None if weights is None else str(weights)
    from torch_fidelity.utils import resolve_feature_layer_for_metric

    build_feature_extractor(
        extractor, [resolve_feature_layer_for_metric("fid", feature_extractor=extractor)], weights, cache_dir, "cpu"
    )
    return weights


def _model_classes(
    pipe: Any, folder: PipelineFolder, reference: Any, spec: Any, prompt_template: str | None
) -> tuple[list[str] | None, int, list[str] | None]:
    """The model's class names and count and, for a prompted family, one prompt per class."""
    family = folder.family
    if not family.prompted:
        return family.class_names(pipe, folder.summary), family.num_classes(pipe, folder.summary), None
    class_names = family.class_names(pipe, folder.summary) or reference.class_names
    if prompt_template is None and folder.summary.get("prompts"):  # the run's class prompts, as it validated with
        return class_names, len(class_names), list(folder.summary["prompts"])
    template = prompt_template or folder.args.get("prompt_template") or spec.prompt_template
    return class_names, len(class_names), class_prompts(class_names, template)


def _align_reference_labels(
    reference_labels: Sequence[int], reference_names: list[str], class_names: list[str] | None, num_classes: int
) -> torch.Tensor:
    """Reference labels in the pipeline's class ids: by name when both name the same classes, else by id."""
    labels = torch.as_tensor(list(reference_labels))
    if num_classes != len(reference_names):
        raise ConfigError(
            f"the pipeline has {num_classes} classes but the reference data has {len(reference_names)} "
            f"({', '.join(reference_names[:5])}, ...); pass the dataset the model was trained on"
        )
    if class_names is not None and list(class_names) != list(reference_names):
        if sorted(class_names) == sorted(reference_names):
            return torch.tensor([list(class_names).index(n) for n in reference_names])[labels]
        print(
            f"capman-eval: warning: pipeline classes {list(class_names)[:5]} and dataset classes "
            f"{reference_names[:5]} differ; matching them by class id",
            file=sys.stderr,
        )
    return labels


def _generate(pipe: Any, run: _Run, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    return generate_balanced(
        pipe,
        settings.num_images_per_class,
        run.num_classes,
        prompts=run.prompts,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        seed=settings.seed,
        batch_size=settings.batch_size,
        resolution=run.resolution,
        progress=settings.progress,
    )


def _measure(run: _Run, settings: EvalSettings, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    source = {"dataset_name": run.dataset_name, "train_data_dir": run.train_data_dir, "class_names": run.class_names}
    prefix = _reference_cache_prefix(
        run.dataset, source, run.resolution, run.reference_per_class, run.extractor, run.weights
    )
    return measure_fidelity(
        images,
        labels,
        run.reference,
        run.reference_labels,
        run.num_classes,
        metrics=run.metrics,
        feature_extractor=run.extractor,
        feature_extractor_weights_path=run.weights,
        per_class_fid=settings.per_class_fid,
        cache_prefix=prefix if settings.cache else None,
        splits=run.splits,
        cache_root=run.cache_dir / "fidelity",
        batch_size=settings.batch_size,
        device=run.device,
    )


def _record(
    run: _Run,
    settings: EvalSettings,
    measured: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    output_dir: str | os.PathLike | None,
    label: str | None,
) -> dict[str, Any]:
    """The ``metrics.json`` dict (with the digits classifier's accuracy for imb-digits), written to ``output_dir``."""
    import torch_fidelity

    result: dict[str, Any] = {
        "pipeline": str(run.folder.path),
        "label": label or run.folder.path.resolve().name,
        "kind": run.folder.kind,
        "expert": settings.expert,
        "dataset": run.dataset,
        "dataset_name": run.dataset_name,
        "train_data_dir": None if run.train_data_dir is None else str(run.train_data_dir),
        "class_names": run.class_names,
        "num_classes": run.num_classes,
        "splits_classes": {k: v for k, v in run.splits.items() if v},
        "num_images_per_class": settings.num_images_per_class,
        "num_images": settings.num_images,
        "reference_images_per_class": run.reference_per_class,
        "resolution": run.resolution,
        "scheduler": settings.scheduler,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale if run.folder.family.guided else None,
        "seed": settings.seed,
        "feature_extractor": run.extractor,
        "feature_extractor_weights_path": run.weights,
        "metrics": run.metrics,
        "torch_fidelity_version": torch_fidelity.__version__,
        **measured,
    }
    result["caveats"] = small_sample_caveats(result)
    # The small classifier judges "does class c look like class c" when it is the extractor of a 10-class run (the
    # digits, or any 10 classes with its weights trained on them, e.g. the study's letters), and always for digits.
    weights = None
    if run.extractor == DIGITS_CLASSIFIER and run.num_classes == DigitsClassifier.num_classes:
        weights = run.weights
    elif run.spec is get_dataset_spec("imb-digits") and run.class_names == [str(d) for d in range(10)]:
        weights = digits_classifier_file(run.cache_dir)
    if weights is not None:
        classifier = load_digits_classifier(weights)
        result["classifier_accuracy"] = classifier_accuracy(
            classifier, images, labels, run.num_classes, splits=run.splits
        )
    if output_dir is not None:
        write_model_outputs(result, images, labels, run.training_counts, output_dir)
    return result


# Below this many images in a set, FID is dominated by its small-sample bias (it falls as the count grows, for the
# same model): such numbers compare only between runs with the same counts.
FID_MIN_IMAGES = 100


def small_sample_caveats(result: dict[str, Any]) -> list[str]:
    """One sentence per FID computed on fewer than ``FID_MIN_IMAGES`` generated or real images."""
    sets = {"overall": result.get("overall", {}), **{f"split {k}": v for k, v in result.get("splits", {}).items()}}
    caveats = []
    for name, values in sets.items():
        counts = (values.get("num_generated"), values.get("num_real"))
        if "fid" in values and None not in counts and min(counts) < FID_MIN_IMAGES:
            caveats.append(
                f"FID {name} rests on {counts[0]} generated and {counts[1]} real images (< {FID_MIN_IMAGES}): "
                "strongly biased by the sample size; compare it only with runs of the same counts"
            )
    return caveats


def _known_datasets() -> list[str]:
    return list(DATASETS)
