"""CMDenoiser: the three forward modes agree, CM off costs one UNet call, and a 2-process DDP step is exact."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ATTN_TARGETS, UP_TARGETS, run_two_processes
from diffusers import UNet2DModel
from peft import get_peft_model
from safetensors.torch import load_file

from capman_peft import CapManConfig, cm_loss, cm_weights, expert_disabled
from capman_peft.denoiser import CMDenoiser
from capman_peft.testing import make_tiny_sd_unet, make_tiny_unet2d

MODES = ["fused", "sequential", "shared_prefix"]


def full_mode_model():
    cfg = CapManConfig(mode="full", expert_rank_ratio=0.5, init_lora_weights=False, target_modules=UP_TARGETS)
    return get_peft_model(make_tiny_unet2d(), cfg)


def lora_mode_sd_model():
    cfg = CapManConfig(
        r=4,
        expert_r=2,
        init_lora_weights=False,
        target_modules=ATTN_TARGETS + ["conv1", "conv2"],
        expert_target_modules=r"up_blocks\..*\.(to_q|to_k|to_v|to_out\.0|conv1|conv2)",
    )
    return get_peft_model(make_tiny_sd_unet(), cfg)


def inputs(kind: str, batch: int = 3):
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([3, 500, 999, 42][:batch])
    if kind == "unet2d":
        x = torch.randn(batch, 3, 8, 8, generator=gen)
        return x, t, torch.tensor([0, 2, 1, 2][:batch]), torch.tensor([1, 1, 0, 2][:batch])
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    return x, t, torch.randn(batch, 5, 12, generator=gen), torch.randn(batch, 5, 12, generator=gen)


def outputs_and_grads(model, mode: str, kind: str, extra: bool):
    denoiser = CMDenoiser(model, forward_mode=mode)
    x, t, cond, extra_cond = inputs(kind)
    outs = [o for o in denoiser(x, t, cond, extra_cond if extra else None) if o is not None]
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    params = [p for p in model.parameters() if p.requires_grad]
    return outs, torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("extra", [False, True], ids=["plain", "with_cbdm_extra"])
@pytest.mark.parametrize("kind", ["unet2d", "sd"])
def test_forward_modes_agree_on_outputs_and_gradients(kind, extra):
    base = full_mode_model() if kind == "unet2d" else lora_mode_sd_model()
    results = {mode: outputs_and_grads(copy.deepcopy(base), mode, kind, extra) for mode in MODES}
    ref_outs, ref_grads = results["fused"]
    assert len(ref_outs) == (3 if extra else 2)
    assert not torch.allclose(ref_outs[0], ref_outs[1])  # the expert matters
    for mode in ("sequential", "shared_prefix"):
        outs, grads = results[mode]
        for a, b in zip(outs, ref_outs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=mode)
        for a, b in zip(grads, ref_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                # fp32 summation order differs between modes: compare relative to the gradient's scale
                scale = b.abs().max().clamp(min=1.0).item()
                torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4, msg=mode)


def count_unet_calls(model) -> list[int]:
    calls = []
    model.get_base_model().register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "mode, cm, calls_plain, calls_extra",
    [("fused", False, 1, 1), ("fused", True, 1, 1), ("shared_prefix", True, 1, 1), ("sequential", True, 2, 3)],
)
def test_unet_calls_per_step(mode, cm, calls_plain, calls_extra):
    model = full_mode_model()
    calls = count_unet_calls(model)
    x, t, y, y_extra = inputs("unet2d")
    outs = CMDenoiser(model, forward_mode=mode, capacity_manipulation=cm)(x, t, y)
    assert len(calls) == calls_plain
    assert (outs.general is None) == (not cm) and outs.extra is None
    calls.clear()
    outs = CMDenoiser(model, forward_mode=mode, capacity_manipulation=cm)(x, t, y, y_extra)
    assert len(calls) == calls_extra and outs.extra is not None


def test_cm_off_prediction_is_the_plain_model_output():
    model = full_mode_model()
    x, t, y, _ = inputs("unet2d")
    out = CMDenoiser(model, capacity_manipulation=False)(x, t, y)
    assert out.general is None
    torch.testing.assert_close(out.full, model(x, t, class_labels=y).sample)


def with_dropout(kind: str, p: float = 0.1):
    """A CM model whose UNet (and, in lora mode, adapter) dropout is on and whose expert is exactly zero."""
    if kind == "unet2d":
        unet = make_tiny_unet2d()
        unet = UNet2DModel.from_config(unet.config, dropout=p)
        cfg = CapManConfig(mode="full", expert_rank_ratio=0.5, lora_dropout=p, target_modules=UP_TARGETS)
    else:
        unet = make_tiny_sd_unet()
        cfg = CapManConfig(
            r=4, expert_r=2, lora_dropout=p, target_modules=ATTN_TARGETS, expert_target_modules=r"up_blocks\..*\.to_q"
        )
    model = get_peft_model(unet, cfg).train()
    with torch.no_grad():  # the general part is non-zero, the expert exactly zero (B = 0)
        for name, param in model.named_parameters():
            if "capman_B" in name:
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["unet2d", "sd"])
def test_theta_and_theta_g_share_dropout_masks(kind, mode):
    """With dropout on and the expert exactly zero, theta and theta^g are the same function: d must be 0 — exactly
    where one call computes both; in sequential mode up to float32 rounding, as theta's adapter is one product of the
    stacked general and expert pair and theta^g's the general pair alone (a mask drawn apart differs by > 1e-3)."""
    model = with_dropout(kind)
    n_dropout = sum(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    assert n_dropout > 3
    x, t, cond, extra_cond = inputs(kind)
    torch.manual_seed(0)
    out = CMDenoiser(model, forward_mode=mode)(x, t, cond, extra_cond)
    if mode == "sequential":
        torch.testing.assert_close(out.full, out.general, rtol=0, atol=1e-5)
    else:
        assert torch.equal(out.full, out.general)
    # the masks are random and really applied: two plain calls with independent masks differ
    torch.manual_seed(0)
    first = model(x, t, **{"class_labels" if kind == "unet2d" else "encoder_hidden_states": cond}).sample
    second = model(x, t, **{"class_labels" if kind == "unet2d" else "encoder_hidden_states": cond}).sample
    assert (first - second).abs().max() > 1e-3


def test_paired_dropout_uses_the_source_rows_mask():
    """Row i of a PairedDropout output is row i of the input times the keep mask drawn for row source[i]."""
    from capman_peft.tuner import PairedDropout

    layer = PairedDropout(0.5).train()
    x = torch.arange(1.0, 1.0 + 4 * 6).reshape(4, 6)
    layer.mask_source = torch.tensor([0, 1, 0, 3])
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    keep = torch.empty_like(x).bernoulli_(0.5)
    for i, source in enumerate([0, 1, 0, 3]):
        assert out[i].tolist() == [v * k * 2 for v, k in zip(x[i].tolist(), keep[source].tolist(), strict=True)]
    assert torch.equal(out[0] / x[0], out[2] / x[2])
    layer.mask_source = torch.tensor([0, 1])  # another row count (the shared prefix): plain dropout
    torch.manual_seed(3)
    expected = torch.nn.functional.dropout(x, 0.5, training=True)
    torch.manual_seed(3)
    assert torch.equal(layer(x), expected)
    layer.eval()
    assert torch.equal(layer(x), x)


def test_paired_masks_survive_gradient_checkpointing():
    """Checkpointed blocks recompute in backward after the gate's context has exited; the replayed masks must be
    the forward's, so gradients with and without checkpointing agree (dropout on, fused theta/theta^g batch)."""
    results = []
    for checkpointing in (False, True):
        model = with_dropout("unet2d", p=0.3)
        if checkpointing:
            model.get_base_model().enable_gradient_checkpointing()
        x, t, y, _ = inputs("unet2d")
        torch.manual_seed(5)
        out = CMDenoiser(model, forward_mode="fused")(x, t, y)
        gen = torch.Generator().manual_seed(1)
        loss = (out.full * torch.randn(out.full.shape, generator=gen)).sum() + (out.general**2).sum()
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((out.full.detach(), torch.autograd.grad(loss, params, allow_unused=True)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["fused", "shared_prefix"])
def test_general_rows_give_theta_g_of_those_rows(mode):
    """theta^g on a subset of rows (repeats allowed) equals theta^g of those rows in a plain call."""
    model = full_mode_model()
    x, t, y, _ = inputs("unet2d")
    rows = torch.tensor([2, 0, 2])
    out = CMDenoiser(model, forward_mode=mode)(x, t, y, general_rows=rows)
    with expert_disabled(model):
        general = model(x[rows], t[rows], class_labels=y[rows]).sample
    torch.testing.assert_close(out.general, general, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.full, model(x, t, class_labels=y).sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sequential"):
        CMDenoiser(model, forward_mode="sequential")(x, t, y, general_rows=rows)


def test_shared_prefix_refuses_experts_outside_up_blocks():
    model = get_peft_model(make_tiny_unet2d(), CapManConfig(mode="full", expert_r=1, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="shared_prefix.*only after the split.*up_blocks.*down_blocks"):
        CMDenoiser(model, forward_mode="shared_prefix")
    with pytest.raises(ValueError, match="forward_mode must be one of"):
        CMDenoiser(model, forward_mode="parallel")


def test_cm_loss_gradient_reaches_general_and_expert_parameters():
    model = full_mode_model()
    x, t, y, _ = inputs("unet2d")
    full, general = CMDenoiser(model)(x, t, y)[:2]
    loss, _ = cm_loss(full, general, y, cm_weights([50, 20, 5], "paper"), form="paper")
    loss.backward()
    named = dict(model.named_parameters())
    expert = [p.grad for n, p in named.items() if "capman_expert" in n]
    general = [
        p.grad
        for n, p in named.items()
        if "base_layer.weight" in n or n.endswith("down_blocks.0.resnets.0.conv1.weight")
    ]
    assert expert and all(g is not None and g.abs().sum() > 0 for g in expert)
    assert len(general) > 1 and all(g is not None and g.abs().sum() > 0 for g in general)


@pytest.mark.parametrize("mode", MODES)
def test_zero_expert_gives_exactly_zero_distance_under_bf16_autocast(mode):
    """A fresh expert (B^e = 0) leaves theta and theta^g bit-identical under bf16 autocast too: d has no rounding
    floor of its own at E = 0 (the floor of nearby E comes from bf16 weights and activations, docs/method.md)."""
    cfg = CapManConfig(
        r=4, expert_r=2, target_modules=ATTN_TARGETS + ["conv1", "conv2"], expert_target_modules=UP_TARGETS
    )
    model = get_peft_model(make_tiny_sd_unet(), cfg)
    x, t, cond, _ = inputs("sd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, general = CMDenoiser(model, forward_mode=mode)(x, t, cond)[:2]
    assert full.dtype == torch.bfloat16 and full.abs().sum() > 0
    assert torch.equal(full, general)


DIST_SCRIPT = Path(__file__).with_name("distributed_cm_step.py")


@pytest.mark.slow
def test_two_process_ddp_step_equals_one_process_step_on_the_whole_batch(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.safetensors"
    subprocess.run([sys.executable, str(DIST_SCRIPT), str(single)], check=True, env=env, timeout=300)
    double = tmp_path / "ddp.safetensors"
    result = run_two_processes(DIST_SCRIPT, [double], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(single), load_file(double)
    assert a.keys() == b.keys() and len(a) > 10
    changed = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
        changed += not torch.equal(a[key], load_file(single.with_suffix(".init.safetensors"))[key])
    assert changed > 10  # the step really moved the weights
