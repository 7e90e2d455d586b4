"""train_text_to_image_cm.py end to end on a tiny Stable Diffusion and an ArtBench-format dataset, both built here.

The base pipeline has the real component types (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer from
a character vocabulary, PNDM scheduler as in SD v1) at toy sizes: 16 px images, 8 x 8 latents. The dataset is a local
parquet copy in the zguo0525/ArtBench mirror's format (label names in the mirror's non-alphabetical order).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import artbench_assets, run_python_without_capman, run_two_processes, text_to_image_args
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from peft import PeftModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

import capman_peft  # noqa: F401  (registers the CapMan tuner for PeftModel.from_pretrained)
import capman_peft.training.loop as training_loop
from capman_peft.errors import run_cli
from capman_peft.expert_use import EXPERT_USE_IMAGES
from capman_peft.families import pretrained, pretrained_output
from capman_peft.flags.fine_tuning import fine_tuning_parser
from capman_peft.testing import build_tiny_sd, make_tiny_sd_unet

ROOT = Path(__file__).resolve().parent.parent
import train_text_to_image_cm  # noqa: E402

# write_artbench_mirror: IR 4 keeps [4, 3, 2, 2, 2, 1, 1, 1, 1, 1] = 18 images
NUM_TRAIN = 18


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("sd-assets")
    return artbench_assets(root, build_tiny_sd(root))


def tiny_args(assets: SimpleNamespace, tmp_path: Path, out: str = "out", **overrides) -> list[str]:
    return text_to_image_args(assets.base, tmp_path / out, **{**assets.args, **overrides})


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_one_error_line(capsys, *fragments: str) -> None:
    """Exit code 1 was checked by the caller; stderr holds one error line, last, and no traceback (progress bars,
    which tqdm redraws with carriage returns, may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state and refuses another mixed precision in the same process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> SimpleNamespace:
    """Five steps (one epoch of 4 plus one, validation after the epoch), pushed to a patched Hub."""
    tmp = tmp_path_factory.mktemp("sd-train")
    uploads = []

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploads.append({**kwargs, "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))})

    with pytest.MonkeyPatch.context() as patch:
        import huggingface_hub

        patch.setattr(huggingface_hub, "create_repo", lambda repo_id, **_: SimpleNamespace(repo_id=repo_id))
        patch.setattr(huggingface_hub, "upload_folder", upload_folder)
        patch.setattr("capman_peft.hub.check_hub_upload", lambda *args: None)  # no Hub here
        args = tiny_args(
            assets,
            tmp,
            max_train_steps=5,
            validation_epochs=1,
            random_flip=True,
            push_to_hub=True,
            hub_model_id="someone/tiny-capman-sd",
        )
        train_text_to_image_cm.main(args)
    return SimpleNamespace(out=tmp / "out", uploads=uploads)


# ---------------------------------------------------------------------------------------------------------
# 1. The output: a merged StableDiffusionPipeline that samples, equal to base + adapter
# ---------------------------------------------------------------------------------------------------------


def test_output_is_a_stable_diffusion_pipeline_that_samples_with_ddim_and_dpm_solver(trained):
    out = trained.out
    names = {p.name for p in out.iterdir()}
    expected = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "adapter"}
    assert expected | {"README.md", "training_summary.json", "samples.png", "validation"} <= names
    assert (out / "validation" / "epoch-001.png").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    for scheduler in (DDIMScheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        images = pipe(
            "a realism painting",
            num_inference_steps=3,
            guidance_scale=1.5,
            generator=torch.manual_seed(0),
            output_type="np",
        ).images
        assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["class_counts"] == [4, 3, 2, 2, 2, 1, 1, 1, 1, 1] and summary["steps"] == 5
    assert summary["class_names"][1] == "baroque" and summary["prompts"][4] == "a post impressionism painting"
    assert "hub_token" not in summary["args"] and np.isfinite(summary["final_losses"]["loss"])


def assert_merged_equals_base_plus_adapter(out: Path, base_folder: Path) -> None:
    """The exported UNet computes what the base UNet with the saved adapter computes, and differs from the base."""
    merged = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    base = UNet2DConditionModel.from_pretrained(base_folder / "unet").eval()
    unmerged = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(base_folder / "unet"), out / "adapter")
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    torch.manual_seed(1)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 16)
    with torch.no_grad():
        expected = unmerged.eval()(x, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(merged(x, t, encoder_hidden_states=text).sample, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(x, t, encoder_hidden_states=text).sample, expected, atol=1e-4)


def test_merged_unet_equals_base_plus_adapter_and_training_moved_it(trained, assets):
    assert_merged_equals_base_plus_adapter(trained.out, assets.base)
    config = json.loads((trained.out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["mode"], config["r"], config["expert_r"]) == ("CAPMAN", "lora", 4, 2)
    assert config["base_model_name_or_path"] == str(assets.base)


@pytest.mark.parametrize(
    "overrides, adapter, loss_term",
    [
        ({"no_capacity_manipulation": True}, "LORA", "base_loss"),
        ({"objective": "cbdm"}, "CAPMAN", "cbdm_reg"),
        ({"objective": "oc"}, "CAPMAN", "oc_ref_changed"),
    ],
    ids=["lora-baseline", "cm-cbdm", "cm-oc"],
)
def test_lora_baseline_and_every_objective_train_and_export(assets, tmp_path, overrides, adapter, loss_term):
    train_text_to_image_cm.main(tiny_args(assets, tmp_path, max_train_steps=2, **overrides))
    out = tmp_path / "out"
    assert np.isfinite(json.loads((out / "training_summary.json").read_text())["final_losses"][loss_term])
    if adapter == "CAPMAN":
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == adapter
        assert_merged_equals_base_plus_adapter(out, assets.base)
        return
    # the baseline has no expert: no adapter/ (nothing for `capman-eval --expert off`), its LoRA as diffusers writes it
    assert not (out / "adapter").exists()
    pipe = StableDiffusionPipeline.from_pretrained(assets.base)
    pipe.load_lora_weights(out)
    pipe.fuse_lora()
    merged = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    torch.manual_seed(1)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(x, t, encoder_hidden_states=text).sample,
            pipe.unet.eval()(x, t, encoder_hidden_states=text).sample,
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.slow
def test_output_loads_and_samples_without_capman_peft(trained, tmp_path):
    code = (
        "import sys, torch\nfrom diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "images = pipe('a baroque painting', num_inference_steps=2, output_type='np').images\n"
        "assert type(pipe).__name__ == 'StableDiffusionPipeline' and images.shape == (1, 16, 16, 3)\nprint('ok')\n"
    )
    result = run_python_without_capman(code, [trained.out], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_model_card_names_base_license_data_and_cm_settings(trained):
    card = (trained.out / "README.md").read_text()
    header = card.split("---")[1]
    assert "license: creativeml-openrail-m" in header and "library_name: diffusers" in header
    assert "base_model:" not in header  # a local base folder is not a Hub id; the Hub would reject it
    assert "imb-artbench10" in card and "| 1 | baroque | 3 |" in card and "expert_rank=2" in card
    assert '"a realism painting"' in card and '"an ukiyo-e painting"' in card


def test_license_comes_from_the_flag_else_the_base_model_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- x\n---\n# base\n")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    settings = train_text_to_image_cm.parse_args(["--pretrained_model_name_or_path", str(tmp_path)])
    assert pretrained_output.base_model_license(settings) == "mit"

    def with_model(**changes):
        return dataclasses.replace(settings, model=dataclasses.replace(settings.model, **changes))

    assert pretrained_output.base_model_license(with_model(license="openrail")) == "openrail"
    elsewhere = with_model(pretrained_model_name_or_path=str(tmp_path / "elsewhere"))
    assert pretrained_output.base_model_license(elsewhere) == "creativeml-openrail-m"


def test_push_to_hub_uploads_the_lora_file_with_its_card(trained):
    (upload,) = trained.uploads
    assert upload["repo_id"] == "someone/tiny-capman-sd" and Path(upload["folder_path"]) == trained.out
    assert set(upload["allow_patterns"]) == {
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_general.safetensors",
        "README.md",
        "training_summary.json",
        "samples.png",
    }
    card = (trained.out / "README.md").read_text()
    assert "widget:" in card and "- text: a realism painting" in card
    assert 'pipe.load_lora_weights("someone/tiny-capman-sd")' in card
    assert "The LoRA mode's CM default has no quality measurement yet" in card


def test_push_merged_pipeline_uploads_the_whole_folder(tmp_path):
    from capman_peft.hub import push_to_hub

    uploads = []
    with pytest.MonkeyPatch.context() as patch:
        import huggingface_hub

        patch.setattr(huggingface_hub, "create_repo", lambda repo_id, **_: SimpleNamespace(repo_id=repo_id))
        patch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: uploads.append(kwargs))
        push_to_hub(tmp_path, "someone/x")
    assert "checkpoint-*" in uploads[0]["ignore_patterns"] and "allow_patterns" not in uploads[0]


@pytest.mark.slow
def test_lora_file_loads_into_the_base_pipeline_with_diffusers_alone(trained, assets, tmp_path):
    """base + load_lora_weights(out) (and fuse_lora) computes what the merged UNet computes, without capman_peft;
    the general-only file gives theta^g."""
    code = """
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
out, base = sys.argv[1], sys.argv[2]
merged = UNet2DConditionModel.from_pretrained(out + "/unet").eval()
torch.manual_seed(1)
x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 16)
def unet_of(pipe):
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=text).sample
with torch.no_grad():
    expected = merged(x, t, encoder_hidden_states=text).sample
pipe = StableDiffusionPipeline.from_pretrained(base)
plain = unet_of(pipe)
pipe.load_lora_weights(out)
torch.testing.assert_close(unet_of(pipe), expected, atol=1e-5, rtol=1e-5)
pipe.fuse_lora()
torch.testing.assert_close(unet_of(pipe), expected, atol=1e-5, rtol=1e-5)
general = StableDiffusionPipeline.from_pretrained(base)
general.load_lora_weights(out, weight_name="pytorch_lora_weights_general.safetensors")
g = unet_of(general)
assert (g - expected).abs().max() > 1e-6 and (g - plain).abs().max() > 1e-6
print("ok")
"""
    result = run_python_without_capman(code, [trained.out, assets.base], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_lora_factors_stack_the_general_and_expert_parts_exactly():
    """B @ A of the exported pair equals s_g B^g A^g + s_e B^e A^e, written out here for a Linear and a Conv2d."""
    from peft import get_peft_model

    from capman_peft import CapManConfig
    from capman_peft.pipelines import lora_state_dict

    cfg = CapManConfig(
        r=4, expert_r=2, lora_alpha=8, expert_alpha=3, init_lora_weights=False, target_modules=["to_q", "conv1"]
    )
    model = get_peft_model(make_tiny_sd_unet(), cfg)
    state = lora_state_dict(model)
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.resnets.0.conv1"):
        layer = model.get_base_model().get_submodule(name)
        a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        general = 2.0 * layer.capman_B["default"] @ layer.capman_A["default"].flatten(1)
        expert = 1.5 * layer.capman_expert_B["default"] @ layer.capman_expert_A["default"].flatten(1)
        assert a.shape[0] == 6
        torch.testing.assert_close(b.flatten(1) @ a.flatten(1), (general + expert).detach(), atol=1e-6, rtol=1e-5)
    assert len(lora_state_dict(model, include_expert=False)["up_blocks.0.resnets.0.conv1.lora_A.weight"]) == 4


def test_a_lora_file_with_experts_on_some_layers_has_one_rank_and_the_same_products():
    """Experts on conv1 only: its pair has rank 6, to_q's rank 4. The file pads to_q to rank 6 with zeros, so a loader
    that takes one alpha (= the first module's rank) for the file scales every module by 1; B A is unchanged."""
    from peft import get_peft_model

    from capman_peft import CapManConfig
    from capman_peft.pipelines import lora_state_dict, uniform_rank

    cfg = CapManConfig(
        r=4, expert_r=2, init_lora_weights=False, target_modules=["to_q", "conv1"], expert_target_modules=["conv1"]
    )
    state = lora_state_dict(get_peft_model(make_tiny_sd_unet(), cfg))
    ranks = {k: v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    assert set(ranks.values()) == {4, 6}  # mixed before
    padded = uniform_rank(state)
    assert {v.shape[0] for k, v in padded.items() if k.endswith("lora_A.weight")} == {6}
    for key in ranks:
        b_key = key.replace("lora_A", "lora_B")
        before = state[b_key].flatten(1) @ state[key].flatten(1)
        after = padded[b_key].flatten(1) @ padded[key].flatten(1)
        assert torch.equal(before, after), key
        assert padded[b_key].shape[2:] == state[b_key].shape[2:] and padded[key].shape[1:] == state[key].shape[1:]


# ---------------------------------------------------------------------------------------------------------
# 2. Work done once
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def counters(monkeypatch) -> SimpleNamespace:
    """Rows through the text encoder and images through the VAE encoder, over a whole run."""
    counts = SimpleNamespace(prompts=0, encoded=0)
    text_forward, vae_encode = CLIPTextModel.forward, AutoencoderKL.encode

    def counting_text_forward(self, input_ids=None, *args, **kwargs):
        counts.prompts += input_ids.shape[0]
        return text_forward(self, input_ids, *args, **kwargs)

    def counting_encode(self, x, *args, **kwargs):
        counts.encoded += x.shape[0]
        return vae_encode(self, x, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", counting_text_forward)
    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    return counts


def test_text_encoder_runs_once_per_prompt_and_cached_latents_once_per_image_and_flip(assets, tmp_path, counters):
    """Five steps across an epoch boundary with a validation grid: 11 prompts (10 classes + the empty prompt) are
    encoded once; with --cache_latents each of the 18 images is VAE-encoded once per flip state, never in the loop.
    Encoding per batch instead gives the same training (same flips and posterior noise), at 4 encodes per step. The
    end-of-training expert-use check encodes its fixed batch once (16 images per class)."""
    run = dict(max_train_steps=5, validation_epochs=1, random_flip=True, center_crop=True)
    check = 10 * EXPERT_USE_IMAGES
    train_text_to_image_cm.main(tiny_args(assets, tmp_path, "cached", cache_latents=True, **run))
    assert (counters.prompts, counters.encoded) == (11, 2 * NUM_TRAIN + check)
    counters.prompts = counters.encoded = 0
    train_text_to_image_cm.main(tiny_args(assets, tmp_path, "per-batch", **run))
    assert (counters.prompts, counters.encoded) == (11, 5 * 4 + check)
    cached, per_batch = adapter_weights(tmp_path / "cached"), adapter_weights(tmp_path / "per-batch")
    for key in cached:
        torch.testing.assert_close(cached[key], per_batch[key], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# 3. Resume, mixed precision, gradient accumulation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_is_exact_across_an_epoch_boundary(assets, tmp_path):
    """6 steps straight == 3 steps, then resume from checkpoint-3 (mid-epoch: 4 steps per epoch) to 6. Adapter and
    caption dropout stay on: their randomness is seeded per step too. Center crops: a random crop (only for images
    larger than --resolution) comes from the data loader's RNG, which a resumed run does not replay."""
    train_text_to_image_cm.main(
        tiny_args(assets, tmp_path, "straight", max_train_steps=6, random_flip=True, center_crop=True)
    )
    resumed = dict(checkpointing_steps=3, random_flip=True, center_crop=True)
    train_text_to_image_cm.main(tiny_args(assets, tmp_path, "resumed", max_train_steps=3, **resumed))
    assert (tmp_path / "resumed" / "checkpoint-3" / "model.safetensors").is_file()
    train_text_to_image_cm.main(
        tiny_args(assets, tmp_path, "resumed", max_train_steps=6, resume_from_checkpoint="latest", **resumed)
    )
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_holds_only_the_adapter(assets, tmp_path):
    train_text_to_image_cm.main(tiny_args(assets, tmp_path, max_train_steps=1, checkpointing_steps=1))
    saved = load_file(tmp_path / "out" / "checkpoint-1" / "model.safetensors")
    assert saved and all("capman_" in name for name in saved)


def test_bf16_keeps_frozen_weights_in_bf16_and_adapters_in_fp32(assets, tmp_path, monkeypatch, fresh_accelerate_state):
    seen = []
    real_loss = training_loop.diffusion_loss

    def recording(denoiser, *args, **kwargs):
        params = list(denoiser.parameters())
        seen.append(({p.dtype for p in params if not p.requires_grad}, {p.dtype for p in params if p.requires_grad}))
        return real_loss(denoiser, *args, **kwargs)

    reported = []
    real_report = train_text_to_image_cm.summarize_expert_use

    def recording_report(model, *args, **kwargs):
        reported.append(({p.dtype for p in model.parameters()}, torch.is_autocast_enabled("cpu")))
        return real_report(model, *args, **kwargs)

    monkeypatch.setattr(training_loop, "diffusion_loss", recording)
    monkeypatch.setattr(train_text_to_image_cm, "summarize_expert_use", recording_report)
    train_text_to_image_cm.main(
        tiny_args(assets, tmp_path, max_train_steps=4, mixed_precision="bf16", validation_epochs=1)
    )
    assert seen and all(s == ({torch.bfloat16}, {torch.float32}) for s in seen)
    # The expert-use report measures the float32 export, outside autocast: no bf16 rounding floor in its distances.
    assert reported == [({torch.float32}, False)]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["steps"] == 4 and np.isfinite(summary["final_losses"]["loss"])
    assert UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").dtype == torch.float32


def test_two_accumulated_half_batches_equal_one_full_batch(assets, tmp_path):
    """Optimizer steps of 2 x 2 accumulated == steps of 1 x 4 (two steps: in the first the fresh expert is zero, so
    only the second has a CM gradient). Valid because a step's noise, timesteps, flips and posterior noise are drawn
    per sample of the step (sample j gets row j in both settings), the data order does not depend on the batch size,
    and every loss term is a per-sample mean. Dropout is off: its masks depend on the micro-batch shapes. (Drawing
    per micro-batch instead makes the weights differ by ~2e-3 here.) theta^g runs on every row: a partial general
    pass draws its rows per micro-batch, equal only in expectation. The paper form, smooth at d = 0: the hinge's
    gradient there points along the float-level gap between theta and theta^g, which 2 x 2 and 1 x 4 round
    differently (measured: one element in 32 off by 2e-5)."""
    same = dict(
        max_train_steps=2,
        lora_dropout=0,
        caption_dropout=0,
        random_flip=True,
        center_crop=True,
        cm_general_fraction=1,
        cm_form="paper",
        allow_unbounded_cm=True,
    )
    train_text_to_image_cm.main(tiny_args(assets, tmp_path, "full", train_batch_size=4, **same))
    train_text_to_image_cm.main(
        tiny_args(assets, tmp_path, "accumulated", train_batch_size=2, gradient_accumulation_steps=2, **same)
    )
    full, accumulated = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "accumulated")
    moved = 0
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], atol=1e-6, rtol=1e-5)
        moved += int(full[key].abs().sum() > 0 and "_B" in key)
    assert moved > 0


# ---------------------------------------------------------------------------------------------------------
# 4. Flags and bad input: one clear line, exit code 1
# ---------------------------------------------------------------------------------------------------------


def test_defaults_are_the_paper_recipe(assets):
    base = ["--pretrained_model_name_or_path", str(assets.base)]  # the default, miniSD, is on the Hub
    parser = fine_tuning_parser(None)
    assert parser.get_default("pretrained_model_name_or_path") == "lambdalabs/miniSD-diffusers"
    settings = train_text_to_image_cm.parse_args(base)
    sd, optimization, objective = settings.model, settings.optimization, settings.objective
    assert sd.family == "stable-diffusion" and settings.data.resolution == 256
    assert (sd.rank, sd.expert_rank, sd.lora_dropout) == (128, 8, 0.1)
    assert (optimization.learning_rate, optimization.adam_weight_decay) == (3e-4, 1e-6)
    assert (optimization.train_batch_size, optimization.num_train_epochs) == (64, 100)
    assert (objective.objective, optimization.use_ema, optimization.lr_warmup_steps) == ("ddpm", False, 0)
    assert objective.label_dropout == 0.1
    # the template is the dataset's own ("a {} painting" for ArtBench), resolved with the settings
    assert settings.data.dataset == "imb-artbench10" and sd.prompt_template == "a {} painting"
    assert (objective.cm_general_fraction, objective.cm_form, objective.cm_forward) == (0.25, "relative", "fused")
    config = pretrained.adapter_config(settings)
    assert (config.r, config.lora_alpha, config.expert_r) == (128, 128, 8)
    assert config.target_modules == {"to_q", "to_k", "to_v", "to_out.0"}
    assert train_text_to_image_cm.parse_args([*base, "--caption_dropout", "0.2"]).objective.label_dropout == 0.2
    template = train_text_to_image_cm.parse_args([*base, "--prompt_template", "a {} photo"]).model.prompt_template
    assert template == "a {} photo"


def test_caption_dropout_is_accepted_in_a_recipe(tmp_path, assets):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"caption_dropout: 0.05\nrank: 64\npretrained_model_name_or_path: {assets.base}\n")
    settings = train_text_to_image_cm.parse_args(["--config", str(recipe)])
    assert (settings.objective.label_dropout, settings.model.rank) == (0.05, 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dataset": "imb-nope"}, "imb-nope"),
        ({"resolution": 12}, "multiple of 8"),
        ({"push_to_hub": True}, "--hub_model_id"),
        ({"use_8bit_adam": True}, "bitsandbytes"),
        ({"enable_xformers_memory_efficient_attention": True}, "xformers"),
        ({"prompt_template": "a painting"}, "{}"),
        ({"expert_rank": 4}, "expert_rank"),
    ],
)
def test_bad_input_exits_with_one_clear_line(assets, tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_text_to_image_cm.main, tiny_args(assets, tmp_path, **overrides))
    assert exit_info.value.code != 0
    assert_one_error_line(capsys, message)


def test_base_model_missing_a_component_is_named(assets, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(assets.base, broken, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_text_to_image_cm.main, tiny_args(assets, tmp_path, pretrained_model_name_or_path=broken))
    assert exit_info.value.code == 1
    assert_one_error_line(capsys, "text_encoder")


def test_non_finite_loss_stops_with_the_step_and_term(assets, tmp_path, capsys, monkeypatch):
    real_loss = training_loop.diffusion_loss

    def poisoned(*args, **kwargs):
        loss, logs = real_loss(*args, **kwargs)
        logs["cm_diversity"] = torch.tensor(float("nan"))
        return loss, logs

    monkeypatch.setattr(training_loop, "diffusion_loss", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_text_to_image_cm.main, tiny_args(assets, tmp_path))
    assert exit_info.value.code == 1
    assert_one_error_line(capsys, "step 1", "cm_diversity")


@pytest.mark.slow
def test_two_process_launch_writes_one_pipeline(assets, tmp_path):
    args = tiny_args(assets, tmp_path, train_batch_size=2, max_train_steps=3, checkpointing_steps=3, cache_latents=True)
    result = run_two_processes(ROOT / "train_text_to_image_cm.py", args, ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    assert (tmp_path / "out" / "checkpoint-3" / "model.safetensors").is_file()
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path / "out"), StableDiffusionPipeline)
