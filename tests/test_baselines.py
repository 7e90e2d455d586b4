"""The paper's +ADA baseline: the augmentation's draws, geometry and conditioning vector against independent
computations, its class embedding, and train_unet_cm.py with it (export, resume, combined with CBDM, focal and CM).

The +Focal weighting is checked number by number in test_objective.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_unet_resume_is_exact, digits_run_args
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

import train_unet_cm  # noqa: E402
from capman_peft.data.augment import augment_condition, augment_images, augment_matrices
from capman_peft.denoiser import CMDenoiser
from capman_peft.errors import run_cli
from capman_peft.families.class_conditional import (
    AugmentedClassEmbedding,
    ClassConditionalFamily,
    add_augment_embedding,
    drop_augment_embedding,
)
from capman_peft.objective import build_objective
from capman_peft.randomness import StepDraws, draw_augmentation, draw_step
from capman_peft.testing import make_tiny_unet2d
from capman_peft.training.loop import family_step_loss


def kdiffusion_matrix(a: list[float], size: int) -> np.ndarray:
    """k-diffusion's input-to-output matrix in pixel coordinates (x = column, y = row, origin at the top-left pixel's
    centre), built as its `KarrasAugmentationPipeline` does, for a square image of `size` pixels."""

    def translate(tx, ty):
        return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=float)

    def scale(sx, sy):
        return np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=float)

    def rotate(t):
        return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])

    a0, a1, a2, a3, a4, a5, a6, a7 = a
    s = 2**0.2
    mats = [
        translate(size / 2 - 0.5, size / 2 - 0.5),
        scale(1 - 2 * a0, 1),
        scale(1, 1 - 2 * a1),
        scale(s**a2, s**a2),
        rotate(-a3),
        rotate(a4),
        scale(s**a5, s**-a5),
        rotate(-a4),
        translate(size / 8 * a6, size / 8 * a7),
        translate(-size / 2 + 0.5, -size / 2 + 0.5),
    ]
    out = np.eye(3)
    for m in mats:
        out = out @ m
    return out


def test_matrices_are_k_diffusion_s_in_normalised_coordinates():
    size = 8
    params = torch.tensor([[1.0, 1.0, 0.7, 0.9, -2.1, -0.8, 0.3, -1.2], [0.0, 0.0, -1.1, -2.5, 0.4, 1.3, -0.6, 0.5]])
    ours = augment_matrices(params).double().numpy()
    for row in range(2):
        pixel = kdiffusion_matrix(params[row].tolist(), size)
        for x, y in [(0, 0), (7, 0), (3, 5), (6.5, 2.25)]:
            out = pixel @ [x, y, 1]
            normalised_in = [(2 * x + 1) / size - 1, (2 * y + 1) / size - 1, 1]
            normalised_out = [(2 * out[0] + 1) / size - 1, (2 * out[1] + 1) / size - 1]
            assert ours[row] @ normalised_in == pytest.approx(normalised_out, abs=1e-5)


def test_images_are_warped_by_the_inverse_map():
    """Output pixel p takes the input at M^-1 p: checked pixel by pixel for maps that land on pixel centres."""
    size = 6
    images = torch.arange(2 * size * size, dtype=torch.float32).reshape(2, 1, size, size) / 10
    assert torch.equal(augment_images(images, torch.zeros(2, 8)), images)

    def centred_inverse(params, x, y):
        m = np.linalg.inv(kdiffusion_matrix(params, size))
        sx, sy, _ = m @ [x, y, 1]
        return round(sx), round(sy)

    quarter_turn = [0, 0, 0, math.pi / 2, 0, 0, 0, 0]
    x_flip = [1, 0, 0, 0, 0, 0, 0, 0]
    one_pixel_right = [0, 0, 0, 0, 0, 0, 8 / size, 0]
    for params in (quarter_turn, x_flip, one_pixel_right):
        out = augment_images(images, torch.tensor([params, params]))
        for y in range(size):
            for x in range(1, size):  # the translated column 0 comes from the mirrored border
                sx, sy = centred_inverse(params, x, y)
                assert out[0, 0, y, x].item() == pytest.approx(images[0, 0, sy, sx].item(), abs=1e-4), (params, x, y)


def test_condition_vector_and_draws():
    a = [1.0, 0.0, 0.5, 0.3, -1.0, 2.0, 0.25, -0.75]
    expected = [1.0, 0.0, 0.5, math.cos(0.3) - 1, math.sin(0.3), 2 * math.cos(-1.0), 2 * math.sin(-1.0), 0.25, -0.75]
    assert augment_condition(torch.tensor([a])).squeeze(0).tolist() == pytest.approx(expected, abs=1e-6)

    generator = torch.Generator().manual_seed(0)
    never = draw_augmentation(4000, 0.0, generator=generator, device="cpu")
    assert never[:, 1:].abs().sum() == 0 and set(never[:, 0].tolist()) == {0.0, 1.0}
    draws = draw_augmentation(20000, 0.12, generator=generator, device="cpu")
    assert draws[:, 0].mean().item() == pytest.approx(0.5, abs=0.02)  # the x-flip always has p = 1/2
    for column in (2, 3, 5, 6):  # scale, rotation, anisotropy, translation: applied with p = 0.12
        assert (draws[:, column] != 0).float().mean().item() == pytest.approx(0.12, abs=0.01)
    assert (draws[:, 1] != 0).float().mean().item() == pytest.approx(0.06, abs=0.01)  # y-flip: 0.12 x 1/2
    assert ((draws[:, 5] != 0) == (draws[:, 4] != 0)).all()  # anisotropy's angle and strength go together
    rotations = draws[:, 3][draws[:, 3] != 0]
    assert rotations.min() < -3 and rotations.max() > 3


def test_embedding_and_family_condition():
    torch.manual_seed(0)
    embedding = AugmentedClassEmbedding(torch.nn.Embedding(4, 6))
    ids = torch.tensor([0, 3, 2])
    params = torch.tensor([[1.0, 0, 0.5, 0.3, 0.2, 1.0, 0.1, -0.2], [0.0] * 8, [0, 1.0, 0, 0, 0, 0, 0, 0]])
    draws = StepDraws(torch.zeros(3, 1, 2, 2), torch.zeros(3).long(), torch.zeros(3).bool(), augment=params)
    family = ClassConditionalFamily()
    cond = family.condition(ids, None, draws)
    assert family.condition(ids) is ids
    weight = embedding.augment.weight
    for i in range(3):
        vector = augment_condition(params[i : i + 1])[0]
        expected = embedding.embedding.weight[ids[i]] + weight @ vector
        assert torch.allclose(embedding(cond)[i], expected, atol=1e-6)
    assert torch.equal(embedding(ids), embedding.embedding.weight[ids])
    holder = torch.nn.Sequential(embedding)
    assert isinstance(drop_augment_embedding(holder)[0], torch.nn.Embedding)


def tiny(tmp_path: Path, out: str, **overrides) -> list[str]:
    values = dict(ada_probability=0.5, lr_warmup_steps=1, output_dir=tmp_path / out)
    return digits_run_args(tmp_path, **{**values, **overrides})


@pytest.mark.parametrize("objective", ["cbdm", "oc"])
def test_ada_trains_with_cm_and_exports_a_plain_unet(tmp_path, objective):
    train_unet_cm.main(tiny(tmp_path, "out", objective=objective, focal_gamma=2, max_train_steps=3))
    out = tmp_path / "out"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["args"]["ada_probability"] == 0.5 and summary["args"]["focal_gamma"] == 2
    assert all(math.isfinite(v) for v in summary["final_losses"].values())
    unet = UNet2DModel.from_pretrained(out / "unet")  # a plain diffusers UNet: the ADA embedding is not exported
    assert isinstance(unet.class_embedding, torch.nn.Embedding)
    checkpoint = load_file(out / "checkpoint-2" / "model.safetensors")
    assert any("class_embedding.augment" in key for key in checkpoint)  # trained, checkpointed, resumed


def test_the_training_step_sees_augmented_images_and_trains_the_augment_embedding():
    unet = add_augment_embedding(make_tiny_unet2d(num_classes=3))
    objective = build_objective("ddpm", DDPMScheduler(num_train_timesteps=1000))
    seen = []

    def spy(pred, **inputs):
        seen.append(inputs["x0"])
        return objective(pred, **inputs)

    spy.target, spy.schedule = objective.target, objective.schedule
    denoiser = CMDenoiser(unet, capacity_manipulation=False, family=ClassConditionalFamily())
    step = family_step_loss(ClassConditionalFamily(), denoiser, spy, num_classes=3, cm=None)
    generator = torch.Generator().manual_seed(0)
    draws = draw_step(
        generator, 4, (3, 8, 8), label_dropout=0.0, objective=objective,
        augment_probability=1.0,
    )  # fmt: skip
    pixels = torch.rand(4, 3, 8, 8) * 2 - 1
    loss, _ = step({"pixel_values": pixels, "label": torch.tensor([0, 1, 2, 0])}, draws, 0)
    assert torch.equal(seen[0], augment_images(pixels, draws.augment)) and not torch.equal(seen[0], pixels)
    loss.backward()
    assert unet.class_embedding.augment.weight.grad.abs().sum() > 0


def test_ada_resume_is_exact(tmp_path):
    assert_unet_resume_is_exact(lambda name, **flags: tiny(tmp_path, name, **flags), tmp_path)


def test_ada_refuses_a_second_flip(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(train_unet_cm.main, tiny(tmp_path, "out", random_flip=True))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--random_flip" in err and "--ada_probability" in err
