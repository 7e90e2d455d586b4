"""The CapMan tuner: layer math, per-sample gate, merge, trainable set, save/load, checkpointing, dtypes, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import ATTN_TARGETS, UP_TARGETS
from diffusers import UNet2DConditionModel, UNet2DModel
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from capman_peft import CapManConfig, expert_disabled, expert_gate
from capman_peft.testing import make_tiny_sd_unet, make_tiny_unet2d
from capman_peft.tuner import CapManLayer, merge_general_and_unload, register_with_peft
from capman_peft.tuner.layer import rank_for


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def lora_cfg(**kw) -> CapManConfig:
    base = dict(mode="lora", r=4, lora_alpha=8, expert_r=2, expert_alpha=1, init_lora_weights=False)
    base.update(kw)
    return CapManConfig(**base)


def effective_weight(layer: CapManLayer, expert: bool) -> torch.Tensor:
    """W + s_g B^g A^g (+ s_e B^e A^e), written out from the layer's own tensors (paper Eq. 1)."""
    w = layer.get_base_layer().weight.detach().clone()
    parts = [("capman_A", "capman_B", layer.scaling)]
    if expert:
        parts.append(("capman_expert_A", "capman_expert_B", layer.expert_scaling))
    for a_name, b_name, scale in parts:
        if "default" in getattr(layer, a_name):
            a = getattr(layer, a_name)["default"].detach()
            b = getattr(layer, b_name)["default"].detach()
            w = w + scale["default"] * (b @ a.reshape(a.shape[0], -1)).reshape(w.shape)
    return w


def reference_output(layer: CapManLayer, x: torch.Tensor, expert: bool) -> torch.Tensor:
    base = layer.get_base_layer()
    w = effective_weight(layer, expert)
    if isinstance(base, nn.Linear):
        return F.linear(x, w, base.bias)
    return F.conv2d(x, w, base.bias, base.stride, base.padding, base.dilation, base.groups)


LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (5, 3, 12)),
    "conv3x3_s2_p1": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (5, 6, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1), (5, 6, 4, 4)),
    "conv_groups_dilation": (lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2), (5, 6, 7, 7)),
}


@pytest.mark.parametrize("path", ["merged_weights", "low_rank"])
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_output_matches_formula_for_gate_on_off_and_mixed(kind, mode, path, monkeypatch):
    # Both ways a layer computes its output: base op with W + dW per gate run, or base + B(A(x)) times the gate.
    if path == "low_rank":
        monkeypatch.setattr(CapManLayer, "_can_merge_weights", lambda *args: False)
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    cfg = (
        lora_cfg(target_modules=["proj"])
        if mode == "lora"
        else CapManConfig(mode="full", expert_r=2, expert_alpha=3, init_lora_weights=False, target_modules=["proj"])
    )
    model = get_peft_model(Wrap(make()), cfg)
    layer = model.base_model.model.proj
    x = torch.randn(shape)
    on, off = reference_output(layer, x, True), reference_output(layer, x, False)
    assert not torch.allclose(on, off)

    torch.testing.assert_close(model(x), on, atol=1e-5, rtol=1e-5)
    with expert_disabled(model):
        torch.testing.assert_close(model(x), off, atol=1e-5, rtol=1e-5)
    for gate in (torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])):
        with expert_gate(model, gate):
            mixed = model(x)
        expected = torch.where(gate.view(-1, *[1] * (x.ndim - 1)).bool(), on, off)
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    # leaving the context restores the full model
    torch.testing.assert_close(model(x), on, atol=1e-5, rtol=1e-5)


