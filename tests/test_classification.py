"""CM for long-tailed classification (paper sec. G.11): each loss against its formula written out here, the CM term
of a classifier, the cosine head's export, and train_classifier_cm.py end to end: exact resume, refusals, and a
classifier that loads into a network built with torch alone."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import train_classifier_cm
from capman_peft.classification import (
    ClassifierCM,
    ClassifierLoss,
    ClassifierTraining,
    NormedLinear,
    build_classifier,
    drw_weights,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
    new_classifier,
    plain_classifier,
)
from capman_peft.data import load_reference_dataset
from capman_peft.evaluation.fidelity import to_uint8
from capman_peft.tuner import CapManLayer

ROOT = Path(__file__).resolve().parent.parent


def test_ldam_margins_fall_with_the_fourth_root_of_the_class_size():
    # n^(-1/4) of 256, 16, 1 is 1/4, 1/2, 1; scaled so the largest is 0.5
    assert ldam_margins([256, 16, 1]).tolist() == pytest.approx([0.125, 0.25, 0.5])


def test_drw_weights_are_the_inverse_effective_numbers_summing_to_the_class_count():
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in (500, 50, 5)]
    expected = [3 * w / sum(raw) for w in raw]
    assert drw_weights([500, 50, 5]).tolist() == pytest.approx(expected, rel=1e-5)


def test_ldam_loss_lowers_the_true_logit_by_its_margin_and_scales_by_30():
    logits = torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.5]])
    labels = torch.tensor([2, 0])
    margins = torch.tensor([0.1, 0.2, 0.5])
    by_hand = 0.0
    for z, y in zip(logits.tolist(), labels.tolist(), strict=True):
        shifted = [30 * (v - (margins[y].item() if c == y else 0)) for c, v in enumerate(z)]
        by_hand += -shifted[y] + math.log(sum(math.exp(v) for v in shifted))
    assert ldam_loss(logits, labels, margins).item() == pytest.approx(by_hand / 2, rel=1e-5)
    weight = torch.tensor([1.0, 2.0, 0.5])  # weighted mean: sum w_y l_i / sum w_y
    rows = [F.cross_entropy(30 * (logits[i] - margins * F.one_hot(labels[i], 3)), labels[i]) for i in range(2)]
    weighted = (0.5 * rows[0] + 1.0 * rows[1]) / 1.5
    assert ldam_loss(logits, labels, margins, weight).item() == pytest.approx(weighted.item(), rel=1e-5)


def test_logit_adjusted_loss_adds_the_log_prior_to_every_logit():
    logits, labels, counts = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([1]), [60, 30, 10]
    adjusted = [1.0 + math.log(0.6), 0.0 + math.log(0.3), -1.0 + math.log(0.1)]
    by_hand = -adjusted[1] + math.log(sum(math.exp(v) for v in adjusted))
    assert logit_adjusted_loss(logits, labels, counts).item() == pytest.approx(by_hand, rel=1e-6)


def test_cm_term_of_a_fresh_classifier_is_the_relative_push_on_its_probabilities():
    """A fresh expert (B = 0) makes θ^g = θ: the distance is 0, so each row of a pushed class pays its push weight
    times 0.5 x θ's RMS distance to the one-hot label, and the majority rows nothing."""
    counts = [90, 9, 1]
    settings = ClassifierTraining(classifier="small_cnn", cm=ClassifierCM())
    model = new_classifier(settings, 3, seed=0).eval()  # eval: the same BatchNorm statistics for both passes
    x, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 2])
    loss, _ = ClassifierLoss(settings, counts)(model, x, labels, epoch=0)
    p = model(x).softmax(1)
    omega_con = [3 * n / 100 for n in counts]
    omega_div = [3 / (n * sum(1 / m for m in counts)) for n in counts]
    push = [max(d - c, 0.0) for d, c in zip(omega_div, omega_con, strict=True)]
    rms_error = (p - F.one_hot(labels, 3)).pow(2).mean(1).sqrt()
    cm = sum(push[y] * 0.5 * rms_error[i].item() for i, y in enumerate(labels.tolist())) / 4
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), labels).item() + cm, rel=1e-5)


def test_the_general_pass_leaves_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    settings = ClassifierTraining(classifier="small_cnn", cm=ClassifierCM())
    model = new_classifier(settings, 3, seed=0).train()
    twin = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8)
    ClassifierLoss(settings, [4, 1, 1])(model, x, torch.tensor([0, 0, 0, 0, 1, 2]), epoch=0)
    twin(x)  # one pass of the same input: the running statistics it leaves (a second pass would move them again)
    for a, b in zip(model.modules(), twin.modules(), strict=True):
        if isinstance(a, torch.nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6) and a.running_mean.abs().sum() > 0


