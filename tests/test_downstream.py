"""capman-downstream (paper Tab. G.8): the scores against a computation written out here, the classifiers, the
augmentation, and the command end to end on a tiny pipeline and a tiny held-out folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import digits_run_args
from PIL import Image

import train_unet_cm
from capman_peft.classification import ClassifierTraining, _augment, build_classifier, score_classifier
from capman_peft.data import load_reference_dataset
from capman_peft.evaluation.downstream import REAL_ONLY, downstream_utility
from capman_peft.evaluation.downstream_cli import main as downstream_main
from capman_peft.evaluation.fidelity import to_uint8


class Fixed(torch.nn.Module):
    """A 'classifier' whose prediction for image i is the value stored in its first pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        predicted = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        return torch.nn.functional.one_hot(predicted, 3).float()


def test_scores_are_macro_precision_recall_and_split_accuracies():
    truth = [0, 0, 0, 1, 1, 2, 2, 2]
    predicted = [0, 0, 1, 1, 2, 2, 2, 0]
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(predicted, dtype=torch.uint8)
    scores = score_classifier(Fixed(), (images, torch.tensor(truth)), {"many": [0], "few": [1, 2]}, "cpu")
    # by hand: class 0 tp 2 fp 1 fn 1; class 1 tp 1 fp 1 fn 1; class 2 tp 2 fp 1 fn 1
    assert scores["precision"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert scores["recall"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["many_accuracy"] == pytest.approx(2 / 3) and scores["few_accuracy"] == pytest.approx(3 / 5)


def test_resnet18_has_the_cifar_stem_and_the_small_cnn_takes_8_px():
    model = build_classifier("resnet18", 7)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert build_classifier("small_cnn", 4)(torch.zeros(2, 3, 8, 8)).shape == (2, 4)


def test_augmentation_crops_from_the_padded_image_and_flips_whole_images():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    flipped = _augment(x, ClassifierTraining(random_flip=True), torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    cropped = _augment(x, ClassifierTraining(random_crop=True), torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    windows = [padded[:, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    assert all(any(torch.equal(cropped[i], w[i]) for w in windows) for i in range(2))


def test_one_row_per_training_set_with_mean_and_std_over_seeds():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    extra = (images[:6], torch.tensor([2, 2, 1, 1, 2, 1]))
    settings = ClassifierTraining(classifier="small_cnn", epochs=1, batch_size=4)
    rows = downstream_utility(
        (images, labels), (images, labels), {"gen": extra}, num_classes=3, splits={"many": [0], "few": [1, 2]},
        settings=settings, seeds=[0, 1], progress=False,
    )  # fmt: skip
    assert [row["source"] for row in rows] == [REAL_ONLY, "gen"]
    assert [row["generated_images"] for row in rows] == [0, 6]
    for row in rows:
        values = [seed["recall"] for seed in row["per_seed"]]
        assert row["recall"]["mean"] == pytest.approx(np.mean(values))
        assert row["recall"]["std"] == pytest.approx(np.std(values, ddof=1))


def test_capman_downstream_end_to_end_on_a_tiny_pipeline(tmp_path, capsys):
    train_unet_cm.main(digits_run_args(tmp_path))
    held_out = tmp_path / "held_out"
    reference = load_reference_dataset("imb-digits", 8)
    for i in range(0, len(reference), 25):
        item = reference[i]
        folder = held_out / item["class_name"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(item["pixel_values"]).permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    args = ["--pipeline", str(tmp_path / "out"), "--num_images_per_class", "2", "--steps", "2", "--epochs", "1"]
    args += ["--seeds", "0", "1", "--output_dir", str(tmp_path / "downstream")]
    with pytest.raises(SystemExit):  # imb-digits has no held-out split: refused before any work
        downstream_main(args)
    assert "--test_data_dir" in capsys.readouterr().err
    downstream_main([*args, "--test_data_dir", str(held_out)])
    record = json.loads((tmp_path / "downstream" / "metrics.json").read_text())
    assert [row["generated_images"] for row in record["rows"]] == [0, 20]
    assert record["classifier"]["classifier"] == "small_cnn" and record["data"]["imbalance_ratio"] == 10
    assert (tmp_path / "downstream" / "downstream.png").stat().st_size > 0
    assert "| out |" in capsys.readouterr().out
