"""Class-imbalanced image data: long-tail subsampling, named datasets, class splits, balanced sampling.

Everything a training or evaluation script needs to turn a balanced source (a Hub dataset, a local
class-folder tree, or scikit-learn's digits) into the long-tailed training set of Cao et al. 2019 /
CBDM, plus the balanced reference set that FID is measured against.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Long-tail subsampling (Cao et al. 2019; CBDM, Qin et al. 2023)
# ----------------------------------------------------------------------------------------------------------


def long_tail_counts(n_max: int = 5000, num_classes: int = 10, imbalance_ratio: float = 100) -> list[int]:
    """Images kept per class: ``n_c = int(n_max * IR ** (-c / (C - 1)))``, class 0 largest.

    CIFAR-10 at IR 100 gives [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50].
    """
    _check_imbalance_ratio(imbalance_ratio)
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * imbalance_ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(
    labels: Sequence[int] | np.ndarray,
    imbalance_ratio: float | None = 100,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Indices of the long-tailed subset, exactly as the legacy CBDM / LDAM data code selects them.

    The legacy procedure is ``np.random.seed(seed)`` once, then for each class in ascending order
    ``np.random.shuffle`` that class's indices and keep the first ``n_c``. We replay it call for call so
    published splits are reproduced, and restore the global numpy RNG state afterwards.

    Args:
        labels: class id per item.
        imbalance_ratio: ``n_0 / n_{C-1}``; ``None`` keeps every item in its original order.
        class_order: class ids in the order they become index 0, 1, ... (``class_order[0]`` is the
            largest class). Default: ascending ids. The returned indices follow this order.
        num_classes: number of classes; default ``len(class_order)`` or ``max(labels) + 1``.
        class_names: only used to name a class in error messages.

    Returns:
        Indices into ``labels``, grouped by class in the order above. ``n_max`` is the size of the first
        class; a class with fewer than ``n_c`` items keeps all it has (as the legacy slicing does).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if imbalance_ratio is None:
        return np.arange(len(labels), dtype=np.int64)
    _check_imbalance_ratio(imbalance_ratio)
    if len(labels) == 0:
        raise ValueError("labels is empty; nothing to subsample")
    if num_classes is None:
        num_classes = len(class_order) if class_order is not None else int(labels.max()) + 1
    order = list(range(num_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class_order must be a permutation of 0..{num_classes - 1}, got {list(class_order)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")

    def name(c: int) -> str:
        return f"{c} ({class_names[c]!r})" if class_names is not None else str(c)

    per_class = [np.where(labels == c)[0] for c in order]
    for c, idx in zip(order, per_class, strict=True):
        if len(idx) == 0:
            raise ConfigError(f"class {name(c)} has no images; every class needs at least one")
    counts = long_tail_counts(len(per_class[0]), num_classes, imbalance_ratio)
    emptied = [name(c) for c, n in zip(order, counts, strict=True) if n < 1]
    if emptied:
        raise ConfigError(
            f"class {', '.join(emptied)} would be left with zero images at imbalance_ratio={imbalance_ratio} "
            f"(largest class has {len(per_class[0])}); use a smaller imbalance_ratio"
        )

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        kept = []
        for idx, n in zip(per_class, counts, strict=True):
            np.random.shuffle(idx)
            kept.append(idx[:n])
    finally:
        np.random.set_state(state)
    return np.concatenate(kept).astype(np.int64)


def _check_imbalance_ratio(imbalance_ratio: float) -> None:
    if not (isinstance(imbalance_ratio, numbers.Real) and math.isfinite(imbalance_ratio) and imbalance_ratio >= 1):
        raise ConfigError(
            f"imbalance_ratio must be a finite number >= 1 (None: no subsampling), got {imbalance_ratio!r}"
        )


def class_splits(num_classes: int) -> dict[str, list[int]]:
    """Many / Medium / Few as class-index thirds (paper sec. 4.1; Jiang et al. 2021).

    Class 0 is the largest class, so the first third is "many". The remainder of the division goes to
    "few": 10 classes give 0-2 / 3-5 / 6-9, 100 classes give 0-32 / 33-65 / 66-99.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    third = num_classes // 3
    return {
        "many": list(range(0, third)),
        "medium": list(range(third, 2 * third)),
        "few": list(range(2 * third, num_classes)),
    }