@pytest.mark.parametrize(("layers", "adapted"), [("all", 20), ("last", 5)])
def test_resnet18_experts_go_to_every_convolution_or_the_last_stage(layers, adapted):
    settings = ClassifierTraining(classifier="resnet18", loss="ldam_drw", cm=ClassifierCM(expert_layers=layers))
    model = new_classifier(settings, 4, seed=0)
    names = [name for name, module in model.named_modules() if isinstance(module, CapManLayer)]
    assert len(names) == adapted  # ResNet-18: 17 3x3 convolutions and 3 shortcut 1x1s; layer4 holds 5
    assert layers == "all" or all(".layer4." in name for name in names)
    loss, _ = ClassifierLoss(settings, [8, 2, 1, 1])(model.train(), torch.randn(4, 3, 8, 8), torch.arange(4), epoch=0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in model.named_parameters() if "capman_expert" in n)


def test_the_cosine_head_exports_as_a_linear_layer_with_the_same_predictions():
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 5, normed_head=True).eval()
    assert isinstance(model[-1], NormedLinear)
    x = torch.randn(16, 3, 8, 8)
    before = model(x).argmax(1)
    plain = plain_classifier(model)
    assert type(plain[-1]) is torch.nn.Linear and torch.equal(plain(x).argmax(1), before)


def _held_out(root):
    """Six digits per class (a balanced set, as the script reads it)."""
    reference = load_reference_dataset("imb-digits", 8)
    for i in range(len(reference)):
        item = reference[i]
        folder = root / item["class_name"]
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.iterdir())) < 6:
            Image.fromarray(to_uint8(item["pixel_values"]).permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def _args(tmp_path, out, *extra):
    held_out = tmp_path / "held_out"
    if not held_out.exists():
        _held_out(held_out)
    return ["--dataset", "imb-digits", "--imbalance_ratio", "10", "--resolution", "8", "--test_data_dir",
            str(held_out), "--epochs", "4", "--train_batch_size", "64", "--output_dir", str(out), *extra]  # fmt: skip


def test_training_resumes_exactly_and_the_classifier_loads_into_a_plain_torch_network(tmp_path):
    cm = ["--loss", "ldam_drw", "--capacity_manipulation", "--checkpointing_epochs", "2"]
    train_classifier_cm.main(_args(tmp_path, tmp_path / "whole", *cm))
    train_classifier_cm.main(_args(tmp_path, tmp_path / "cut", *cm))
    for name in ("model.safetensors", "metrics.json", "config.json"):
        (tmp_path / "cut" / name).unlink()  # as if the run had died after its epoch-2 checkpoint
    train_classifier_cm.main(_args(tmp_path, tmp_path / "cut", *cm, "--resume_from_checkpoint", "latest"))
    whole, cut = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)

    # the merged classifier, built with torch alone: three conv blocks and a linear head, no expert, no cosine head
    layers = []
    for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
        layers += [torch.nn.MaxPool2d(2)]
    plain = torch.nn.Sequential(
        *layers[:-1], torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10)
    )
    plain.load_state_dict(whole)
    record = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    images, labels = [], []
    for k, name in enumerate(json.loads((tmp_path / "whole" / "config.json").read_text())["class_names"]):
        for path in sorted((tmp_path / "held_out" / name).iterdir()):
            images.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
            labels.append(k)
    with torch.no_grad():
        predicted = plain.eval()(torch.stack(images).float() / 127.5 - 1).argmax(1)
    accuracy = (predicted == torch.tensor(labels)).float().mean().item()
    assert len(labels) == record["test_images"] == 60 and accuracy == pytest.approx(record["theta"]["accuracy"])
    assert set(record) >= {"theta", "theta_g", "splits"} and "few_accuracy" in record["theta_g"]


def test_a_checkpoint_of_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    train_classifier_cm.main(_args(tmp_path, out, "--checkpointing_epochs", "2"))
    (out / "metrics.json").unlink()
    with pytest.raises(SystemExit):
        train_classifier_cm.main(
            _args(tmp_path, out, "--loss", "logit_adjustment", "--resume_from_checkpoint", "latest")
        )
    assert "--loss ce (now logit_adjustment)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--capacity_manipulation", "--cm_distance", "logits"], "--cm_distance logits with --cm_form relative"),
        (["--capacity_manipulation", "--cm_form", "paper"], "--cm_form paper: unbounded below"),
    ],
)
def test_settings_that_do_not_combine_are_refused_before_any_work(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        train_classifier_cm.main(_args(tmp_path, tmp_path / "out", *extra))
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_training_set_without_held_out_images_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_classifier_cm.main(["--dataset", "imb-digits", "--output_dir", str(tmp_path / "out")])
    assert "--test_data_dir: required" in capsys.readouterr().err


@pytest.mark.parametrize("ir", [100, 200])
def test_the_paper_recipes_parse_and_their_dataset_has_a_test_split(ir):
    from capman_peft.data import get_dataset_spec

    recipe = f"configs/classification/cifar100_ir{ir}_la_cm.yaml"
    args = train_classifier_cm.parse_args(["--config", str(ROOT / recipe)])
    assert (args.dataset, args.imbalance_ratio, args.classifier, args.loss) == (
        "imb-cifar100",
        ir,
        "resnet18",
        "logit_adjustment",
    )
    assert args.capacity_manipulation and args.random_crop and args.random_flip and args.epochs == 200
    assert get_dataset_spec(args.dataset).reference_split is not None
