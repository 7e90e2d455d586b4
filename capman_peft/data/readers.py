"""Reading a source in its format (a Hub dataset or a local copy of one, an image folder with ``metadata.jsonl``, a
class-folder tree, official list files, a text-to-image set with its descriptions, scikit-learn's digits) into
images, class ids and names in the registry's class order."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .images import IMAGE_EXTENSIONS, _HubImages
from .registry import DATASETS, DatasetSpec
from .text_sets import load_text_set

logger = logging.getLogger("capman_peft")


@dataclass
class Source:
    """A source's images, class id per image, class names, and per-image captions where it has them."""

    images: Any
    labels: np.ndarray
    class_names: list[str]
    captions: np.ndarray | None = None


def load_source(
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
) -> Source:
    """The source in its canonical class order (captions only where `caption_column` names them)."""
    columns = dict(
        image_column=image_column or spec.image_column,
        label_column=label_column or spec.label_column,
        caption_column=caption_column,
        spec=spec,
    )
    folder = None if train_data_dir is None else Path(train_data_dir)
    if spec.text_layout:
        source = Source(*load_text_set(spec.text_layout, folder, name, split))
    elif spec.list_files:
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
        source = Source(*_load_class_folders(folder, verify_images))
    elif dataset_name is not None or spec.hub_id is not None:
        where = dataset_name or spec.hub_id
        flag = "--dataset_name" if where != spec.hub_id else "--dataset"
        source = _read_columns(_load_hub(where, split, flag=flag, cache_dir=cache_dir), f"{flag} {where}", **columns)
    elif spec is DATASETS["imb-digits"]:
        source = Source(*_load_digits())
    else:
        raise ConfigError(f"dataset {name!r} needs dataset_name (a Hub id or local path) or train_data_dir")
    labels, names = _canonical_order(source.labels, source.class_names, spec)
    renames = dict(spec.renames)
    names = [renames.get(n, n) for n in names]
    empty = [n for n, count in zip(names, np.bincount(labels, minlength=len(names)), strict=True) if count == 0]
    if empty:
        raise ConfigError(f"classes {empty} have no images in split {split!r}; every class needs at least one")
    return Source(source.images, labels, names, source.captions)


def _load_listed(folder: Path, spec: DatasetSpec, name: str | None, split: str) -> Source:
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
    return Source(images, new_id[ids], [names[c] for c in ranking])


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
) -> Source:
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
    return Source(_HubImages(hf, image_column, np.arange(len(hf)), source), labels, names, captions)


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
        if files and (nested or others):
            logger.warning(
                "--train_data_dir: class %r: %d images in sub-folders and %d other files are not used (a class is "
                "the images directly in its folder)",
                name,
                nested,
                others,
            )
        if not files:
            unused = f" ({nested} in sub-folders are not used: a class is the images directly in its folder)"
            raise ConfigError(
                f"--train_data_dir {root / name}: class {name!r} has no images directly in its folder"
                f"{unused if nested else ''}; allowed extensions: {', '.join(IMAGE_EXTENSIONS)}"
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
