"""The Group-Expert LoRA baseline (paper sec. E.4): an expert split into one rank block per class group, each sample
routed to its group's block, against an independent computation; its per-group export; training and capman-eval."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from capman_peft import CapManConfig
from capman_peft.tuner import group_experts, merge_group_and_unload


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # (B, 3, 3, 5): a Linear over the last dimension
        return self.conv(h.permute(0, 3, 1, 2))


def grouped_model() -> nn.Module:
    torch.manual_seed(0)
    config = CapManConfig(mode="full", expert_r=6, expert_groups=3, target_modules=["proj", "conv"])
    model = get_peft_model(TwoLayers(), config)
    for name, param in model.named_parameters():
        if "capman_expert_B" in name:
            nn.init.normal_(param)  # B starts at 0; give every block a visible contribution
    return model


def test_each_row_uses_its_groups_block_only():
    model = grouped_model()
    proj, conv = model.base_model.model.proj, model.base_model.model.conv
    assert proj.expert_r["default"] == 6 and conv.expert_r["default"] == 6
    x = torch.randn(3, 3, 3, 6)
    groups = torch.tensor([2, 0, 1])
    with group_experts(model, groups):
        out = model(x)
    # written out: block g of a rank-6 expert split in 3 is hidden units 2g, 2g+1
    for i, g in enumerate(groups.tolist()):
        keep = [2 * g, 2 * g + 1]
        a, b = proj.capman_expert_A["default"][keep], proj.capman_expert_B["default"][:, keep]
        w = proj.base_layer.weight + proj.expert_scaling["default"] * b @ a
        h = x[i] @ w.T + proj.base_layer.bias
        a, b = conv.capman_expert_A["default"][keep], conv.capman_expert_B["default"][:, keep]
        w = conv.base_layer.weight + conv.expert_scaling["default"] * (b @ a.flatten(1)).view_as(conv.base_layer.weight)
        expected = nn.functional.conv2d(h.permute(2, 0, 1)[None], w, conv.base_layer.bias, padding=1)[0]
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_a_rows_gradient_reaches_its_block_only():
    model = grouped_model()
    with group_experts(model, torch.tensor([1, 1])):
        model(torch.randn(2, 3, 3, 6)).pow(2).sum().backward()
    grad = model.base_model.model.proj.capman_expert_B["default"].grad
    assert grad[:, 2:4].abs().sum() > 0 and grad[:, :2].abs().sum() == 0 and grad[:, 4:].abs().sum() == 0


@pytest.mark.parametrize("group", [0, 1, 2])
def test_the_merged_model_of_a_group_equals_the_routed_model(group):
    model = grouped_model()
    x = torch.randn(2, 3, 3, 6)
    with group_experts(model, torch.tensor([group, group])), torch.no_grad():
        routed = model(x)
    merged = merge_group_and_unload(model, group)
    assert type(merged) is TwoLayers
    torch.testing.assert_close(merged(x), routed, atol=1e-5, rtol=1e-5)
    with group_experts(model, torch.tensor([group, group])), torch.no_grad():
        torch.testing.assert_close(model(x), routed)  # the model itself is unchanged


def test_bad_groups_are_refused():
    model = grouped_model()
    with pytest.raises(ValueError, match="groups"):
        with group_experts(model, torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(ValueError, match="expert_groups"):
        CapManConfig(mode="full", expert_groups=0, target_modules=["proj"])


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    from conftest import digits_run_args

    import train_unet_cm

    tmp = tmp_path_factory.mktemp("group")
    args = digits_run_args(tmp, no_capacity_manipulation=True, group_experts=True, expert_rank_ratio=0.5)
    train_unet_cm.main(args + ["--max_train_steps", "3"])
    return tmp / "out"


@pytest.mark.slow
def test_the_output_samples_each_class_with_its_groups_unet(group_run):
    import json

    from capman_peft import ClassConditionalPipeline
    from capman_peft.run_folder import load_capman_unet, read_pipeline_folder

    pipe = ClassConditionalPipeline.from_pretrained(group_run)
    summary = json.loads((group_run / "training_summary.json").read_text())
    splits = summary["splits"]
    groups = {int(c): g for c, g in pipe.config.class_groups.items()}
    assert groups == {c: g for g, name in enumerate(["many", "medium", "few"]) for c in splits[name]}
    assert pipe.unet_medium is not None and pipe.unet_few is not None
    # the group's UNet is the trained model with that group's expert block: compare with the routed adapter
    capman = load_capman_unet(read_pipeline_folder(group_run))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 20])
    for group, unet in enumerate([pipe.unet, pipe.unet_medium, pipe.unet_few]):
        labels = torch.tensor([splits[["many", "medium", "few"][group]][0], 10])  # a class of the group, and null
        with torch.no_grad(), group_experts(capman, torch.tensor([group, group])):
            routed = capman(x, t, class_labels=labels).sample
        torch.testing.assert_close(unet(x, t, class_labels=labels).sample, routed, atol=1e-5, rtol=1e-4)
    # the pipeline: an image of a Few class equals the Few UNet's own pipeline image from the same noise (the Few
    # UNet is shifted here so that it cannot pass for another group's after 3 training steps)
    few_class = splits["few"][0]
    with torch.no_grad():
        pipe.unet_few.conv_out.bias += 0.3
    alone = ClassConditionalPipeline(unet=pipe.unet_few, scheduler=pipe.scheduler)
    kwargs = dict(num_inference_steps=2, output_type="pt")
    routed = pipe(class_labels=[few_class], generator=torch.Generator().manual_seed(0), **kwargs).images
    expected = alone(class_labels=[few_class], generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(routed, expected)
    many = ClassConditionalPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    other = many(class_labels=[few_class], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (other - routed).abs().max() > 0.05


@pytest.mark.slow
def test_the_group_pipeline_loads_and_routes_without_capman_peft(group_run, tmp_path):
    from conftest import assert_samples_without_capman

    check = "assert pipe.unet_few is not None and len(pipe.config.class_groups) == 10"
    assert_samples_without_capman(group_run, [0, 9], tmp_path, check)


@pytest.mark.slow
def test_capman_eval_evaluates_the_group_run_and_its_general_part(group_run, tmp_path):
    import json

    from test_evaluation import TINY  # registers the tiny feature extractor

    from capman_peft.evaluation.cli import main as evaluate

    for expert in ("on", "off"):
        evaluate([
            "--pipeline", str(group_run), "--num_images_per_class", "2", "--steps", "2", "--batch_size", "20",
            "--cache_dir", str(tmp_path / "features"), "--feature_extractor", TINY, "--metrics", "fid",
            "--expert", expert, "--output_dir", str(tmp_path / expert),
        ])  # fmt: skip
        metrics = json.loads((tmp_path / expert / "metrics.json").read_text())
        assert metrics["expert"] == expert and set(metrics["splits"]) == {"many", "medium", "few"}
    from capman_peft.analysis.cli import main as analyze

    with pytest.raises(SystemExit):  # one UNet per group: capman-analyze says so instead of measuring the Many one
        analyze(["capacity", "--pipeline", str(group_run), "--output_dir", str(tmp_path / "cap")])


def test_group_experts_refuse_the_cm_loss(tmp_path, capsys):
    from conftest import digits_run_args

    import train_unet_cm
    from capman_peft.errors import run_cli

    with pytest.raises(SystemExit):
        run_cli(train_unet_cm.main, digits_run_args(tmp_path, group_experts=True))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--no_capacity_manipulation" in err