def test_fresh_adapter_leaves_output_unchanged_and_disable_adapter_gives_base():
    torch.manual_seed(0)
    plain = make_tiny_sd_unet()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 12)
    expected = plain(x, t, encoder_hidden_states=text).sample
    for init in (True, "gaussian"):
        model = get_peft_model(
            make_tiny_sd_unet(),
            CapManConfig(r=4, expert_r=2, init_lora_weights=init, target_modules=ATTN_TARGETS),
        )
        torch.testing.assert_close(model(x, t, encoder_hidden_states=text).sample, expected)
    trained = get_peft_model(make_tiny_sd_unet(), lora_cfg(target_modules=ATTN_TARGETS))
    assert not torch.allclose(trained(x, t, encoder_hidden_states=text).sample, expected)
    with trained.disable_adapter():
        torch.testing.assert_close(trained(x, t, encoder_hidden_states=text).sample, expected)


def unet2d_inputs(batch: int = 3):
    torch.manual_seed(1)
    return torch.randn(batch, 3, 8, 8), torch.tensor([5, 400, 999][:batch]), torch.tensor([0, 2, 3][:batch])


def full_mode_unet(**kw) -> PeftModel:
    cfg = CapManConfig(mode="full", expert_rank_ratio=0.5, init_lora_weights=False, target_modules=UP_TARGETS, **kw)
    return get_peft_model(make_tiny_unet2d(), cfg)


@pytest.mark.parametrize("fused_path", ["merged_weights", "low_rank"])
def test_fused_gate_call_equals_two_separate_calls_outputs_and_gradients(fused_path, monkeypatch):
    x, t, y = unet2d_inputs()
    model = full_mode_unet()
    params = [p for p in model.parameters() if p.requires_grad]
    w_on, w_off = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)

    on = model(x, t, class_labels=y).sample
    with expert_disabled(model):
        off = model(x, t, class_labels=y).sample
    grads_separate = torch.autograd.grad((on * w_on).sum() + (off * w_off).sum(), params, allow_unused=True)

    gate = torch.cat([torch.ones(3), torch.zeros(3)])
    if fused_path == "low_rank":  # the separate calls above took the merged-weight path: cross-check the two
        monkeypatch.setattr(CapManLayer, "_can_merge_weights", lambda *args: False)
    with expert_gate(model, gate):
        fused = model(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([y, y])).sample
    torch.testing.assert_close(fused[:3], on, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[3:], off, atol=1e-5, rtol=1e-5)
    grads_fused = torch.autograd.grad((fused[:3] * w_on).sum() + (fused[3:] * w_off).sum(), params, allow_unused=True)
    expert_grads = 0
    for (name, _), g_sep, g_fused in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], grads_separate, grads_fused, strict=True
    ):
        assert (g_sep is None) == (g_fused is None), name
        if g_sep is not None:
            # float32 sums over a batch of 6 vs 3 round differently: ~1e-6 of the gradient's largest entry (measured
            # up to 1.6e-6 on this machine); a wrong gate differs by O(1) of it.
            scale = max(1.0, float(g_sep.abs().max()))
            torch.testing.assert_close(g_fused, g_sep, atol=1e-5 * scale, rtol=1e-4, msg=name)
            expert_grads += "capman_expert" in name and bool(g_sep.abs().sum() > 0)
    assert expert_grads > 0


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("which", ["sd_lora", "unet2d_full"])
def test_merge_and_unload_equals_unmerged_and_reloads_with_diffusers(which, tmp_path):
    if which == "sd_lora":
        model = get_peft_model(make_tiny_sd_unet(), lora_cfg(target_modules=ATTN_TARGETS + ["conv1", "conv2"]))
        x, t, cond = (
            torch.randn(2, 4, 8, 8),
            torch.tensor([3, 700]),
            {"encoder_hidden_states": torch.randn(2, 5, 12)},
        )
        plain_count, cls = count_params(make_tiny_sd_unet()), UNet2DConditionModel
    else:
        model = full_mode_unet()
        x, t, y = unet2d_inputs()
        cond = {"class_labels": y}
        plain_count, cls = count_params(make_tiny_unet2d()), UNet2DModel
    with torch.no_grad():
        unmerged = model(x, t, **cond).sample
        model.merge_adapter()
        torch.testing.assert_close(model(x, t, **cond).sample, unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x, t, **cond).sample, unmerged, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        assert type(merged) is cls
        assert not any(isinstance(m, CapManLayer) for m in merged.modules())
        assert count_params(merged) == plain_count
        torch.testing.assert_close(merged(x, t, **cond).sample, unmerged, atol=1e-5, rtol=1e-5)
        merged.save_pretrained(tmp_path / "merged")
        reloaded = cls.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(reloaded(x, t, **cond).sample, unmerged, atol=1e-5, rtol=1e-5)


