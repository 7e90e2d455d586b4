"""Named datasets and the sources they are read from (a Hub dataset or a local copy in its format, a class-folder
tree, scikit-learn's digits), turned into the long-tailed training set or the balanced reference set."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .images import IMAGE_EXTENSIONS, LabelledImageDataset, _check_resolution, _HubImages, image_transform
from .longtail import _check_imbalance_ratio, long_tail_indices

logger = logging.getLogger("capman_peft")

_ARTBENCH_STYLES = """art_nouveau baroque expressionism impressionism post_impressionism realism renaissance
romanticism surrealism ukiyo_e""".split()
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Order and spelling of the uoft-cs/cifar100 ClassLabel, including its "cra" typo for "crab" (fixed by
# DatasetSpec.renames so prompts and reports say "crab").
_CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach
couch cra crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives and how to read it."""

    hub_id: str | None
    image_column: str = "image"
    label_column: str = "label"
    class_names: tuple[str, ...] = ()
    """Canonical class order (index 0 = largest after subsampling); also the fallback when the label
    column carries no names. Sources whose names match as a set are remapped to this order by name."""
    order_by_name: bool = False
    """Refuse a source whose class names differ from ``class_names`` (the remap is the point)."""
    resolution: int = 32
    reference_split: str | None = "test"
    """Balanced split to measure FID against; ``None``: a balanced subset of the training data."""
    prompt_template: str = "a {}"
    renames: tuple[tuple[str, str], ...] = ()
    split_thresholds: tuple[int, int] | None = None
    """(many_above, few_below) image counts of the Many/Medium/Few splits; None: thirds of the classes by size."""
    list_files: tuple[tuple[str, str], ...] = ()
    """(split, file): a dataset read from a local copy (``--train_data_dir``) and its official list files, which are
    already long-tailed; classes are ordered by their training count (ties by the list's id), class 0 largest."""


DATASETS: dict[str, DatasetSpec] = {
    # The zguo0525/ArtBench mirror numbers its styles in a shuffled order (0 = expressionism,
    # 8 = baroque); the paper's class order is the alphabetical one of the official release.
    "imb-artbench10": DatasetSpec(
        "zguo0525/ArtBench",
        "image",
        "label",
        tuple(_ARTBENCH_STYLES),
        order_by_name=True,
        resolution=256,
        prompt_template="a {} painting",
    ),
    "imb-cifar10": DatasetSpec(
        "uoft-cs/cifar10", "img", "label", tuple(_CIFAR10_CLASSES), prompt_template="a photo of a {}"
    ),
    "imb-cifar100": DatasetSpec(
        "uoft-cs/cifar100",
        "img",
        "fine_label",
        tuple(_CIFAR100_CLASSES),
        prompt_template="a photo of a {}",
        renames=(("cra", "crab"),),
    ),
    # 28k train / 2k validation, no test split; female (0) is the majority class as in the paper.
    "imb-celebahq": DatasetSpec(
        "mattymchen/celeba-hq",
        "image",
        "label",
        ("female", "male"),
        resolution=64,
        reference_split="validation",
        prompt_template="a photo of a {} face",
    ),
    # Liu et al. 2019 (OLTR): the ImageNet-LT lists over a local ImageNet copy, "train/n01440764/x.JPEG 0" per line;
    # 1,000 classes, 1,280 ... 5 training images (IR 256), 20 per class in the validation list; splits > 100 / 20-100 /
    # < 20 images as Liu et al. define them. Class names are the WordNet ids of the image folders.
    "imb-imagenet-lt": DatasetSpec(
        None,
        resolution=32,
        reference_split="val",
        prompt_template="a photo of a {}",
        split_thresholds=(100, 20),
        list_files=(("train", "ImageNet_LT_train.txt"), ("val", "ImageNet_LT_val.txt")),
    ),
    # iNaturalist 2018 (Van Horn et al. 2018): the official COCO-style train2018.json / val2018.json over the
    # extracted images; 8,142 classes, 1,000 ... 2 training images (IR 500), 3 per class in validation; the same
    # > 100 / 20-100 / < 20 splits as ImageNet-LT in the long-tail literature (Kang et al. 2020).
    "imb-inaturalist": DatasetSpec(
        None,
        resolution=32,
        reference_split="val",
        prompt_template="a photo of {}",
        split_thresholds=(100, 20),
        list_files=(("train", "train2018.json"), ("val", "val2018.json")),
    ),
    # scikit-learn's bundled 8x8 digits: the offline CPU demo.
    "imb-digits": DatasetSpec(
        None,
        class_names=tuple(str(d) for d in range(10)),
        resolution=16,
        reference_split=None,
        prompt_template="a handwritten digit {}",
    ),
}

