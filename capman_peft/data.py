"""Class-imbalanced image data: long-tail subsampling, named datasets, class splits, balanced sampling."""

from __future__ import annotations


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
