"""Thousands of classes (ImageNet-LT's 1,000, iNaturalist's 8,142): what is per class stays usable — the log's class
table, the sample grids, the evaluation budget — on synthetic data in the real formats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_run_args
from PIL import Image

import train_unet_cm  # noqa: E402
from capman_peft.data import GRID_CLASSES, grid_classes

NUM_CLASSES = 3000


def test_grid_classes_show_every_class_of_a_small_set():
    assert grid_classes([5, 9, 1]) == [0, 1, 2]
    assert grid_classes(list(range(GRID_CLASSES))) == list(range(GRID_CLASSES))


def test_grid_classes_spread_over_the_sizes_of_a_large_set():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 1000, NUM_CLASSES).tolist()
    shown = grid_classes(counts)
    assert len(shown) == GRID_CLASSES and shown == sorted(set(shown))
    # written out: rank the classes by size (largest first, ties by id) and take 10 evenly spaced ranks
    ranking = sorted(range(NUM_CLASSES), key=lambda c: (-counts[c], c))
    expected = sorted(ranking[round(k * (NUM_CLASSES - 1) / 9)] for k in range(10))
    assert shown == expected
    assert counts[ranking[0]] in [counts[c] for c in shown] and counts[ranking[-1]] in [counts[c] for c in shown]


def write_many_class_folders(root: Path) -> list[int]:
    """3,000 class folders of 1-5 tiny images each (a long tail by folder), as --train_data_dir reads them."""
    rng = np.random.default_rng(1)
    counts = [5 - (4 * c) // NUM_CLASSES for c in range(NUM_CLASSES)]  # 5 ... 1
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for c, n in enumerate(counts):
        folder = root / f"c{c:04d}"
        folder.mkdir(parents=True)
        for i in range(n):
            image.save(folder / f"{i}.png")
    return counts


@pytest.mark.slow
def test_a_run_with_3000_classes_logs_a_summary_and_grids_a_sample(tmp_path, caplog):
    counts = write_many_class_folders(tmp_path / "data")
    args = digits_run_args(tmp_path, dataset=False, imbalance_ratio=False, train_data_dir=tmp_path / "data")
    args += ["--validation_epochs", "1", "--max_train_steps", "2", "--checkpointing_steps", "2"]
    with caplog.at_level(logging.INFO, logger="capman_peft"):
        train_unet_cm.main(args)
    out = tmp_path / "out"
    summary = json.loads((out / "training_summary.json").read_text())
    assert len(summary["class_counts"]) == NUM_CLASSES and sum(summary["class_counts"]) == sum(counts)
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training data:"))
    assert len(table.splitlines()) < 40 and "more classes" in table
    assert "many: 1000 classes" in table and "few: 1000 classes" in table
    cm_table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("CM loss"))
    assert len(cm_table.splitlines()) < 40 and "more classes" in cm_table
    # the sample grid: GRID_CLASSES rows (8 px images drawn as 64 px cells with 2 px gaps), not 3,000
    assert Image.open(out / "samples.png").height == GRID_CLASSES * (64 + 2) + 2
    assert (out / "checkpoint-2").is_dir()
    card = (out / "README.md").read_text()
    assert "| … | 2980 more classes" in card and card.count("\n| ") < 40


def test_the_evaluation_sample_grid_shows_ten_classes_of_a_large_set(tmp_path):
    import torch

    from capman_peft.evaluation.report import write_model_outputs

    classes = 30
    images = torch.zeros(classes * 2, 3, 8, 8, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(2)
    write_model_outputs({"label": "x"}, images, labels, list(range(classes, 0, -1)), tmp_path)
    assert Image.open(tmp_path / "samples.png").height == GRID_CLASSES * (64 + 2) + 2