_GENERIC = DatasetSpec(None, resolution=256, reference_split=None, prompt_template="a {} painting")


def get_dataset_spec(name: str | None) -> DatasetSpec:
    """Registry entry for ``name`` (``"imb-cifar10"``; the ``imb-`` prefix may be left out); None: the generic
    entry of data named only by a folder or Hub id."""
    if name is None:
        return _GENERIC
    key = name.lower()
    key = key if key in DATASETS else f"imb-{key}"
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[key]


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
        image_transform(resolution, center_crop=center_crop, random_flip=random_flip),
        spec.prompt_template,
        captions=None if source.captions is None else source.captions[keep].tolist(),
        split_thresholds=split_thresholds or spec.split_thresholds,
    )


@dataclass
class _Source:
    """A source's images, class id per image, class names, and per-image captions where it has them."""

    images: Any
    labels: np.ndarray
    class_names: list[str]
    captions: np.ndarray | None = None


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
) -> tuple[DatasetSpec, int, _Source, np.ndarray]:
    """The source in the requested class order and the indices the long-tail subsampling keeps (one home for the
    training set and its held-out complement)."""
    spec = get_dataset_spec(name)
    resolution = spec.resolution if resolution is None else resolution
    _check_resolution(resolution)
    if imbalance_ratio is not None:
        _check_imbalance_ratio(imbalance_ratio)
    source = _load_source(
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
    source = _load_source(
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
        image_transform(resolution, center_crop=True, random_flip=False),
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
    if spec.reference_split is not None and (train_data_dir is None or spec.list_files):
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
        image_transform(resolution, center_crop=True, random_flip=False),
        spec.prompt_template,
    )


def _subset(images: Any, keep: np.ndarray) -> Any:
    if isinstance(images, _HubImages):
        return _HubImages(images.hf_dataset, images.image_column, images.rows[keep], images.source)
    return [images[int(i)] for i in keep]


def _load_source(
    spec: DatasetSpec,
    name: str | None,
    *,
    split: str,
    dataset_name: str | None,
    train_data_dir: str | os.PathLike | None,
    image_column: str | None,
    label_column: str | None,
    cache_dir: str | None,
    verify_images: bool,
    caption_column: str | None = None,
) -> _Source:
    """The source in its canonical class order (captions only where `caption_column` names them)."""
    columns = dict(
        image_column=image_column or spec.image_column,
        label_column=label_column or spec.label_column,
        caption_column=caption_column,
        spec=spec,
    )
    folder = None if train_data_dir is None else Path(train_data_dir)
    if spec.list_files:
        if folder is None:
            files = " and ".join(file for _, file in spec.list_files)
            raise ConfigError(
                f"--dataset {name}: is read from a local copy; allowed: --train_data_dir DIR, the folder with {files} "
                "and the images they list"
            )
        source = _load_listed(folder, spec, name, split)
    elif folder is not None and (folder / METADATA_FILE).is_file():
        source = _read_columns(_load_imagefolder(folder, cache_dir), f"--train_data_dir {folder}", **columns)
    elif folder is not None:
        if caption_column is not None:
            raise ConfigError(
                f"--caption_column {caption_column}: --train_data_dir {folder} is a folder of class folders, which has "
                f"no captions; allowed: an image folder with a {METADATA_FILE} holding that column, or a Hub dataset"
            )
        source = _Source(*_load_class_folders(folder, verify_images))
    elif dataset_name is not None or spec.hub_id is not None:
        where = dataset_name or spec.hub_id
        flag = "--dataset_name" if where != spec.hub_id else "--dataset"
        source = _read_columns(_load_hub(where, split, flag=flag, cache_dir=cache_dir), f"{flag} {where}", **columns)
    elif spec is DATASETS["imb-digits"]:
        source = _Source(*_load_digits())
    else:
        raise ConfigError(f"dataset {name!r} needs dataset_name (a Hub id or local path) or train_data_dir")
    labels, names = _canonical_order(source.labels, source.class_names, spec)
    renames = dict(spec.renames)
    names = [renames.get(n, n) for n in names]
    empty = [n for n, count in zip(names, np.bincount(labels, minlength=len(names)), strict=True) if count == 0]
    if empty:
        raise ConfigError(f"classes {empty} have no images in split {split!r}; every class needs at least one")
    return _Source(source.images, labels, names, source.captions)


def _load_listed(folder: Path, spec: DatasetSpec, name: str | None, split: str) -> _Source:
    """The images a list file of `spec` names under `folder`, with class ids ranked by the training list's counts."""
    files = dict(spec.list_files)
    if split not in files:
        raise ConfigError(f"--dataset {name}: has no split {split!r}; allowed: {', '.join(files)}")
    train_paths, train_ids, names = _read_list(folder / files["train"])
    paths, ids, _ = (train_paths, train_ids, names) if split == "train" else _read_list(folder / files[split])
    counts = np.bincount(train_ids, minlength=len(names))
    ranking = sorted(range(len(names)), key=lambda c: (-counts[c], c))
    if counts[ranking[-1]] == 0:
        raise ConfigError(f"{folder / files['train']}: class {names[ranking[-1]]!r} has no training images")
    new_id = np.empty(len(names), dtype=np.int64)
    new_id[ranking] = np.arange(len(names))
    if ids.max(initial=-1) >= len(names):
        raise ConfigError(f"{folder / files[split]}: class id {int(ids.max())} is not in the training list")
    images = [str(folder / path) for path in paths]
    missing = [path for path in images if not os.path.isfile(path)]
    if missing:
        raise ConfigError(
            f"--train_data_dir {folder}: {len(missing)} of the {len(images)} images {files[split]} lists are missing "
            f"(first: {missing[0]}); allowed: the folder the list's paths are relative to"
        )
    return _Source(images, new_id[ids], [names[c] for c in ranking])


def _read_list(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """An official list file: a text file of ``relative/path.jpg class_id`` lines (ImageNet-LT; a class is named by
    its image folder), or a COCO-style JSON with ``images``, ``annotations`` and ``categories`` (iNaturalist).
    Returns the paths, the class id per path and the name per class id."""
    if not path.is_file():
        raise ConfigError(f"--train_data_dir {path.parent}: has no {path.name}; allowed: the folder with the lists")
    if path.suffix == ".json":
        try:
            listing = json.loads(path.read_text())
            by_image = {a["image_id"]: int(a["category_id"]) for a in listing["annotations"]}
            paths = [image["file_name"] for image in listing["images"]]
            ids = np.array([by_image[image["id"]] for image in listing["images"]], dtype=np.int64)
            named = {int(c["id"]): str(c.get("name", c["id"])) for c in listing.get("categories", [])}
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not a COCO-style list ({type(err).__name__}: {err})") from None
        num_classes = max(int(ids.max(initial=-1)) + 1, max(named, default=-1) + 1)
        return paths, ids, [named.get(c, str(c)) for c in range(num_classes)]
    paths, ids = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise ConfigError(f"{path}, line {number}: {line!r} is not `relative/path.jpg class_id`")
        paths.append(parts[0])
        ids.append(int(parts[1]))
    ids_array = np.array(ids, dtype=np.int64)
    names = [""] * (int(ids_array.max(initial=-1)) + 1)
    for rel, c in zip(paths, ids, strict=True):
        names[c] = names[c] or Path(rel).parent.name or str(c)
    return paths, ids_array, [n or str(c) for c, n in enumerate(names)]


def _canonical_order(labels: np.ndarray, names: list[str], spec: DatasetSpec) -> tuple[np.ndarray, list[str]]:
    """Remap ids by name onto the registry's class order when the source names the same classes."""
    canonical = list(spec.class_names)
    if not canonical or names == canonical:
        return labels, names
    if sorted(names) == sorted(canonical):
        new_id = np.array([canonical.index(n) for n in names], dtype=np.int64)
        return new_id[labels], canonical
    if spec.order_by_name:
        unknown = sorted(set(names) - set(canonical))
        raise ConfigError(f"unexpected class names {unknown} in the source; expected exactly {canonical}")
    return labels, names


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


# diffusers' imagefolder format: images with one JSON object per line naming its ``file_name`` and other columns.
METADATA_FILE = "metadata.jsonl"


def _load_hub(source: str, split: str, *, flag: str, cache_dir: str | None) -> Any:
    """A Hub dataset's split (or a local copy in Hub format: parquet files or a ``save_to_disk`` folder)."""
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        # save_to_disk output: load_dataset refuses a single saved Dataset, load_from_disk reads both.
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"split {split!r} not in {source}; available splits: {list(loaded)}")
            loaded = loaded[split]
        return loaded
    from ..hub import hub_source

    try:
        return datasets.load_dataset(hub_source(source, flag, "dataset", cache_dir), split=split, cache_dir=cache_dir)
    except ValueError as err:
        if "split" not in str(err).lower():
            raise
        # e.g. the balanced reference split ("test") of a copy that holds only "train": datasets' own words name them
        raise ConfigError(f"{flag} {source}: has no split {split!r} ({err}); allowed: a copy with that split") from err


def _load_imagefolder(folder: Path, cache_dir: str | None) -> Any:
    """An image folder with a ``metadata.jsonl``, read by datasets' imagefolder builder (local files only)."""
    import datasets

    try:
        return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=cache_dir)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        raise ConfigError(f"--train_data_dir {folder}: cannot read {METADATA_FILE} and its images: {err}") from err


