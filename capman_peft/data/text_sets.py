"""Fine-grained text-to-image sets read from local copies in their released layouts, with the per-image text
descriptions of Reed et al. (2016) that text-to-image work trains on (ten per image: ``text_c10/`` of their
``cvpr2016_cub`` / ``cvpr2016_flowers`` releases, or the ``text/`` folder AttnGAN's and VQ-Diffusion's copies have,
copied or linked into the dataset folder, one ``<image name>.txt`` per image at any depth):

* CUB-200-2011 (Wah et al. 2011): ``images.txt``, ``image_class_labels.txt``, ``classes.txt``,
  ``train_test_split.txt`` and ``images/``; the official train split trains, its test split is the reference.
* Oxford-102 Flowers (Nilsback & Zisserman 2008): ``jpg/``, ``imagelabels.mat`` and ``setid.mat``; the
  ``valid`` ids (10 images per class, balanced) are the reference, ``trnid`` and ``tstid`` together train.

An image's caption is its description file's lines joined by newlines: a training step conditions the image on one
of them, drawn per step (``StepDraws.caption_draw``), as text-to-image training on these sets does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError

CUB, OXFORD_102 = "cub-200-2011", "oxford-102"
TEXT_FOLDERS = ("text_c10", "text")
SPLITS = {CUB: ("train", "test"), OXFORD_102: ("train", "val")}


def load_text_set(
    layout: str, folder: Path | None, name: str | None, split: str
) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Image paths, class ids, class names and captions of a `layout` copy in `folder` (``--train_data_dir``)."""
    if folder is None or not folder.is_dir():
        where = "" if folder is None else f" ({folder} is not a folder)"
        raise ConfigError(
            f"--dataset {name}: is read from a local copy{where}; allowed: --train_data_dir DIR, the {layout} folder "
            "in its released layout with Reed et al.'s text_c10/ descriptions in it"
        )
    if split not in SPLITS[layout]:
        raise ConfigError(f"--dataset {name}: has no split {split!r}; allowed: {', '.join(SPLITS[layout])}")
    paths, labels, names = (_cub if layout == CUB else _oxford_102)(folder, split)
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise ConfigError(
            f"--train_data_dir {folder}: {len(missing)} of the {len(paths)} images of split {split!r} are missing "
            f"(first: {missing[0]}); allowed: the {layout} folder as released"
        )
    return [str(path) for path in paths], labels, names, descriptions(folder, paths)


def descriptions(folder: Path, paths: list[Path]) -> np.ndarray:
    """Per image, the lines of ``text_c10/<class>/<image name>.txt`` (or ``text/...``) joined by newlines."""
    text = next((folder / name for name in TEXT_FOLDERS if (folder / name).is_dir()), None)
    found = {file.stem: file for file in text.rglob("*.txt")} if text is not None else {}
    missing = [path.stem for path in paths if path.stem not in found]
    if missing:
        raise ConfigError(
            f"--train_data_dir {folder}: no description for {len(missing)} of the {len(paths)} images (first: "
            f"{missing[0]}); allowed: Reed et al.'s text_c10/ (or text/) folder in it, one <image name>.txt per image"
        )
    captions = []
    for path in paths:
        lines = [line.strip() for line in found[path.stem].read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ConfigError(f"{found[path.stem]}: is empty; allowed: one description per line")
        captions.append("\n".join(lines))
    return np.asarray(captions, dtype=object)


def _read_table(path: Path, columns: int) -> list[list[str]]:
    """A whitespace-separated list file of CUB's (``<id> <value>`` per line)."""
    if not path.is_file():
        raise ConfigError(f"--train_data_dir {path.parent}: has no {path.name}; allowed: the CUB_200_2011 folder")
    rows = [line.split(maxsplit=columns - 1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = next((row for row in rows if len(row) != columns or not row[0].isdigit()), None)
    if bad is not None:
        raise ConfigError(f"{path}: line {' '.join(bad)!r} is not `<id> <value>`")
    return rows


def _cub(folder: Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """CUB's list files: class names without their number (``001.Black_footed_Albatross`` -> ``Black footed
    Albatross``), ids from 1."""
    classes = _read_table(folder / "classes.txt", 2)
    names = [value.split(".", 1)[-1].replace("_", " ") for _, value in classes]
    images = dict(_read_table(folder / "images.txt", 2))
    labels = {key: int(value) - 1 for key, value in _read_table(folder / "image_class_labels.txt", 2)}
    training = {key: value == "1" for key, value in _read_table(folder / "train_test_split.txt", 2)}
    chosen = sorted((key for key in images if training.get(key) == (split == "train")), key=int)
    unlabelled = [key for key in chosen if key not in labels or not 0 <= labels[key] < len(names)]
    if unlabelled:
        raise ConfigError(f"{folder / 'image_class_labels.txt'}: image {unlabelled[0]} has no class of classes.txt")
    paths = [folder / "images" / images[key] for key in chosen]
    return paths, np.array([labels[key] for key in chosen], dtype=np.int64), names


def _oxford_102(folder: Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """Oxford-102's MATLAB label files (read as data, nothing executed), its class names as torchvision lists them."""
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102

    tables = {}
    for file in ("imagelabels.mat", "setid.mat"):
        try:
            tables[file] = loadmat(folder / file, squeeze_me=True)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"--train_data_dir {folder}: cannot read {file} ({err}); allowed: the 102flowers folder"
            ) from None
    labels = np.asarray(tables["imagelabels.mat"]["labels"], dtype=np.int64) - 1
    sets = tables["setid.mat"]
    ids = np.sort(np.concatenate([sets["trnid"], sets["tstid"]]) if split == "train" else sets["valid"]).astype(int)
    if labels.min() < 0 or labels.max() >= len(Flowers102.classes) or ids.max() > len(labels):
        raise ConfigError(f"--train_data_dir {folder}: imagelabels.mat and setid.mat do not describe Oxford-102")
    paths = [folder / "jpg" / f"image_{i:05d}.jpg" for i in ids]
    return paths, labels[ids - 1], list(Flowers102.classes)