def test_trainable_set_lora_mode_is_adapters_only_with_expected_count():
    model = get_peft_model(make_tiny_sd_unet(), CapManConfig(r=4, expert_r=2, target_modules=ATTN_TARGETS + ["conv1"]))
    plain = make_tiny_sd_unet()
    expected = 0
    for name, module in plain.named_modules():
        if name.split(".")[-1] in ("to_q", "to_k", "to_v", "conv1") or name.endswith("to_out.0"):
            d = module.weight.shape[0]
            k = module.weight[0].numel()  # in/groups * kh * kw for a conv
            expected += 4 * (d + k) + 2 * (d + k)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert expected > 0 and sum(p.numel() for p in trainable.values()) == expected
    assert all("capman_" in n for n in trainable)


def test_trainable_set_full_mode_is_every_base_parameter_plus_experts():
    model = full_mode_unet()
    plain_count = count_params(make_tiny_unet2d())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expert = {n: p for n, p in trainable.items() if "capman_expert" in n}
    assert expert and all("up_blocks" in n for n in expert)
    assert len(trainable) == len(list(model.parameters()))
    assert sum(p.numel() for p in trainable.values()) == plain_count + sum(p.numel() for p in expert.values())


def test_rank_from_ratio():
    assert rank_for((64, 32 * 3 * 3), None, 0.1) == 6
    assert rank_for((10, 7), None, 0.1) == 1
    conv = get_peft_model(
        Wrap(nn.Conv2d(32, 64, 3)), CapManConfig(mode="full", expert_rank_ratio=0.1, target_modules=["proj"])
    )
    assert conv.base_model.model.proj.capman_expert_A["default"].shape == (6, 32, 3, 3)
    lin = get_peft_model(
        Wrap(nn.Linear(7, 10)), CapManConfig(mode="full", expert_rank_ratio=0.1, target_modules=["proj"])
    )
    assert lin.base_model.model.proj.capman_expert_A["default"].shape == (1, 7)


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import capman_peft  # registers the tuner
    from diffusers import UNet2DConditionModel, UNet2DModel
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    which, base_dir, adapter_dir, io_path, out_path = sys.argv[1:]
    if which == "sd_lora":
        base = UNet2DConditionModel.from_pretrained(base_dir)
    else:  # full mode: a fresh random base with another seed; the adapter carries the trained weights
        torch.manual_seed(1234)
        base = UNet2DModel.from_config(UNet2DModel.load_config(base_dir))
    model = PeftModel.from_pretrained(base, adapter_dir)
    io = load_file(io_path)
    cond = {"encoder_hidden_states": io["cond"]} if which == "sd_lora" else {"class_labels": io["cond"]}
    with torch.no_grad():
        save_file({"out": model(io["x"], io["t"], **cond).sample}, out_path)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["sd_lora", "unet2d_full"])