def class_balanced_sampler(
    labels: Sequence[int] | np.ndarray,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.utils.data.WeightedRandomSampler:
    """The paper's RS baseline: draw items with weight ``1 / N_c`` so every class comes up at rate 1/C.

    Sampling is with replacement, ``num_samples`` defaults to ``len(labels)`` (one "epoch").
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("labels is empty; cannot build a class-balanced sampler")
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(
        weights,
        num_samples=len(labels) if num_samples is None else num_samples,
        replacement=True,
        generator=generator,
    )


# ----------------------------------------------------------------------------------------------------------
# Class names and prompts
# ----------------------------------------------------------------------------------------------------------


def readable_class_name(name: str) -> str:
    """``post_impressionism`` -> ``post impressionism``, ``ukiyo_e`` -> ``ukiyo-e`` (prompts, plots)."""
    return name.replace("_", " ").replace("ukiyo e", "ukiyo-e")


def class_prompts(class_names: Sequence[str], template: str = "a {} painting") -> list[str]:
    """One text prompt per class, e.g. ``"a renaissance painting"`` (the paper's ArtBench prompt).

    An article "a" right before the class name becomes "an" before a vowel: "a photo of an airplane".
    """
    prompts = []
    for name in class_names:
        readable = readable_class_name(name)
        article = "an" if readable[:1].lower() in "aeiou" else "a"
        prompts.append(re.sub(r"\ba \{\}", f"{article} {{}}", template).format(readable))
    return prompts


# ----------------------------------------------------------------------------------------------------------
# Images and transforms
# ----------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited onto white, 16-bit images are scaled.

    Why not just ``convert("RGB")``: that drops alpha, so transparent pixels keep whatever colour they
    happen to store (often black), and it clips 16-bit grey at 255 (measured: a 0..60000 ramp turns
    into 0 then all-255).
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        image = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def image_transform(
    resolution: int, center_crop: bool = False, random_flip: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """The diffusers training-script transform: resize shorter side (bilinear), crop, flip, to [-1, 1]."""
    from torchvision import transforms

    _check_resolution(resolution)
    steps = [
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]
    if random_flip:  # no identity Lambda otherwise: lambdas do not pickle into spawned DataLoader workers
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, numbers.Integral) or resolution < 1:
        raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}")


class _HubImages:
    """Lazy view of one image column of a Hub dataset: rows are decoded only when an item is read."""

    def __init__(self, hf_dataset: Any, image_column: str, rows: np.ndarray, source: str):
        self.hf_dataset = hf_dataset.select_columns([image_column])
        self.image_column = image_column
        self.rows = rows
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Image.Image:
        value = self.hf_dataset[int(self.rows[i])][self.image_column]
        if isinstance(value, Image.Image):
            return value
        # Parquet written without the datasets metadata leaves the column as a raw {bytes, path} struct.
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            return Image.open(io.BytesIO(value))
        return Image.open(value)

    def describe(self, i: int) -> str:
        return f"row {int(self.rows[i])} of {self.source}"


class ImbalancedImageDataset(torch.utils.data.Dataset):
    """Labelled images with their class names and counts; items are decoded and transformed lazily.

    Items are ``{"pixel_values": FloatTensor[3, H, W] in [-1, 1], "label": int, "class_name": str}``.

    Args:
        images: per item a PIL image, a file path, or any indexable returning those (read in ``__getitem__``).
        labels: class id per item, ``0`` the largest class.
        class_names: name per class id.
        transform: PIL image -> tensor; see :func:`image_transform`.
        prompt_template: the dataset's class prompt template (``class_prompts``).
    """

    def __init__(
        self,
        images: Sequence[Any],
        labels: Sequence[int],
        class_names: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        prompt_template: str = "a {} painting",
    ):
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = [int(y) for y in labels]
        self.class_names = list(class_names)
        self.transform = transform
        self.prompt_template = prompt_template
        self.class_counts = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=self.num_classes).tolist()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = self.labels[i]
        return {
            "pixel_values": self.transform(self.load_image(i)),
            "label": label,
            "class_name": self.class_names[label],
        }

    def load_image(self, i: int) -> Image.Image:
        """The RGB image of item ``i``; a file that cannot be decoded raises ValueError naming it."""
        try:
            image = self.images[i]
            if isinstance(image, (str, os.PathLike)):
                with Image.open(image) as opened:
                    opened.load()
                    rgb = to_rgb(opened)
                    # Closing an image frees its pixels, so an RGB file must be copied out first.
                    return rgb.copy() if rgb is opened else rgb
            image.load()
            return to_rgb(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise ConfigError(f"cannot read image {self._describe(i)}: {err}") from err

    def _describe(self, i: int) -> str:
        if isinstance(self.images, _HubImages):
            return self.images.describe(i)
        item = self.images[i]
        return repr(str(item)) if isinstance(item, (str, os.PathLike)) else f"item {i}"



# ----------------------------------------------------------------------------------------------------------
# Named datasets
# ----------------------------------------------------------------------------------------------------------

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


def get_dataset_spec(name: str) -> DatasetSpec:
    """Registry entry for ``name`` (``"imb-cifar10"``; the ``imb-`` prefix may be left out)."""
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
    cache_dir: str | None = None,
    verify_images: bool = True,
) -> ImbalancedImageDataset:
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
        train_data_dir: a local folder with one sub-folder of images per class (sorted names = classes).
        class_order: class ids or names in the order they become labels 0, 1, ... (0 = largest).
        seed: the legacy subsampling seed (0 reproduces CBDM's splits).
        center_crop, random_flip: as the diffusers training scripts' flags.
        verify_images: check every local-folder image header up front (``PIL.Image.verify``).
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
    spec = _GENERIC if name is None else get_dataset_spec(name)
    resolution = spec.resolution if resolution is None else resolution
    _check_resolution(resolution)
    if imbalance_ratio is not None:
        _check_imbalance_ratio(imbalance_ratio)
    images, labels, class_names = _load_source(
        spec, name, split, dataset_name, train_data_dir, image_column, label_column, cache_dir, verify_images
    )
    labels, class_names = _apply_class_order(labels, class_names, class_order)
    keep = long_tail_indices(labels, imbalance_ratio, seed=seed, class_names=class_names)
    return ImbalancedImageDataset(
        _subset(images, keep),
        labels[keep],
        class_names,
        image_transform(resolution, center_crop=center_crop, random_flip=random_flip),
        spec.prompt_template,
    )


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
) -> ImbalancedImageDataset:
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
    images, labels, class_names = _load_source(
        spec, name, split, dataset_name, train_data_dir, image_column, label_column, cache_dir, verify_images
    )
    labels, class_names = _apply_class_order(labels, class_names, class_order)
    per_class = [np.where(labels == c)[0] for c in range(len(class_names))]
    k = min(len(i) for i in per_class) if images_per_class is None else images_per_class
    short = [class_names[c] for c, i in enumerate(per_class) if len(i) < k]
    if short:
        raise ConfigError(f"images_per_class={k} but classes {short} have fewer images in the reference split")
    keep = np.sort(np.concatenate([i[:k] for i in per_class]))
    return ImbalancedImageDataset(
        _subset(images, keep),
        labels[keep],
        class_names,
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
    split: str,
    dataset_name: str | None,
    train_data_dir: str | os.PathLike | None,
    image_column: str | None,
    label_column: str | None,
    cache_dir: str | None,
    verify_images: bool,
) -> tuple[Any, np.ndarray, list[str]]:
    """Images, labels and class names of the source in its canonical class order."""
    if train_data_dir is not None:
        images, labels, names = _load_class_folders(Path(train_data_dir), verify_images)
    elif dataset_name is not None or spec.hub_id is not None:
        source = dataset_name or spec.hub_id
        images, labels, names = _load_hub(
            source,
            split,
            image_column or spec.image_column,
            label_column or spec.label_column,
            spec,
            cache_dir,
        )
    elif spec is DATASETS["imb-digits"]:
        images, labels, names = _load_digits()
    else:
        raise ConfigError(f"dataset {name!r} needs dataset_name (a Hub id or local path) or train_data_dir")
    labels, names = _canonical_order(labels, names, spec)
    renames = dict(spec.renames)
    names = [renames.get(n, n) for n in names]
    empty = [n for n, count in zip(names, np.bincount(labels, minlength=len(names)), strict=True) if count == 0]
    if empty:
        raise ConfigError(f"classes {empty} have no images in split {split!r}; every class needs at least one")
    return images, labels, names


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


def _load_hub(
    source: str, split: str, image_column: str, label_column: str, spec: DatasetSpec, cache_dir: str | None
) -> tuple[_HubImages, np.ndarray, list[str]]:
    """A Hub dataset (or a local copy in Hub format): labels read eagerly, images left for later."""
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        # save_to_disk output: load_dataset refuses a single saved Dataset, load_from_disk reads both.
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"split {split!r} not in {source}; available splits: {list(loaded)}")
            loaded = loaded[split]
        hf = loaded
    else:
        from .hub import hub_source

        where = hub_source(source, "--dataset_name" if source != spec.hub_id else "--dataset", "dataset", cache_dir)
        hf = datasets.load_dataset(where, split=split, cache_dir=cache_dir)
    for column in (image_column, label_column):
        if column not in hf.column_names:
            raise ConfigError(f"column {column!r} not in {source}; available columns: {hf.column_names}")
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
    return _HubImages(hf, image_column, np.arange(len(hf)), source), labels, names


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
        files = sorted(
            p
            for p in (root / name).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ConfigError(
                f"--train_data_dir {root / name}: class {name!r} has no images; allowed extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )
        paths += files
        labels += [label] * len(files)
    if verify_images:
        for p in paths:
            try:
                with Image.open(p) as image:
                    image.verify()
            except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, ...)
                raise ConfigError(f"{p}: corrupt image ({err}); allowed: an image PIL can read") from err
    return paths, np.asarray(labels, dtype=np.int64), names


def _load_digits() -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """scikit-learn's 1,797 8x8 digits (bundled with the wheel: no network), 0..16 grey -> RGB uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [Image.fromarray(p, "L").convert("RGB") for p in pixels]
    return images, digits.target.astype(np.int64), [str(d) for d in range(10)]
