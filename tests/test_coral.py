"""CORAL (Rodriguez et al. 2025): its loss against the formula written out here and against pytorch-metric-learning's
SupConLoss, the head on the bottleneck in every forward mode, and train_unet_cm.py with --coral (checkpointed head,
plain exported UNet, every base objective, CM) and train_text_to_image_cm.py."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import UP_TARGETS, artbench_assets, assert_unet_resume_is_exact, digits_run_args, text_to_image_args
from diffusers import DDPMScheduler, UNet2DModel
from peft import get_peft_model
from pytorch_metric_learning.losses import SupConLoss
from safetensors.torch import load_file

import train_unet_cm
from capman_peft import CapManConfig
from capman_peft.denoiser import CMDenoiser
from capman_peft.errors import ConfigError, run_cli
from capman_peft.families import ClassConditionalFamily
from capman_peft.families.stable_diffusion_3 import StableDiffusion3Family
from capman_peft.objective import CoralSettings, attach_coral_head, build_objective, coral_loss, drop_coral_head
from capman_peft.randomness import draw_step
from capman_peft.testing import build_tiny_sd, make_tiny_unet2d
from capman_peft.training.loop import TrainingCallbacks, family_step_loss

EMBEDDINGS = torch.tensor(
    [
        [1.0, 0.0, 0.5, 0.0],
        [0.8, 0.2, 0.4, 0.1],
        [0.0, 1.0, 0.0, 0.3],
        [0.1, 0.9, -0.2, 0.0],
        [-0.5, 0.2, 1.0, 0.0],
        [0.9, -0.1, 0.3, 0.2],
        [0.3, 0.3, 0.3, 0.3],
    ]
)
LABELS = torch.tensor([0, 0, 1, 1, 2, 0, 2])
TIMESTEPS = torch.tensor([0, 999, 500, 250, 10, 700, 100])


def supcon_by_hand(embeddings: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    """Khosla et al.'s L^sup_out with cosine similarity: for each anchor i with a positive,
    -1/|P(i)| sum_p log(exp(s_ip/τ) / sum_{a != i} exp(s_ia/τ)); averaged over the anchors whose loss is > 0
    (pytorch-metric-learning's reducer)."""
    n = len(labels)
    unit = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in embeddings.tolist()]
    sim = [[sum(a * b for a, b in zip(unit[i], unit[j], strict=True)) for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(sim[i][a] / tau) for a in range(n) if a != i))
        loss = -sum(sim[i][p] / tau - log_denominator for p in positives) / len(positives)
        if loss > 0:
            losses.append(loss)
    return sum(losses) / len(losses)


def test_coral_loss_is_the_authors_weighted_supcon_on_the_rows_that_kept_their_label():
    settings = CoralSettings(weight=0.5, time_temperature=0.3, temperature=0.1, num_train_timesteps=1000)
    kept = torch.tensor([True, True, True, True, False, True, True])  # row 4 (class 2) lost its label
    value = coral_loss(EMBEDDINGS * 3, LABELS, TIMESTEPS, kept, settings)  # the loss normalises: scale is free
    rows = [i for i in range(7) if kept[i]]
    scale = sum(math.exp((1 - TIMESTEPS[i].item() / 1000) / 0.3) for i in rows) / len(rows)
    expected = 0.1 * 0.5 * scale * supcon_by_hand(EMBEDDINGS[rows], LABELS[rows], 0.1)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # and the SupCon factor is pytorch-metric-learning's, as the authors call it
    library = SupConLoss(temperature=0.1)(F.normalize(EMBEDDINGS[rows], dim=1), LABELS[rows]).item()
    assert library == pytest.approx(supcon_by_hand(EMBEDDINGS[rows], LABELS[rows], 0.1), rel=1e-5)


def test_coral_loss_without_two_labelled_rows_is_zero_and_keeps_the_head_in_the_graph():
    embeddings = EMBEDDINGS.clone().requires_grad_(True)
    kept = torch.zeros(7, dtype=torch.bool)
    kept[2] = True
    value = coral_loss(embeddings, LABELS, TIMESTEPS, kept, CoralSettings())
    value.backward()
    assert value.item() == 0.0 and torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def coral_model(cm: bool):
    unet = make_tiny_unet2d()
    model = unet
    if cm:
        config = CapManConfig(mode="full", expert_rank_ratio=0.5, init_lora_weights=False, target_modules=UP_TARGETS)
        model = get_peft_model(unet, config)
    torch.manual_seed(1)
    head = attach_coral_head(model.get_base_model() if cm else model, 16)
    return model, unet, head