def test_saved_adapter_reloads_in_a_fresh_process_exactly(which, tmp_path):
    if which == "sd_lora":
        base = make_tiny_sd_unet()
        base.save_pretrained(tmp_path / "base")
        model = get_peft_model(base, lora_cfg(target_modules=ATTN_TARGETS))
        io = {"x": torch.randn(2, 4, 8, 8), "t": torch.tensor([3, 700]), "cond": torch.randn(2, 5, 12)}
        cond = {"encoder_hidden_states": io["cond"]}
    else:
        base = make_tiny_unet2d()
        base.save_config(tmp_path / "base")
        model = full_mode_unet()
        with torch.no_grad():  # make the base differ from any fresh init
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        x, t, y = unet2d_inputs()
        io, cond = {"x": x, "t": t, "cond": y}, {"class_labels": y}
    # Compare like with like: PeftModel.from_pretrained gives an eval-mode, frozen model, and CPU kernels are
    # chosen by mode and requires_grad (measured: 6e-7 apart otherwise).
    model.eval().requires_grad_(False)
    with torch.no_grad():
        expected = model(io["x"], io["t"], **cond).sample
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)
    save_file(io, tmp_path / "io.safetensors")
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    subprocess.run(
        [
            sys.executable,
            str(script),
            which,
            str(tmp_path / "base"),
            str(tmp_path / "adapter"),
            str(tmp_path / "io.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        check=True,
    )
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["out"], expected, atol=0, rtol=0)


def test_inject_adapter_in_model_and_registration_is_idempotent():
    register_with_peft()
    register_with_peft()
    model = inject_adapter_in_model(lora_cfg(target_modules=ATTN_TARGETS), make_tiny_sd_unet())
    expected = [n for n, _ in make_tiny_sd_unet().named_modules() if n.endswith(tuple(f".{t}" for t in ATTN_TARGETS))]
    assert len(expected) == 32
    assert sorted(n for n, m in model.named_modules() if isinstance(m, CapManLayer)) == sorted(expected)
    with expert_disabled(model):
        pass


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_replays_the_per_sample_gate(mode, monkeypatch):
    x, t, y = unet2d_inputs()
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y])
    gate = torch.tensor([1.0, 0, 1, 0, 1, 1])
    weights = torch.randn(6, 3, 8, 8)

    def grads(checkpointing: bool):
        if mode == "full":
            model = full_mode_unet()
        else:
            model = get_peft_model(make_tiny_unet2d(), lora_cfg(target_modules=UP_TARGETS))
        model.train()
        if checkpointing:
            model.base_model.model.enable_gradient_checkpointing()
        with expert_gate(model, gate):
            out = model(x2, t2, class_labels=y2).sample
        loss = (out * weights).sum()  # backward runs after the gate's context has exited
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(loss, params, allow_unused=True)

    plain = grads(False)
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    checkpointed = grads(True)
    assert calls, "gradient checkpointing was not exercised"
    for g_plain, g_ckpt in zip(plain, checkpointed, strict=True):
        assert (g_plain is None) == (g_ckpt is None)
        if g_plain is not None:
            torch.testing.assert_close(g_ckpt, g_plain, atol=1e-5, rtol=1e-4)


def test_bf16_base_with_fp32_adapters_under_cpu_autocast():
    model = get_peft_model(make_tiny_sd_unet().to(torch.bfloat16), lora_cfg(target_modules=ATTN_TARGETS))
    layer = next(m for m in model.modules() if isinstance(m, CapManLayer))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert layer.capman_A["default"].dtype == torch.float32
    assert layer.capman_expert_B["default"].dtype == torch.float32
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, encoder_hidden_states=text).sample
        with expert_gate(model, torch.tensor([1.0, 0.0])):
            gated = model(x, t, encoder_hidden_states=text).sample
    (out.float().square().mean() + gated.float().square().mean()).backward()
    grad = layer.capman_expert_A["default"].grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        merged = model.merge_and_unload()
        assert merged.dtype == torch.bfloat16
        torch.testing.assert_close(
            merged(x, t, encoder_hidden_states=text).sample.float(), out.float().detach(), atol=0.1, rtol=0.05
        )


def test_error_targets_matching_no_module():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(make_tiny_sd_unet(), CapManConfig(r=4, expert_r=2, target_modules=["no_such_layer"]))


