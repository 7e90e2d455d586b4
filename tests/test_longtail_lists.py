"""ImageNet-LT and iNaturalist 2018 from a local copy and their official list files (synthetic copies in the real
formats): class order by training count, the > 100 / 20-100 / < 20 splits, the validation list as the reference,
training, capman-eval and capman-analyze on such a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_run_args
from PIL import Image

import train_unet_cm  # noqa: E402
from capman_peft.data import class_splits, load_imbalanced_dataset, load_reference_dataset
from capman_peft.errors import run_cli

# ImageNet-LT list ids 0..5 (WordNet ids n0000000<id>) with training counts not in id order
IMAGENET_COUNTS = [3, 130, 25, 1, 101, 10]


def test_splits_by_thresholds():
    """Many: more than 100 images, Few: fewer than 20, Medium: the rest (bounds included in Medium)."""
    counts = [150, 101, 100, 20, 19, 5]
    assert class_splits(counts, (100, 20)) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    assert class_splits([50, 40, 30], (100, 20)) == {"many": [], "medium": [0, 1, 2], "few": []}
    with pytest.raises(ValueError):
        class_splits(3, (100, 20))  # thresholds need the counts


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path, format="JPEG")


def write_imagenet_lt(root: Path) -> None:
    train, val = [], []
    for c, n in enumerate(IMAGENET_COUNTS):
        wnid = f"n0000000{c}"
        for i in range(n):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", 40 * c)
            train.append(f"train/{wnid}/{wnid}_{i}.JPEG {c}")
        for i in range(2):
            write_image(root / "val" / f"ILSVRC2012_val_{c}{i}.JPEG", 40 * c)
            val.append(f"val/ILSVRC2012_val_{c}{i}.JPEG {c}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageNet_LT_val.txt").write_text("\n".join(val) + "\n")


@pytest.fixture(scope="module")
def imagenet_lt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet_lt(root)
    return root


def test_imagenet_lt_classes_follow_the_training_counts(imagenet_lt):
    data = load_imbalanced_dataset("imb-imagenet-lt", imbalance_ratio=None, resolution=8, train_data_dir=imagenet_lt)
    # written out: list ids by count, largest first -> 1 (130), 4 (101), 2 (25), 5 (10), 0 (3), 3 (1)
    assert data.class_names == ["n00000001", "n00000004", "n00000002", "n00000005", "n00000000", "n00000003"]
    assert data.class_counts == [130, 101, 25, 10, 3, 1]
    assert data.splits == {"many": [0, 1], "medium": [2], "few": [3, 4, 5]}
    first_of_class_3 = data.labels.index(3)
    assert "n00000005" in str(data.images[first_of_class_3])
    reference = load_reference_dataset("imb-imagenet-lt", resolution=8, train_data_dir=imagenet_lt)
    assert reference.class_names == data.class_names and reference.class_counts == [2] * 6
    value = reference[reference.labels.index(0)]["pixel_values"].mean().item()  # class 0 is list id 1: pixel 40
    assert value == pytest.approx(40 / 127.5 - 1, abs=0.02)


def test_inaturalist_json_lists(tmp_path):
    counts = {0: 2, 1: 5, 2: 1, 3: 3}
    names = {0: "Aa aa", 1: "Bb bb", 2: "Cc cc", 3: "Dd dd"}
    for split, per_class in (("train", counts), ("val", dict.fromkeys(counts, 1))):
        images, annotations = [], []
        for c, n in per_class.items():
            for i in range(n):
                path = f"train_val2018/Plantae/{c}/{split}{i}.jpg"
                write_image(tmp_path / path, 10 * c)
                images.append({"id": len(images) + 7, "file_name": path})
                annotations.append({"image_id": len(images) + 6, "category_id": c})
        categories = [{"id": c, "name": names[c]} for c in counts]
        listing = {"images": images, "annotations": annotations, "categories": categories}
        (tmp_path / f"{split}2018.json").write_text(json.dumps(listing))
    data = load_imbalanced_dataset("imb-inaturalist", imbalance_ratio=None, resolution=8, train_data_dir=tmp_path)
    assert data.class_names == ["Bb bb", "Dd dd", "Aa aa", "Cc cc"] and data.class_counts == [5, 3, 2, 1]
    assert data.splits == {"many": [], "medium": [], "few": [0, 1, 2, 3]}
    reference = load_reference_dataset("imb-inaturalist", resolution=8, train_data_dir=tmp_path)
    assert reference.class_names == data.class_names and len(reference) == 4


@pytest.mark.slow
def test_a_run_on_imagenet_lt_records_its_splits_for_evaluation_and_analysis(imagenet_lt, tmp_path):
    from test_evaluation import TINY  # registers the tiny feature extractor

    from capman_peft.analysis.cli import main as analyze
    from capman_peft.evaluation.cli import main as evaluate

    args = digits_run_args(
        tmp_path, dataset="imb-imagenet-lt", imbalance_ratio=False, train_data_dir=imagenet_lt, max_train_steps=1
    )
    train_unet_cm.main(args)
    out = tmp_path / "out"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["class_counts"] == [130, 101, 25, 10, 3, 1] and summary["args"]["imbalance_ratio"] is None
    assert summary["splits"] == {"many": [0, 1], "medium": [2], "few": [3, 4, 5]}
    evaluate([
        "--pipeline", str(out), "--num_images_per_class", "2", "--steps", "2", "--batch_size", "12",
        "--cache_dir", str(tmp_path / "features"), "--feature_extractor", TINY, "--metrics", "fid",
        "--output_dir", str(tmp_path / "eval"),
    ])  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["splits_classes"] == summary["splits"] and metrics["reference_images_per_class"] == 2
    analyze(["capacity", "--pipeline", str(out), "--num_batches", "1", "--batch_size", "2", "--output_dir",
             str(tmp_path / "cap")])  # fmt: skip
    capacity = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    assert capacity["class_splits"] == summary["splits"] and set(capacity["splits"]) == {"many", "medium", "few"}


@pytest.mark.parametrize("recipe, resolution", [("imagenet_lt_64_cm", 64), ("inaturalist_32_ddpm", 32)])
def test_tab5_recipes_keep_the_lists_long_tail(recipe, resolution, tmp_path):
    root = Path(__file__).resolve().parent.parent
    argv = ["--config", str(root / "configs" / f"{recipe}.yaml"), "--train_data_dir", str(tmp_path)]
    data = train_unet_cm.parse_args([*argv, "--output_dir", str(tmp_path / "out")]).data
    assert data.imbalance_ratio is None and data.dataset.startswith("imb-") and data.resolution == resolution


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_data_dir": False}, "--train_data_dir DIR, the folder with ImageNet_LT_train.txt"),
        ({"missing": True}, "1 of the 270 images"),
        ({"extra": ["--split_thresholds", "20", "100"]}, "--split_thresholds 20 100"),
    ],
)
def test_list_datasets_refuse_bad_input_with_one_line(tmp_path, capsys, overrides, message):
    root = tmp_path / "copy"
    write_imagenet_lt(root)
    if overrides.pop("missing", False):
        (root / "train" / "n00000000" / "n00000000_0.JPEG").unlink()
    extra = overrides.pop("extra", [])
    values = {"dataset": "imb-imagenet-lt", "imbalance_ratio": False, "train_data_dir": root, **overrides}
    with pytest.raises(SystemExit):
        run_cli(train_unet_cm.main, digits_run_args(tmp_path, **values) + extra)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