@pytest.mark.parametrize("mode, cm", [("fused", True), ("sequential", True), ("shared_prefix", True), ("fused", False)])
def test_the_embedding_is_the_head_on_theta_s_pooled_mid_block_output(mode, cm):
    model, unet, head = coral_model(cm)
    x, t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 500, 999])
    y, y_extra = torch.tensor([0, 2, 1]), torch.tensor([1, 1, 0])
    seen = []
    unet.mid_block.register_forward_hook(lambda _m, _a, out: seen.append(out))
    outputs = CMDenoiser(model, forward_mode=mode, capacity_manipulation=cm, family=ClassConditionalFamily())(
        x, t, y, y_extra
    )
    first = seen[0][:3]  # the first call's first rows: theta under y in every mode
    expected = first.mean(dim=(2, 3)) @ head.proj.weight.T + head.proj.bias
    torch.testing.assert_close(outputs.embedding, expected)
    with torch.no_grad():  # and that is theta's own bottleneck: a plain call of theta on (x, t, y) gives it
        seen.clear()
        model(x, t, class_labels=y)
        torch.testing.assert_close(seen[0], first, atol=1e-5, rtol=1e-5)


def test_drop_coral_head_leaves_the_plain_unet():
    unet, _, _ = coral_model(cm=False)
    assert any("coral_head" in key for key in unet.state_dict())
    assert set(drop_coral_head(unet).state_dict()) == set(make_tiny_unet2d().state_dict())
    model, _, _ = coral_model(cm=True)  # and from inside the PEFT model
    assert not any("coral" in key for key in drop_coral_head(model).state_dict())


@pytest.mark.parametrize("objective", ["ddpm", "cbdm", "oc"])
def test_train_unet_with_coral_and_cm_checkpoints_the_head_and_exports_a_plain_unet(tmp_path, objective):
    train_unet_cm.main(digits_run_args(tmp_path, coral=True, objective=objective, max_train_steps=2))
    out = tmp_path / "out"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["args"]["coral"] is True and summary["final_losses"]["coral_loss"] > 0
    checkpoint = load_file(out / "checkpoint-2" / "model.safetensors")
    assert {key for key in checkpoint if "coral_head" in key}  # trained, checkpointed, resumed with the UNet
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("coral" in key for key in exported)
    UNet2DModel.from_pretrained(out / "unet")


def test_coral_resume_is_exact(tmp_path):
    assert_unet_resume_is_exact(
        lambda name, **flags: digits_run_args(tmp_path, coral=True, output_dir=tmp_path / name, **flags), tmp_path
    )


def test_the_head_changes_training_only_through_the_loss():
    """CORAL's weight 0 trains exactly what a run without CORAL trains: the head adds nothing else to a step."""
    plain = make_tiny_unet2d()
    with_head = copy.deepcopy(plain)
    attach_coral_head(with_head, 16)
    family = ClassConditionalFamily()
    objective = build_objective("ddpm", DDPMScheduler(num_train_timesteps=1000))
    batch = {"pixel_values": torch.rand(4, 3, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 0])}
    losses = []
    for unet, coral in ((plain, None), (with_head, CoralSettings(weight=0.0))):
        draws = draw_step(torch.Generator().manual_seed(0), 4, (3, 8, 8), label_dropout=0.0, objective=objective)
        denoiser = CMDenoiser(unet, capacity_manipulation=False, family=family)
        step = family_step_loss(family, denoiser, objective, num_classes=3, cm=None, coral=coral)
        losses.append(step(batch, draws, 0)[0])
    assert torch.equal(losses[0], losses[1])


def test_coral_on_a_transformer_base_is_one_error_line(tmp_path, capsys):
    settings = train_unet_cm.parse_args(digits_run_args(tmp_path, coral=True))
    with pytest.raises(ConfigError) as err:
        StableDiffusion3Family.check_settings(settings)
    assert "--coral" in str(err.value) and "StableDiffusion3Pipeline" in str(err.value)
    with pytest.raises(SystemExit):  # and the UNet script refuses a negative weight before any work
        run_cli(train_unet_cm.main, digits_run_args(tmp_path, coral=True, coral_weight=-1))
    assert "--coral_weight" in capsys.readouterr().err


def test_coral_fine_tunes_sd_and_exports_the_plain_unet(tmp_path):
    """The LoRA script: the head sits on the PEFT model's base UNet, trains beside the adapters and is not exported."""
    import train_text_to_image_cm

    assets = artbench_assets(tmp_path, build_tiny_sd(tmp_path))
    seen = []
    callbacks = TrainingCallbacks(on_step_end=lambda step, values: seen.append(values["coral_loss"]))
    args = text_to_image_args(assets.base, tmp_path / "out", coral=True, train_batch_size=8, **assets.args)
    train_text_to_image_cm.main(args, callbacks)
    assert max(seen) > 0  # (a batch without two images of one class has nothing to contrast: 0)
    exported = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("coral" in key for key in exported)
