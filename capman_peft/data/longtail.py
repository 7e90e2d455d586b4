"""Long-tail subsampling exactly as Cao et al. 2019 / CBDM select it, the Many/Medium/Few splits, and the
class-balanced sampler of the re-sampling baseline."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError


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


def class_splits(sizes: int | Sequence[int], thresholds: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Many / Medium / Few: the thirds of the classes ranked by training-set size (paper sec. 4.1; Jiang et al. 2021),
    or by `thresholds` (many_above, few_below): Many has more than `many_above` training images, Few fewer than
    `few_below`, Medium the rest (Liu et al. 2019's > 100 / 20-100 / < 20 for ImageNet-LT and iNaturalist).

    `sizes` is the training count per class id; ties rank by class id (a folder's ids follow its sorted names). An
    int C instead takes class 0 as the largest and the ids as the ranking, the named datasets' convention, for
    callers that only know the number of classes (thirds only). The remainder of the division goes to "few": 10
    classes give 3 / 3 / 4, 100 classes 33 / 33 / 34; two classes (CelebA-HQ) are Many and Few. Each group lists its
    ids in ascending order; with thresholds a group may be empty.
    """
    if thresholds is not None:
        many_above, few_below = thresholds
        if isinstance(sizes, int) or few_below > many_above + 1:
            raise ValueError(f"split thresholds need class counts and few_below <= many_above + 1, got {thresholds}")
        groups = {"many": [], "medium": [], "few": []}
        for c, n in enumerate(sizes):
            groups["many" if n > many_above else "few" if n < few_below else "medium"].append(c)
        return groups
    ranking = list(range(sizes)) if isinstance(sizes, int) else sorted(range(len(sizes)), key=lambda c: -sizes[c])
    num_classes = len(ranking)
    if num_classes < 1:
        raise ValueError(f"class_splits needs at least one class, got {sizes!r}")
    if num_classes == 2:
        return {"many": [ranking[0]], "medium": [], "few": [ranking[1]]}
    third = num_classes // 3
    groups = {"many": ranking[:third], "medium": ranking[third : 2 * third], "few": ranking[2 * third :]}
    return {name: sorted(ids) for name, ids in groups.items()}


SPLITS = ("many", "medium", "few")


def split_of_class(splits: dict[str, list[int]]) -> list[int]:
    """Each class's index in ``SPLITS`` (0 Many, 1 Medium, 2 Few), from the class ids per split."""
    index = {c: i for i, name in enumerate(SPLITS) for c in splits[name]}
    return [index[c] for c in range(len(index))]


# A per-class table in the log lists every class up to LISTED_CLASSES, else the LISTED_ENDS largest and smallest.
LISTED_CLASSES = 40
LISTED_ENDS = 10


def listed_classes(class_counts: Sequence[int]) -> list[int | None]:
    """The rows of a per-class log table: every class id in order for up to ``LISTED_CLASSES`` classes, else the
    ``LISTED_ENDS`` largest and smallest by training count with None standing for the classes left out."""
    num_classes = len(class_counts)
    if num_classes <= LISTED_CLASSES:
        return list(range(num_classes))
    ranking = sorted(range(num_classes), key=lambda c: -class_counts[c])
    return [*ranking[:LISTED_ENDS], None, *ranking[-LISTED_ENDS:]]


# Classes in a validation or export sample grid: every class up to this many, else this many spread over the sizes.
GRID_CLASSES = 10


def grid_classes(class_counts: int | Sequence[int], limit: int = GRID_CLASSES) -> list[int]:
    """The class ids a sample grid shows: all of them for up to `limit` classes, else `limit` classes evenly spaced
    over the classes ranked by training-set size (the largest and the smallest included), in ascending id order, so
    that a grid of a thousands-of-classes set still shows Many, Medium and Few. An int C ranks by class id, as
    ``class_splits`` does."""
    if isinstance(class_counts, int):
        class_counts = list(range(class_counts, 0, -1))
    num_classes = len(class_counts)
    if num_classes <= limit:
        return list(range(num_classes))
    ranking = sorted(range(num_classes), key=lambda c: -class_counts[c])
    picks = {ranking[round(k * (num_classes - 1) / (limit - 1))] for k in range(limit)}
    return sorted(picks)


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