def _read_columns(
    hf: Any, source: str, *, image_column: str, label_column: str, caption_column: str | None, spec: DatasetSpec
) -> _Source:
    """Labels (and captions) read eagerly from the columns of a datasets table, images left for later."""
    import datasets

    flags = {image_column: "--image_column", label_column: "--class_column", caption_column: "--caption_column"}
    for column in (image_column, label_column, caption_column):
        if column is not None and column not in hf.column_names:
            raise ConfigError(
                f"{flags[column]} {column}: not a column of {source}; available columns: {hf.column_names}"
            )
    feature = hf.features[label_column]
    raw = np.asarray(hf[label_column])
    if isinstance(feature, datasets.ClassLabel):
        labels, names = raw.astype(np.int64), list(feature.names)
    elif raw.dtype.kind in "US":  # string labels: the names are the values
        names = list(spec.class_names) if set(raw) <= set(spec.class_names) else sorted(set(raw.tolist()))
        labels = np.array([names.index(v) for v in raw], dtype=np.int64)
    else:
        # Parquet written without the datasets schema metadata loses the ClassLabel names; fall back to
        # the registry's names, which are the mirror's own order.
        labels = raw.astype(np.int64)
        num = int(labels.max()) + 1 if len(labels) else 0
        names = list(spec.class_names) if num <= len(spec.class_names) else [str(i) for i in range(num)]
    captions = None
    if caption_column is not None:
        captions = np.asarray(hf[caption_column], dtype=object)
        bad = [i for i, caption in enumerate(captions) if not isinstance(caption, str)]
        if bad:
            raise ConfigError(
                f"--caption_column {caption_column}: row {bad[0]} of {source} has {captions[bad[0]]!r}; allowed: a "
                "text caption in every row"
            )
    return _Source(_HubImages(hf, image_column, np.arange(len(hf)), source), labels, names, captions)


