"""The sets a run reads, selected from a source: the long-tailed training set, the balanced reference set, and the
held-out images that the subsampling left out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from .images import ImageTransform, LabelledImageDataset, _check_resolution, _HubImages
from .longtail import _check_imbalance_ratio, long_tail_indices
from .readers import Source, load_source
from .registry import _GENERIC, DatasetSpec, get_dataset_spec


def load_imbalanced_dataset(
    name: str | None = "imb-digits",
    split: str = "train",
    imbalance_ratio: float | None = 100,
    resolution: int | None = None,
    *,
    dataset_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    class_order: Sequence[int | str] | None = None,
    seed: int = 0,
    center_crop: bool = False,
    random_flip: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    cache_dir: str | None = None,
    verify_images: bool = True,
    split_thresholds: Sequence[int] | None = None,
) -> LabelledImageDataset:
    """The long-tailed training set of a named dataset (or a Hub id / local folder).

    ``split="test"`` or ``"reference"`` returns :func:`load_reference_dataset` instead; any other split
    name (``"train"``, ``"validation"``, ...) is read from the source and subsampled.

    Args:
        name: a key of :data:`DATASETS`, or ``None`` for a source given only by ``dataset_name`` /
            ``train_data_dir`` (columns ``image``/``label``, resolution 256).
        imbalance_ratio: largest / smallest class size; ``None`` keeps the source counts.
        resolution: output side length; default: the dataset's (ArtBench 256, CIFAR 32, CelebA-HQ 64,
            digits 16).
        dataset_name: overrides the Hub id; may be a local folder of parquet files or a ``save_to_disk``
            folder.
        train_data_dir: a local folder with one sub-folder of images per class (sorted names = classes), or an image
            folder with a ``metadata.jsonl`` (diffusers' imagefolder format: ``file_name`` and the other columns).
        image_column, label_column: the columns of a Hub dataset or ``metadata.jsonl`` holding the image and the
            class (the class may be a ClassLabel, an integer or a string; strings are the class names).
        caption_column: a column of per-image captions (Hub dataset or ``metadata.jsonl``): each item then carries
            its ``caption``; the class column still decides the class.
        class_order: class ids or names in the order they become labels 0, 1, ... (0 = largest).
        seed: the legacy subsampling seed (0 reproduces CBDM's splits).
        center_crop, random_flip: as the diffusers training scripts' flags.
        verify_images: check every local-folder image header up front (``PIL.Image.verify``).
        split_thresholds: (many_above, few_below) of the Many/Medium/Few splits; default: the dataset's (thirds of
            the classes by size for most).
    """
    if split in ("test", "reference"):
        return load_reference_dataset(
            name,
            resolution,
            dataset_name=dataset_name,
            train_data_dir=train_data_dir,
            class_order=class_order,
            image_column=image_column,
            label_column=label_column,
            cache_dir=cache_dir,
            verify_images=verify_images,
        )
    spec, resolution, source, keep = _long_tail_selection(
        name, split=split, imbalance_ratio=imbalance_ratio, resolution=resolution, dataset_name=dataset_name,
        train_data_dir=train_data_dir, class_order=class_order, seed=seed, image_column=image_column,
        label_column=label_column, caption_column=caption_column, cache_dir=cache_dir, verify_images=verify_images,
    )  # fmt: skip
    return LabelledImageDataset(
        _subset(source.images, keep),
        source.labels[keep],
        source.class_names,
        ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip),
        spec.prompt_template,
        captions=None if source.captions is None else source.captions[keep].tolist(),
        split_thresholds=split_thresholds or spec.split_thresholds,
    )


def _long_tail_selection(
    name: str | None,
    *,
    split: str,
    imbalance_ratio: float | None,
    resolution: int | None,
    dataset_name: str | None,
    train_data_dir: str | os.PathLike | None,
    class_order: Sequence[int | str] | None,
    seed: int,
    image_column: str | None,
    label_column: str | None,
    cache_dir: str | None,
    verify_images: bool,
    caption_column: str | None = None,
) -> tuple[DatasetSpec, int, Source, np.ndarray]:
    """The source in the requested class order and the indices the long-tail subsampling keeps (one home for the
    training set and its held-out complement)."""
    spec = get_dataset_spec(name)
    resolution = spec.resolution if resolution is None else resolution
    _check_resolution(resolution)
    if imbalance_ratio is not None:
        _check_imbalance_ratio(imbalance_ratio)
    source = load_source(
        spec,
        name,
        split=split,
        dataset_name=dataset_name,
        train_data_dir=train_data_dir,
        image_column=image_column,
        label_column=label_column,
        caption_column=caption_column,
        cache_dir=cache_dir,
        verify_images=verify_images,
    )
    source.labels, source.class_names = _apply_class_order(source.labels, source.class_names, class_order)
    keep = long_tail_indices(source.labels, imbalance_ratio, seed=seed, class_names=source.class_names)
    return spec, resolution, source, keep


def load_reference_dataset(
    name: str | None = "imb-digits",
    resolution: int | None = None,
    images_per_class: int | None = None,
    *,
    dataset_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    class_order: Sequence[int | str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
    verify_images: bool = True,
) -> LabelledImageDataset:
    """The balanced real-image set for evaluation: no subsampling, center crop, no flip.

    The source's reference split (CIFAR / ArtBench ``test``, CelebA-HQ ``validation``); for sources
    without one (digits, local folders) the training data itself. Each class is cut to the same size,
    ``images_per_class`` or else the smallest class's count, keeping the first items in source order so
    the set is deterministic. Use the same ``class_order`` as for training so label ids agree.
    """
    spec = _GENERIC if name is None else get_dataset_spec(name)
    resolution = spec.resolution if resolution is None else resolution
    _check_resolution(resolution)
    if images_per_class is not None and images_per_class < 1:
        raise ConfigError(f"images_per_class must be >= 1 or None, got {images_per_class}")
    split = spec.reference_split or "train"
    source = load_source(
        spec,
        name,
        split=split,
        dataset_name=dataset_name,
        train_data_dir=train_data_dir,
        image_column=image_column,
        label_column=label_column,
        cache_dir=cache_dir,
        verify_images=verify_images,
    )
    images = source.images
    labels, class_names = _apply_class_order(source.labels, source.class_names, class_order)
    per_class = [np.where(labels == c)[0] for c in range(len(class_names))]
    k = min(len(i) for i in per_class) if images_per_class is None else images_per_class
    short = [class_names[c] for c, i in enumerate(per_class) if len(i) < k]
    if short:
        raise ConfigError(
            f"--reference_images_per_class {k}: classes {short} have fewer images in the reference split; allowed: "
            "at most the smallest class's count"
        )
    keep = np.sort(np.concatenate([i[:k] for i in per_class]))
    return LabelledImageDataset(
        _subset(images, keep),
        labels[keep],
        class_names,
        ImageTransform(resolution, center_crop=True, random_flip=False),
        spec.prompt_template,
    )


def load_heldout_dataset(
    name: str | None = "imb-digits",
    imbalance_ratio: float | None = 100,
    resolution: int | None = None,
    *,
    dataset_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    class_order: Sequence[int | str] | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
) -> LabelledImageDataset:
    """Real images of each class that training never saw, to measure per-class generalisation.

    The source's reference split where it has one (it is disjoint from training); otherwise (digits, local
    folders) the source images that the long-tail subsampling of :func:`load_imbalanced_dataset` left out, with
    the same ``imbalance_ratio``, ``seed`` and ``class_order``. A class may have none (digits at IR 100 keep
    all of class 0): its entries are missing, and callers report NaN for it.
    """
    spec = get_dataset_spec(name)
    if spec.reference_split is not None and (train_data_dir is None or spec.local_copy):
        return load_reference_dataset(
            name, resolution, dataset_name=dataset_name, train_data_dir=train_data_dir, class_order=class_order,
            image_column=image_column, label_column=label_column, cache_dir=cache_dir,
        )  # fmt: skip
    if imbalance_ratio is None:
        raise ConfigError("no held-out images: the training set keeps every source image (imbalance_ratio None)")
    spec, resolution, source, kept = _long_tail_selection(
        name, split="train", imbalance_ratio=imbalance_ratio, resolution=resolution, dataset_name=dataset_name,
        train_data_dir=train_data_dir, class_order=class_order, seed=seed, image_column=image_column,
        label_column=label_column, cache_dir=cache_dir, verify_images=False,
    )  # fmt: skip
    heldout = np.setdiff1d(np.arange(len(source.labels)), kept)
    return LabelledImageDataset(
        _subset(source.images, heldout),
        source.labels[heldout],
        source.class_names,
        ImageTransform(resolution, center_crop=True, random_flip=False),
        spec.prompt_template,
    )


def _subset(images: Any, keep: np.ndarray) -> Any:
    if isinstance(images, _HubImages):
        return _HubImages(images.hf_dataset, images.image_column, images.rows[keep], images.source)
    return [images[int(i)] for i in keep]


def _apply_class_order(
    labels: np.ndarray, class_names: list[str], class_order: Sequence[int | str] | None
) -> tuple[np.ndarray, list[str]]:
    """Relabel so that ``class_order[k]`` becomes label k (names follow)."""
    if class_order is None:
        return labels, class_names
    ids = []
    for c in class_order:
        if isinstance(c, str) and c in class_names:
            ids.append(class_names.index(c))
        elif isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.isdigit()):
            if not 0 <= int(c) < len(class_names):
                raise ConfigError(f"class id {c} in class_order is out of range 0..{len(class_names) - 1}")
            ids.append(int(c))
        else:
            raise ConfigError(f"unknown class {c!r} in class_order; known classes: {class_names}")
    if sorted(ids) != list(range(len(class_names))):
        raise ConfigError(
            f"class_order must name every class exactly once, got {list(class_order)}; known classes: {class_names}"
        )
    new_label = np.empty(len(ids), dtype=np.int64)
    new_label[ids] = np.arange(len(ids))
    return new_label[labels], [class_names[i] for i in ids]
