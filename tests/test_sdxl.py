"""Stable Diffusion XL through train_text_to_image_cm.py, on a tiny SDXL built from configs (two CLIP text encoders,
the second with a projection; a UNet with SDXL's pooled-text and time-id conditions) and the ArtBench-format data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    assert_accumulation_equals_one_batch,
    assert_capman_eval_and_analyze_run,
    assert_prompted_output_samples_without_capman,
    assert_resume_is_exact,
    family_args,
    family_fixtures,
    run_python_without_capman,
)
from PIL import Image
from torchvision import transforms

import train_text_to_image_cm  # noqa: E402
from capman_peft.data import ImageTransform
from capman_peft.errors import run_cli
from capman_peft.families.stable_diffusion import StableDiffusionXLFamily
from capman_peft.testing import build_tiny_sdxl

assets, trained = family_fixtures(build_tiny_sdxl)


def test_the_output_is_an_sdxl_pipeline_that_loads_and_samples_without_capman_peft(trained, tmp_path):
    assert json.loads((trained / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["args"]["family"] == "stable-diffusion-xl" and summary["steps"] == 3
    assert_prompted_output_samples_without_capman(trained, "StableDiffusionXLPipeline", tmp_path)


@pytest.mark.slow
def test_the_lora_file_loads_into_the_base_sdxl_pipeline_with_diffusers_alone(trained, assets, tmp_path):
    """base + StableDiffusionXLPipeline.load_lora_weights(out), with and without fuse_lora, computes what the merged
    UNet computes (SDXL's added conditions included)."""
    code = """
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
out, base = sys.argv[1], sys.argv[2]
merged = UNet2DConditionModel.from_pretrained(out + "/unet").eval()
torch.manual_seed(1)
x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.tensor([[16.0, 18, 0, 1, 16, 16]] * 2)}
def unet_of(unet):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
expected = unet_of(merged)
pipe = StableDiffusionXLPipeline.from_pretrained(base)
plain = unet_of(pipe.unet)
pipe.load_lora_weights(out)
torch.testing.assert_close(unet_of(pipe.unet), expected, atol=1e-5, rtol=1e-5)
pipe.fuse_lora()
torch.testing.assert_close(unet_of(pipe.unet), expected, atol=1e-5, rtol=1e-5)
assert (plain - expected).abs().max() > 1e-6
print("ok")
"""
    result = run_python_without_capman(code, [trained, assets.base], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_capman_eval_and_capman_analyze_run_on_an_sdxl_output(trained, assets, tmp_path):
    """θ and θ^g (from the adapter) generate per-class prompts and are measured per split; the analyses encode the
    class prompts with both text encoders."""
    assert_capman_eval_and_analyze_run(trained, assets, tmp_path)


def test_time_ids_of_cached_latents_are_the_original_size_the_center_crop_and_the_target(assets):
    """A batch without crop positions (the latent cache: center crops). Written out with torchvision: resize the
    shorter side to 16, center-crop 16; the crop's top-left is where the crop's first pixel sits in the resized
    image."""
    family = StableDiffusionXLFamily(vae=None, cond_table=torch.zeros(3, 77, 32), pooled_table=None, resolution=16)
    sizes = [(16, 18), (40, 21), (16, 16), (33, 50)]
    expected = []
    for height, width in sizes:
        image = Image.new("L", (width, height))
        resized = transforms.Resize(16)(image)
        top = int(round((resized.height - 16) / 2.0))
        left = int(round((resized.width - 16) / 2.0))
        expected.append([height, width, top, left, 16, 16])
    batch = {"original_size": torch.tensor(sizes)}
    torch.testing.assert_close(family.time_ids(batch, 4, torch.device("cpu")), torch.tensor(expected).float())
    assert family.time_ids(None, 2, torch.device("cpu")).tolist() == [[16, 16, 0, 0, 16, 16]] * 2


def test_resume_is_exact(assets, tmp_path):
    assert_resume_is_exact(lambda out, **flags: family_args(assets, out, **flags), tmp_path)


def test_two_accumulated_half_batches_equal_one_full_batch(assets, tmp_path):
    assert_accumulation_equals_one_batch(lambda out, **flags: family_args(assets, out, **flags), tmp_path)


def test_a_random_crop_is_where_the_pixels_come_from_and_what_the_time_ids_say(assets, tmp_path):
    """Without --center_crop each image is cropped at a random position (RandomCrop's draw), and its time ids carry
    that position, as diffusers' SDXL script records it. Written out with torchvision: the pixels are the resized
    image's 16 x 16 window at (top, left)."""
    rng = np.random.default_rng(0)
    family = StableDiffusionXLFamily(vae=None, cond_table=torch.zeros(3, 77, 32), pooled_table=None, resolution=16)
    transform = ImageTransform(16)
    for height, width in [(40, 21), (16, 33)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        resized = transforms.functional.to_tensor(transforms.Resize(16)(image)) * 2 - 1
        corners = set()
        for seed in range(8):
            torch.manual_seed(seed)
            pixels, (top, left) = transform(image)
            torch.testing.assert_close(pixels, resized[:, top : top + 16, left : left + 16], atol=1e-6, rtol=0)
            batch = {"original_size": torch.tensor([[height, width]]), "crop_top_left": torch.tensor([[top, left]])}
            expected = [[height, width, top, left, 16, 16]]
            assert family.time_ids(batch, 1, torch.device("cpu")).tolist() == expected
            corners.add((top, left))
        assert len(corners) > 1  # the position is drawn, not fixed
    train_text_to_image_cm.main(family_args(assets, tmp_path / "random-crop", center_crop=False, max_train_steps=1))
    assert (tmp_path / "random-crop" / "model_index.json").is_file()


def test_other_pipelines_are_refused(assets, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(SystemExit):
        run_cli(train_text_to_image_cm.main, family_args(assets, tmp_path / "o", pretrained_model_name_or_path=other))
    err = capsys.readouterr().err
    assert "is a KandinskyPipeline; allowed: StableDiffusionPipeline, StableDiffusionXLPipeline" in err


def test_the_default_resolution_is_the_family_s(assets, tmp_path):
    settings = train_text_to_image_cm.parse_args(
        ["--pretrained_model_name_or_path", str(assets.base), "--center_crop", "--output_dir", str(tmp_path / "o")]
    )
    assert settings.model.family == "stable-diffusion-xl" and settings.data.resolution == 1024