def _load_class_folders(root: Path, verify_images: bool) -> tuple[list[Path], np.ndarray, list[str]]:
    """A folder with one sub-folder per class; images are read with PIL, never via the Hub."""
    if not root.is_dir():
        raise ConfigError(
            f"--train_data_dir {root}: does not exist or is not a folder; allowed: a folder of class folders"
        )
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ConfigError(
            f"--train_data_dir {root}: has no class sub-folders; allowed: a folder with one sub-folder per class"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        entries = [p for p in (root / name).iterdir() if not p.name.startswith(".")]
        files = sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        nested = sum(1 for d in entries if d.is_dir() for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        others = sum(1 for p in entries if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS)
        if nested or others:
            logger.warning(
                "--train_data_dir: class %r: %d images in sub-folders and %d other files are not used (a class is "
                "the images directly in its folder)",
                name,
                nested,
                others,
            )
        if not files:
            raise ConfigError(
                f"--train_data_dir {root / name}: class {name!r} has no images; allowed extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )
        paths += files
        labels += [label] * len(files)
    if verify_images:  # decoded in full: a truncated file passes a header check and fails mid-training
        from tqdm.auto import tqdm

        for p in tqdm(paths, desc="Checking images", unit="image", disable=len(paths) < 1000):
            try:
                with Image.open(p) as image:
                    image.load()
            except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, ...)
                raise ConfigError(f"{p}: corrupt image ({err}); allowed: an image PIL can read") from None
    return paths, np.asarray(labels, dtype=np.int64), names


def _load_digits() -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """scikit-learn's 1,797 8x8 digits (bundled with the wheel: no network), 0..16 grey -> RGB uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [Image.fromarray(p, "L").convert("RGB") for p in pixels]
    return images, digits.target.astype(np.int64), [str(d) for d in range(10)]
