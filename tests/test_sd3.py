"""Stable Diffusion 3 through train_text_to_image_cm.py, on a tiny SD3 built from configs (an MMDiT transformer, two
CLIP encoders with projections and T5, the flow-matching scheduler) and the ArtBench-format data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    assert_accumulation_equals_one_batch,
    assert_capman_eval_and_analyze_run,
    assert_lora_files_give_the_merged_transformer,
    assert_prompted_output_samples_without_capman,
    assert_resume_is_exact,
    family_args,
    family_fixtures,
)
from diffusers import StableDiffusion3Pipeline

import train_text_to_image_cm  # noqa: E402
from capman_peft.errors import run_cli
from capman_peft.families import StableDiffusion3Family, family_of_pipeline
from capman_peft.objective import build_objective, diffusion_loss
from capman_peft.randomness import draw_step
from capman_peft.testing import build_tiny_flux, build_tiny_sd3

assets, trained = family_fixtures(build_tiny_sd3)


def test_a_training_batch_is_the_rectified_flow_loss(assets):
    """One batch's loss without CM, written out: σ from SD3's shifted table at the drawn index, x_t = (1 − σ)·x0 +
    σ·ε, the transformer given σ·1000 and the prompt's joint and pooled embeddings, the target ε − x0."""
    pipe = StableDiffusion3Pipeline.from_pretrained(assets.base)
    family = family_of_pipeline(pipe, ["a baroque painting", "a realism painting", ""])
    objective = build_objective("ddpm", pipe.scheduler)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0])
    draws = draw_step(torch.Generator().manual_seed(1), 3, (4, 8, 8), label_dropout=0.0, objective=objective)
    from capman_peft.denoiser import CMDenoiser

    denoiser = CMDenoiser(pipe.transformer, capacity_manipulation=False, family=family)
    with torch.no_grad():
        loss, _ = diffusion_loss(
            denoiser, objective, x0, labels, num_classes=2, cm=None, draws=draws, condition=family.condition
        )
    u = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    sigma = (3 * u / (1 + 2 * u))[draws.timesteps].float().reshape(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * draws.noise
    hidden, _, pooled, _ = pipe.encode_prompt(
        ["a baroque painting", "a realism painting", "a baroque painting"], None, None,
        do_classifier_free_guidance=False, max_sequence_length=77,
    )  # fmt: skip
    with torch.no_grad():
        pred = pipe.transformer(
            hidden_states=x_t, timestep=sigma.flatten() * 1000, encoder_hidden_states=hidden, pooled_projections=pooled
        ).sample
    torch.testing.assert_close(loss, (pred - (draws.noise - x0)).pow(2).mean(), rtol=1e-4, atol=1e-5)


def test_the_output_is_an_sd3_pipeline_that_loads_and_samples_without_capman_peft(trained, tmp_path):
    assert json.loads((trained / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["args"]["family"] == "stable-diffusion-3" and summary["steps"] == 3
    assert summary["args"]["target_modules"].startswith("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj")
    scheduler = json.loads((trained / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    assert_prompted_output_samples_without_capman(trained, "StableDiffusion3Pipeline", tmp_path)


@pytest.mark.slow
def test_the_lora_files_load_into_the_base_sd3_pipeline_with_diffusers_alone(trained, assets, tmp_path):
    """base + StableDiffusion3Pipeline.load_lora_weights(out), with and without fuse_lora, computes what the merged
    transformer computes; the general file gives another model (θ^g)."""
    call = """
x, t, text, pooled = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 90, 32), torch.randn(2, 32)
def run(model):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample
"""
    assert_lora_files_give_the_merged_transformer(
        trained, assets.base, tmp_path, "StableDiffusion3Pipeline", "SD3Transformer2DModel", call
    )


@pytest.mark.slow
def test_capman_eval_and_capman_analyze_run_on_an_sd3_output(trained, assets, tmp_path):
    """θ and θ^g sample the class prompts with the saved flow-matching scheduler and are measured per split."""
    assert_capman_eval_and_analyze_run(trained, assets, tmp_path)


def test_resume_is_exact(assets, tmp_path):
    assert_resume_is_exact(lambda out, **flags: family_args(assets, out, **flags), tmp_path)


def test_two_accumulated_half_batches_equal_one_full_batch(assets, tmp_path):
    assert_accumulation_equals_one_batch(lambda out, **flags: family_args(assets, out, **flags), tmp_path)


def test_flags_that_do_not_apply_are_refused_before_any_work(assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(train_text_to_image_cm.main, family_args(assets, tmp_path / "o", snr_gamma=5.0))
    assert "--snr_gamma 5.0: min-SNR weighting is for DDPM schedules" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    settings = train_text_to_image_cm.parse_args(family_args(assets, tmp_path / "o", weighting_scheme="cosmap"))
    assert settings.model.family == "stable-diffusion-3"
    assert StableDiffusion3Family.weighting(settings).weighting_scheme == "cosmap"


def test_drop_t5_trains_on_the_clip_encoders_alone_and_capman_eval_samples_it_so(assets, tmp_path, capsys):
    """--drop_t5, as diffusers' text_encoder_3=None: the prompts' T5 part is zeros (encode_prompt's stand-in), the
    output keeps the base's T5 (it loads natively), the card says how to sample as trained, and capman-eval's loader
    leaves T5 out. A family without an optional encoder refuses the flag."""
    from capman_peft.run_folder import load_pipeline

    out = tmp_path / "out"
    train_text_to_image_cm.main(family_args(assets, out, drop_t5=True))
    assert json.loads((out / "training_summary.json").read_text())["args"]["drop_t5"] is True
    assert "text_encoder_3=None, tokenizer_3=None" in (out / "README.md").read_text()
    assert StableDiffusion3Pipeline.from_pretrained(out).text_encoder_3 is not None
    pipe = load_pipeline(out)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    family = family_of_pipeline(pipe, ["a baroque painting", ""])
    clip_tokens = pipe.tokenizer.model_max_length
    assert family.cond_table.shape[1] == clip_tokens + 77
    assert family.cond_table[:, clip_tokens:].abs().max() == 0 and family.cond_table[:, :clip_tokens].abs().max() > 0
    with pytest.raises(SystemExit):
        flux = build_tiny_flux(tmp_path / "flux")
        run_cli(
            train_text_to_image_cm.main,
            family_args(assets, tmp_path / "f", pretrained_model_name_or_path=flux, drop_t5=True),
        )
    assert "--drop_t5: the base is a FluxPipeline" in capsys.readouterr().err