def test_error_expert_targets_not_a_subset():
    cfg = CapManConfig(r=4, expert_r=2, target_modules=["to_q"], expert_target_modules=["to_k"])
    with pytest.raises(ValueError, match="subset of `target_modules`.*to_k"):
        get_peft_model(make_tiny_sd_unet(), cfg)
    cfg = CapManConfig(r=4, expert_r=2, target_modules=["to_q"], expert_target_modules=["nothing_here"])
    with pytest.raises(ValueError, match="matches no Linear/Conv2d"):
        get_peft_model(make_tiny_sd_unet(), cfg)


def test_expert_target_modules_places_experts_on_a_subset_only():
    cfg = CapManConfig(r=4, expert_r=2, target_modules=ATTN_TARGETS, expert_target_modules=r"up_blocks\..*to_q")
    model = get_peft_model(make_tiny_sd_unet(), cfg)
    with_expert = [n for n, m in model.named_modules() if isinstance(m, CapManLayer) and m.capman_expert_A]
    assert with_expert and all("up_blocks" in n and n.endswith("to_q") for n in with_expert)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=8, expert_r=8), "smaller than the general rank"),
        (dict(r=4, expert_r=16), "smaller than the general rank"),
        (dict(rank_ratio=0.0), r"rank_ratio.*\(0, 1\].*0.0"),
        (dict(mode="full", expert_rank_ratio=1.5), r"expert_rank_ratio.*\(0, 1\].*1.5"),
        (dict(mode="bogus"), "'lora' or 'full'.*bogus"),
        (dict(r=-1), "positive integer.*-1"),
        (dict(mode="full", r=4), "full mode has no general adapter"),
    ],
)
def test_error_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CapManConfig(target_modules=["proj"], **kwargs)


def test_error_expert_rank_from_ratio_not_below_general_rank():
    cfg = CapManConfig(r=2, expert_rank_ratio=0.5, target_modules=["proj"])
    with pytest.raises(ValueError, match="expert rank 6 must be smaller than the general rank 2"):
        get_peft_model(Wrap(nn.Linear(12, 16)), cfg)


def test_error_unsupported_layer_type():
    model = nn.Sequential()
    model.add_module("proj", nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="nn.Linear and nn.Conv2d.*Embedding"):
        get_peft_model(model, CapManConfig(r=2, expert_r=1, target_modules=["proj"]))


def test_error_gate_of_wrong_length_or_shape():
    model = get_peft_model(Wrap(nn.Linear(4, 4)), lora_cfg(r=2, expert_r=1, target_modules=["proj"]))
    with (
        expert_gate(model, torch.ones(3)),
        pytest.raises(ValueError, match="one entry per batch row.*batch of 5"),
    ):
        model(torch.randn(5, 4))
    with pytest.raises(ValueError, match="1-D tensor"):
        expert_gate(model, torch.ones(5, 1))
    with pytest.raises(ValueError, match="0 or 1.*0.5"):
        expert_gate(model, torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="no CapMan layers"), expert_disabled(Wrap(nn.Linear(4, 4))):
        pass


def test_error_gating_a_merged_model():
    model = get_peft_model(Wrap(nn.Linear(4, 4)), lora_cfg(r=2, expert_r=1, target_modules=["proj"]))
    model.merge_adapter()
    with expert_disabled(model), pytest.raises(ValueError, match="merged layer"):
        model(torch.randn(2, 4))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_merge_general_and_unload_is_the_expert_off_model(mode):
    x, t, y = unet2d_inputs()
    if mode == "full":
        model = full_mode_unet()
    else:
        model = get_peft_model(make_tiny_unet2d(), lora_cfg(target_modules=UP_TARGETS))
    with torch.no_grad(), expert_disabled(model):
        expected = model(x, t, class_labels=y).sample
    general = merge_general_and_unload(model)
    assert type(general) is UNet2DModel and count_params(general) == count_params(make_tiny_unet2d())
    with torch.no_grad():
        torch.testing.assert_close(general(x, t, class_labels=y).sample, expected, atol=1e-5, rtol=1e-5)
