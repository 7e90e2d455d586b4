"""Latent text-to-image from scratch (paper sec. G.11): the CUB-200-2011 and Oxford-102 copies with their per-image
descriptions, one description drawn per step, and train_text_to_image_cm.py training a UNet2DConditionModel from a
config in a frozen VAE's latent space, with CM in full mode on the up path, into a plain StableDiffusionPipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    assert_prompted_output_samples_without_capman,
    assert_resume_is_exact,
    text_to_image_args,
)
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import train_text_to_image_cm
from capman_peft.data import chosen_captions, load_imbalanced_dataset, load_reference_dataset
from capman_peft.errors import ConfigError
from capman_peft.families.stable_diffusion import SCRATCH_EXPERT_TARGETS
from capman_peft.randomness import draw_step
from capman_peft.testing import build_tiny_sd, described, write_cub_copy, write_oxford102_copy

ROOT = Path(__file__).resolve().parents[1]

# A UNet2DConditionModel the tiny SD base's VAE (4 latent channels) and text encoder (width 16) fit.
TINY_SCRATCH_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 16,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("scratch")
    config = root / "unet.json"
    config.write_text(json.dumps(TINY_SCRATCH_UNET))
    return build_tiny_sd(root / "sd"), write_cub_copy(root), config


def scratch_args(assets, out, **overrides):
    base, cub, config = assets
    flags = dict(dataset="imb-cub200", train_data_dir=cub, imbalance_ratio=None, model_config_name_or_path=config)
    flags.update(rank=None, expert_rank=None)  # the LoRA flags stay unset from scratch
    flags.update(capacity_manipulation=True)  # off by default from scratch
    return text_to_image_args(base, out, **{**flags, **overrides})


def test_cub_copy_gives_classes_splits_images_and_their_descriptions(tmp_path):
    folder = write_cub_copy(tmp_path, train_counts=(3, 2))
    train = load_imbalanced_dataset("imb-cub200", imbalance_ratio=None, resolution=16, train_data_dir=folder)
    assert train.class_names == ["Bird kind 0", "Bird kind 1"]  # "001.Bird_kind_0" without its number
    # images.txt numbers class 0's images 1-4 (4 the test one) and class 1's 5-7 (7 the test one)
    expected = {1: 0, 2: 0, 3: 0, 5: 1, 6: 1}
    numbers = [int(re.search(r"number (\d+)$", caption.split("\n")[0]).group(1)) for caption in train.captions]
    assert sorted(numbers) == sorted(expected)
    for i, number in enumerate(numbers):
        item = train[i]
        assert item["label"] == expected[number] and item["caption"] == "\n".join(described(number))
        grey = (item["pixel_values"].mean().item() + 1) / 2 * 255  # the image is the description's own
        assert abs(grey - 10 * number) < 3
    test = load_reference_dataset("imb-cub200", resolution=16, train_data_dir=folder)
    levels = sorted(round(((test[i]["pixel_values"].mean().item() + 1) / 2 * 255) / 10) for i in range(len(test)))
    assert sorted(test.labels) == [0, 1] and levels == [4, 7]  # the test images: 4 of class 0, 7 of class 1


def test_oxford102_copy_gives_its_labels_splits_and_torchvision_names(tmp_path):
    folder = write_oxford102_copy(tmp_path)
    train = load_imbalanced_dataset("imb-oxford102", imbalance_ratio=None, resolution=16, train_data_dir=folder)
    assert len(train.class_names) == 102 and train.class_names[0] == "pink primrose"
    # trnid and tstid train: images 3c+1 and 3c+3 of class c; valid (3c+2) is the reference
    numbers = sorted(int(caption.split("\n")[0].rsplit(" ", 1)[1]) for caption in train.captions)
    assert numbers == sorted([3 * c + 1 for c in range(102)] + [3 * c + 3 for c in range(102)])
    assert np.bincount(train.labels).tolist() == [2] * 102
    reference = load_reference_dataset("imb-oxford102", resolution=16, train_data_dir=folder)
    assert len(reference) == 102 and sorted(reference.labels) == list(range(102))


def test_a_missing_description_or_copy_is_one_error_naming_the_flag(tmp_path):
    folder = write_cub_copy(tmp_path)
    next((folder / "text_c10").rglob("*.txt")).unlink()
    with pytest.raises(ConfigError, match=r"--train_data_dir .*no description for 1 of the 12 images"):
        load_imbalanced_dataset("imb-cub200", imbalance_ratio=None, train_data_dir=folder)
    with pytest.raises(ConfigError, match=r"--dataset imb-oxford102: is read from a local copy"):
        load_imbalanced_dataset("imb-oxford102", imbalance_ratio=None)


def test_each_row_trains_on_the_description_its_draw_picks():
    captions = ["a\nb\nc", "only one", "x\ny"]
    # line floor(u * lines): u = 0.34 of three lines is the second, 0.99 of one is the only, 0.5 of two the second
    assert chosen_captions(captions, torch.tensor([0.34, 0.99, 0.5])) == ["b", "only one", "y"]
    assert chosen_captions(captions, torch.tensor([0.0, 0.0, 0.49])) == ["a", "only one", "x"]
    assert chosen_captions(captions, None) == ["a", "only one", "x"]  # no step (report, evaluation): the first


def test_the_caption_draw_leaves_every_other_draw_as_it_was():
    class Schedule:
        def draw_timesteps(self, n, generator, device):
            return torch.randint(0, 1000, (n,), generator=generator, device=device)

    class Objective:
        schedule = Schedule()

        def extra_labels(self, labels, generator):
            return None

    def draws(caption_draw):
        generator = torch.Generator().manual_seed(3)
        return draw_step(
            generator, 5, (4, 8, 8), label_dropout=0.1, objective=Objective(), flip=True, latent_noise=True,
            caption_draw=caption_draw,
        )  # fmt: skip

    with_captions, without = draws(True), draws(False)
    for name in ("noise", "timesteps", "label_dropped", "flip", "latent_noise"):
        assert torch.equal(getattr(with_captions, name), getattr(without, name))
    assert without.caption_draw is None and ((with_captions.caption_draw >= 0) & (with_captions.caption_draw < 1)).all()


def test_from_scratch_cm_trains_the_whole_unet_with_an_up_path_expert_into_a_plain_pipeline(assets, tmp_path):
    out = tmp_path / "cm"
    train_text_to_image_cm.main(scratch_args(assets, out, cm_forward="shared_prefix"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["args"]["expert_target_modules"] == SCRATCH_EXPERT_TARGETS
    card = (out / "README.md").read_text()
    assert "\n# cm\n" in card and "mode=full" in card and "trained from scratch" in card  # named as its folder
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # no base UNet for a LoRA file to apply to
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.sample_size == 8 and unet.config.cross_attention_dim == 16  # 16 px over the VAE's factor 2
    # every weight trained: the down path (no expert) moved away from the seed's initial weights too
    torch.manual_seed(0)
    initial = UNet2DConditionModel.from_config(unet.config)
    for name in ("down_blocks.0.resnets.0.conv1.weight", "conv_in.weight", "up_blocks.1.resnets.0.conv1.weight"):
        assert not torch.equal(unet.state_dict()[name], initial.state_dict()[name]), name
    # the adapter: experts exactly on the up path's weight matrices
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    experts = {key.removeprefix("base_model.model.").split(".capman_expert_A")[0] for key in adapter}
    experts = {name for name in experts if f"base_model.model.{name}.capman_expert_A" in adapter}
    matrices = (torch.nn.Linear, torch.nn.Conv2d)
    wanted = {n for n, m in initial.named_modules() if n.startswith("up_blocks.") and isinstance(m, matrices)}
    assert experts == wanted and len(wanted) == 41  # resnets, transformer blocks, upsampler: paper G.1
    assert_prompted_output_samples_without_capman(out, "StableDiffusionPipeline", tmp_path)


def test_cm_is_off_by_default_from_scratch_and_on_when_fine_tuning(assets, tmp_path):
    base = assets[0]
    default = train_text_to_image_cm.parse_args(scratch_args(assets, tmp_path / "a", capacity_manipulation=False))
    fine_tuning = train_text_to_image_cm.parse_args(text_to_image_args(base, tmp_path / "b"))
    assert not default.objective.capacity_manipulation and fine_tuning.objective.capacity_manipulation
    assert default.flags()["capacity_manipulation"] is False  # recorded resolved, as training_summary.json has it
    recipe = tmp_path / "on.yaml"  # a recipe turns it on as the command line does
    recipe.write_text("capacity_manipulation: true\n")
    argv = ["--config", str(recipe), *scratch_args(assets, tmp_path / "c", capacity_manipulation=False)]
    assert train_text_to_image_cm.parse_args(argv).objective.capacity_manipulation


def test_from_scratch_baseline_trains_the_whole_unet_without_an_adapter(assets, tmp_path):
    out = tmp_path / "plain"
    train_text_to_image_cm.main(scratch_args(assets, out, capacity_manipulation=False))  # the default from scratch
    assert not (out / "adapter").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    torch.manual_seed(0)
    initial = UNet2DConditionModel.from_config(unet.config)
    assert not torch.equal(unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"],
                           initial.state_dict()["down_blocks.0.resnets.0.conv1.weight"])  # fmt: skip


def test_from_scratch_resume_is_exact(assets, tmp_path):
    assert_resume_is_exact(lambda out, **flags: scratch_args(assets, out, **flags), tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rank=8), r"--rank 8: sets the LoRA adapter"),
        (dict(model_config_name_or_path=None, expert_rank_ratio=0.2), r"--expert_rank_ratio 0.2: sizes the expert"),
        (dict(caption_column="text"), r"--caption_column text: --dataset imb-cub200 brings its own"),
        (dict(objective="cbdm"), r"--dataset imb-cub200: CBDM conditions each image"),
    ],
)
def test_from_scratch_flag_errors_name_the_flag(assets, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_text_to_image_cm.parse_args(scratch_args(assets, tmp_path / "out", **overrides))


def test_a_lora_flag_set_by_a_recipe_is_refused_from_scratch_too(assets, tmp_path):
    # a recipe's values become the parser's defaults: the check compares with the script's own default instead
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rank: 8\n")
    with pytest.raises(ConfigError, match=r"--rank 8: sets the LoRA adapter"):
        train_text_to_image_cm.parse_args(["--config", str(recipe), *scratch_args(assets, tmp_path / "out")])


def test_a_config_that_does_not_fit_the_base_is_refused_before_any_work(assets, tmp_path):
    config = tmp_path / "wide.json"
    config.write_text(json.dumps({**TINY_SCRATCH_UNET, "cross_attention_dim": 32}))
    with pytest.raises(ConfigError, match=r"--model_config_name_or_path .*'cross_attention_dim': 32.* = 16"):
        train_text_to_image_cm.parse_args(scratch_args(assets, tmp_path / "out", model_config_name_or_path=config))


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "latent").glob("*.yaml")), ids=lambda p: p.stem)
def test_table_g11_recipes_parse_and_their_unet_has_vq_diffusion_s_size(recipe, assets, tmp_path):
    base, cub, config = assets
    flags = yaml.safe_load(recipe.read_text())
    unet_config = json.loads((ROOT / flags["model_config_name_or_path"]).read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    assert 30e6 < sum(p.numel() for p in unet.parameters()) < 40e6  # VQ-Diffusion-S: 34 M
    assert unet.config.cross_attention_dim == 768  # miniSD's CLIP ViT-L/14 text encoder
    # the recipe's other flags parse (on the tiny base, whose text encoder needs the tiny UNet)
    folder = cub if "cub" in recipe.stem else write_oxford102_copy(tmp_path)
    settings = train_text_to_image_cm.parse_args([
        "--config", str(recipe), "--pretrained_model_name_or_path", str(base), "--model_config_name_or_path",
        str(config), "--train_data_dir", str(folder), "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    assert settings.objective.capacity_manipulation == recipe.stem.endswith("_cm")
    assert settings.model.unet_config is not None and settings.data.imbalance_ratio == 10


def test_capman_eval_measures_theta_and_theta_g_of_a_from_scratch_output(assets, tmp_path, caplog):
    from test_evaluation import TINY  # registers the tiny feature extractor

    from capman_peft.evaluation.cli import main as evaluate

    base, _, config = assets
    cub = write_cub_copy(tmp_path, train_counts=(6, 5, 4, 3, 2, 2))  # two classes, two test images per split
    out = tmp_path / "cm"
    # without caption drop, as the recipes train: guidance has no unconditional prediction to extrapolate from
    train_text_to_image_cm.main(scratch_args((base, cub, config), out, cm_forward="shared_prefix", caption_dropout=0))
    evaluate([
        "--pipeline", str(out), "--dataset", "imb-cub200", "--train_data_dir", str(cub), "--num_images_per_class", "1",
        "--reference_images_per_class", "1", "--steps", "2", "--batch_size", "4", "--feature_extractor", TINY,
        "--metrics", "fid", "--expert", "both", "--output_dir", str(tmp_path / "eval"),
    ])  # fmt: skip
    assert "guidance 1.5 extrapolates from it (pass --guidance_scale 1" in caplog.text
    for label, expert in (("cm", "on"), ("cm-general", "off")):  # θ, and θ^g built from adapter/ (full mode)
        metrics = json.loads((tmp_path / "eval" / label / "metrics.json").read_text())
        assert metrics["expert"] == expert and metrics["kind"] == "text-to-image"
        assert all(np.isfinite(metrics["splits"][split]["fid"]) for split in ("many", "medium", "few"))
