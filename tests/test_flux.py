"""Flux through train_text_to_image_cm.py, on a tiny Flux built from configs (a transformer on packed latents with the
guidance input of FLUX.1-dev, CLIP and T5, the flow-matching scheduler with dynamic shifting) and the ArtBench-format
data; and what both transformer families (SD3, Flux) share: θ^g is the base while the adapter is fresh, and θ^g = θ
while the expert is zero."""

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
    evaluable_artbench_assets,
    family_args,
    family_fixtures,
    text_to_image_args,
)
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft import get_peft_model

import train_text_to_image_cm  # noqa: E402
from capman_peft.denoiser import CMDenoiser
from capman_peft.errors import run_cli
from capman_peft.families import FluxFamily, family_of_pipeline
from capman_peft.objective import build_objective, diffusion_loss
from capman_peft.randomness import draw_step
from capman_peft.testing import build_tiny_flux, build_tiny_sd3
from capman_peft.tuner import CapManConfig

PROMPTS = ["a baroque painting", "a realism painting", ""]


assets, trained = family_fixtures(build_tiny_flux)


def test_a_training_batch_is_the_flux_scripts_loss(assets):
    """One batch's loss without CM, written out as diffusers' Flux LoRA script computes it: σ = u from the unshifted
    table (dynamic shifting is for sampling), x_t = (1 − σ)·x0 + σ·ε packed into 2 x 2 patch tokens, the transformer
    given σ, guidance 3.5, T5's embeddings and CLIP's pooled one, the target ε − x0."""
    pipe = FluxPipeline.from_pretrained(assets.base)
    family = family_of_pipeline(pipe, PROMPTS)
    objective = build_objective("ddpm", pipe.scheduler)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0])
    draws = draw_step(torch.Generator().manual_seed(1), 3, (4, 8, 8), label_dropout=0.0, objective=objective)
    denoiser = CMDenoiser(pipe.transformer, capacity_manipulation=False, family=family)
    with torch.no_grad():
        loss, _ = diffusion_loss(
            denoiser, objective, x0, labels, num_classes=2, cm=None, draws=draws, condition=family.condition
        )
    sigma = (torch.arange(1000, 0, -1, dtype=torch.float64) / 1000)[draws.timesteps].float()
    x_t = (1 - sigma.reshape(-1, 1, 1, 1)) * x0 + sigma.reshape(-1, 1, 1, 1) * draws.noise
    # 2 x 2 patches of the 8 x 8 latent as 16 tokens of 4 x 4 channels, row-major, with (0, row, column) as ids
    tokens = x_t.reshape(3, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 16, 16)
    ids = torch.tensor([[0.0, row, col] for row in range(4) for col in range(4)])
    hidden, pooled, _ = pipe.encode_prompt([PROMPTS[0], PROMPTS[1], PROMPTS[0]], None, max_sequence_length=512)
    with torch.no_grad():
        pred = pipe.transformer(
            hidden_states=tokens, timestep=sigma, guidance=torch.full((3,), 3.5), pooled_projections=pooled,
            encoder_hidden_states=hidden, txt_ids=torch.zeros(512, 3), img_ids=ids,
        ).sample  # fmt: skip
    pred = pred.reshape(3, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(3, 4, 8, 8)
    torch.testing.assert_close(loss, (pred - (draws.noise - x0)).pow(2).mean(), rtol=1e-4, atol=1e-5)


def test_the_output_is_a_flux_pipeline_that_loads_and_samples_without_capman_peft(trained, tmp_path):
    assert json.loads((trained / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    summary = json.loads((trained / "training_summary.json").read_text())
    args = summary["args"]
    assert args["family"] == "flux" and summary["steps"] == 3
    assert args["target_modules"].endswith("ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2")
    assert (args["guidance_scale"], args["guidance_embedding"], args["max_sequence_length"]) == (3.5, 3.5, 512)
    assert args["weighting_scheme"] == "none"
    scheduler = json.loads((trained / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["use_dynamic_shifting"]
    assert_prompted_output_samples_without_capman(trained, "FluxPipeline", tmp_path)


@pytest.mark.slow
def test_the_lora_files_load_into_the_base_flux_pipeline_with_diffusers_alone(trained, assets, tmp_path):
    """base + FluxPipeline.load_lora_weights(out), with and without fuse_lora, computes what the merged transformer
    computes; the general file gives another model (θ^g)."""
    call = """
x, t, text, pooled = torch.randn(2, 16, 16), torch.tensor([0.01, 0.9]), torch.randn(2, 12, 32), torch.randn(2, 16)
ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
def run(model):
    with torch.no_grad():
        return model(
            hidden_states=x, timestep=t, guidance=torch.full((2,), 3.5), encoder_hidden_states=text,
            pooled_projections=pooled, txt_ids=torch.zeros(12, 3), img_ids=ids,
        ).sample
"""
    assert_lora_files_give_the_merged_transformer(
        trained, assets.base, tmp_path, "FluxPipeline", "FluxTransformer2DModel", call
    )


@pytest.mark.slow
def test_capman_eval_and_capman_analyze_run_on_a_flux_output(trained, assets, tmp_path):
    """θ and θ^g sample the class prompts with the saved flow-matching scheduler and are measured per split."""
    assert_capman_eval_and_analyze_run(trained, assets, tmp_path)


def test_resume_is_exact(assets, tmp_path):
    assert_resume_is_exact(lambda out, **flags: family_args(assets, out, **flags), tmp_path)


def test_two_accumulated_half_batches_equal_one_full_batch(assets, tmp_path):
    assert_accumulation_equals_one_batch(lambda out, **flags: family_args(assets, out, **flags), tmp_path)


def test_schnell_has_no_guidance_input_and_the_guidance_is_part_of_the_run(assets, tmp_path, capsys):
    """A transformer without the guidance input (schnell) is called without one; on dev, --guidance_scale is what
    training feeds it, so a resume with another value is refused."""
    schnell = build_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    train_text_to_image_cm.main(family_args(assets, tmp_path / "s", pretrained_model_name_or_path=schnell))
    assert (tmp_path / "s" / "transformer").is_dir()
    train_text_to_image_cm.main(family_args(assets, tmp_path / "d", max_train_steps=1, checkpointing_steps=1))
    resume = dict(max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint="latest", guidance_scale=5.0)
    with pytest.raises(SystemExit):
        run_cli(train_text_to_image_cm.main, family_args(assets, tmp_path / "d", **resume))
    assert "guidance_embedding" in capsys.readouterr().err


def test_flags_that_do_not_apply_are_refused_before_any_work(assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(train_text_to_image_cm.main, family_args(assets, tmp_path / "o", snr_gamma=5.0))
    assert "--snr_gamma 5.0: min-SNR weighting is for DDPM schedules; allowed for flux:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    settings = train_text_to_image_cm.parse_args(family_args(assets, tmp_path / "o", weighting_scheme="logit_normal"))
    assert FluxFamily.weighting(settings).weighting_scheme == "logit_normal"


@pytest.mark.parametrize("builder", [build_tiny_sd3, build_tiny_flux])
def test_theta_g_is_the_base_while_the_adapter_is_fresh_and_theta_while_the_expert_is_zero(builder, tmp_path):
    """A fresh CM adapter on the family's default targets (both B zero): θ = θ^g = the base transformer.
    With the general part trained and the expert still zero (E = 0), θ^g = θ ≠ the base."""
    pipe = (FluxPipeline if builder is build_tiny_flux else StableDiffusion3Pipeline).from_pretrained(builder(tmp_path))
    family = family_of_pipeline(pipe, PROMPTS)
    targets = type(family).flag_defaults["target_modules"].split(",")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([10.0, 900.0]), family.condition(torch.tensor([0, 1]))
    with torch.no_grad():
        base = family.predict(pipe.transformer, x, t, cond)
        model = get_peft_model(pipe.transformer, CapManConfig(r=4, expert_r=2, target_modules=targets)).eval()
        fresh = CMDenoiser(model, family=family)(x, t, cond)
        torch.testing.assert_close(fresh.full, base, rtol=0, atol=1e-6)
        assert torch.equal(fresh.general, fresh.full)
        for name, param in model.named_parameters():
            if "capman_B" in name:  # the general part only: the expert's B stays zero
                param.normal_(0, 0.5)
        trained = CMDenoiser(model, family=family)(x, t, cond)
    assert torch.equal(trained.full, trained.general)
    assert (trained.full - base).abs().max() > 1e-3


@pytest.mark.parametrize("builder", [build_tiny_sd3, build_tiny_flux])
def test_shared_prefix_puts_experts_in_the_later_half_and_computes_what_fused_computes(builder, tmp_path):
    """--cm_forward shared_prefix without --expert_target_modules: experts on the target layers of the later half
    of the blocks only; the earlier half runs once, and θ, θ^g (on a subset of rows) and the gradients are those of
    the fused call."""
    base = builder(tmp_path)
    data = evaluable_artbench_assets(tmp_path / "data", base).args
    settings = train_text_to_image_cm.parse_args(
        text_to_image_args(base, tmp_path / "o", cm_forward="shared_prefix", **data)
    )
    pipe = (FluxPipeline if builder is build_tiny_flux else StableDiffusion3Pipeline).from_pretrained(base)
    family = family_of_pipeline(pipe, PROMPTS)
    later = type(family).later_blocks(pipe.transformer.config)
    config = CapManConfig(
        r=4, expert_r=2, target_modules=settings.model.target_modules.split(","),
        expert_target_modules=settings.model.expert_target_modules,
    )  # fmt: skip
    model = get_peft_model(pipe.transformer, config).eval()
    experts = [name for name, param in model.named_parameters() if "capman_expert_B" in name]
    assert experts and all(any(f".{block}." in name for block in later) for name in experts)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "capman_" in name and "_B" in name:
                param.normal_(0, 0.5)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cond, rows = torch.tensor([10.0, 500.0, 900.0]), family.condition(torch.tensor([0, 1, 0])), torch.tensor([2])
    results = []
    for mode in ("fused", "shared_prefix"):
        model.zero_grad()
        out = CMDenoiser(model, forward_mode=mode, family=family)(x, t, cond, general_rows=rows)
        (out.full.pow(2).sum() + out.general.pow(2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.full.detach(), out.general.detach(), grads))
    (full_a, general_a, grads_a), (full_b, general_b, grads_b) = results
    torch.testing.assert_close(full_b, full_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(general_b, general_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)
    assert (full_a[2] - general_a[0]).abs().max() > 1e-4  # the expert is in use
