"""Model families are plugins: one table keyed by the pipeline class in ``model_index.json``, and no code outside
``capman_peft/families/`` that names a family's pipeline or denoiser class or branches on the family."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import artbench_assets, text_to_image_args, tiny_capman_eval
from diffusers import StableDiffusionPipeline, UNet2DModel

import train_text_to_image_cm
from capman_peft.errors import ConfigError
from capman_peft.families import (
    FAMILIES,
    ClassConditionalFamily,
    StableDiffusionFamily,
    family_class,
    family_of_denoiser,
    register_family,
)
from capman_peft.run_folder import read_pipeline_folder
from capman_peft.testing import build_tiny_sd

ROOT = Path(__file__).resolve().parent.parent

# A family's own classes: pipelines other than diffusers' generic DiffusionPipeline, denoisers, family classes other
# than the interfaces.
FAMILY_SPECIFIC = re.compile(
    r"^(?!Diffusion)\w+Pipeline$|^UNet\w*Model$|^\w*Transformer\w*Model$|^(?!Model|Pretrained)\w+Family$"
)


def family_specific_code(source: str, registered: set[str], reexports_allowed: bool = False) -> list[str]:
    """Where `source` names a family's class, compares with a family's name or pipeline class (`registered`), or
    asks for ``.xl``; docstrings and comments are prose and do not count."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and FAMILY_SPECIFIC.match(node.id):
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and (FAMILY_SPECIFIC.match(node.attr) or node.attr == "xl"):
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and not reexports_allowed:
            found += [f"{node.lineno}: import {a.name}" for a in node.names if FAMILY_SPECIFIC.match(a.name)]
        elif isinstance(node, ast.Compare):
            values = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
            found += [f"{node.lineno}: == {v!r}" for v in values if v in registered]
    return found


def test_the_check_finds_family_specific_code():
    planted = """
from diffusers import StableDiffusionXLPipeline
if settings.model.xl or folder.model_index["_class_name"] == "StableDiffusionPipeline":
    unet = diffusers.UNet2DConditionModel()
"""
    registered = {"StableDiffusionPipeline"}
    assert len(family_specific_code(planted, registered)) == 4
    assert family_specific_code('"""A StableDiffusionPipeline."""\npipe = DiffusionPipeline()', registered) == []


def test_no_code_outside_the_families_names_a_family():
    """The library and the fine-tuning script reach families only through the registry and the interface.
    Exempt: ``capman_peft/testing.py`` (it builds each family's toy pipeline for the tests) and
    ``train_unet_cm.py`` (the from-scratch script of the one class-conditional family); the package's
    ``__init__`` re-exports the public ``ClassConditionalPipeline``."""
    registered = set(FAMILIES) | {family.name for family in FAMILIES.values()}
    files = [p for p in (ROOT / "capman_peft").rglob("*.py") if "families" not in p.parts and p.name != "testing.py"]
    files.append(ROOT / "train_text_to_image_cm.py")
    found = {
        str(path.relative_to(ROOT)): hits
        for path in files
        if (hits := family_specific_code(path.read_text(), registered, path == ROOT / "capman_peft/__init__.py"))
    }
    assert found == {}


def test_an_unknown_pipeline_is_one_error_naming_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline", "unet": ["a", "b"]}))
    with pytest.raises(ConfigError) as refused:
        read_pipeline_folder(tmp_path)
    message = str(refused.value)
    assert "KandinskyPipeline" in message and all(name in message for name in FAMILIES)
    assert "\n" not in message


def test_the_fine_tuning_script_names_only_the_families_it_can_fine_tune(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ClassConditionalPipeline"}))
    with pytest.raises(ConfigError) as refused:
        train_text_to_image_cm.parse_args(["--pretrained_model_name_or_path", str(tmp_path)])
    allowed = str(refused.value).split("allowed: ")[1]
    assert allowed == "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline"


def test_a_registered_family_is_found_by_its_pipeline_class_and_its_denoiser(monkeypatch):
    monkeypatch.setattr("capman_peft.families.registry.FAMILIES", {})

    class ToyDenoiser(UNet2DModel):
        pass

    @register_family
    class ToyFamily(ClassConditionalFamily):
        name = "toy"
        pipeline_class = "ToyPipeline"
        denoiser_class = ToyDenoiser

    assert family_class("ToyPipeline", "model_index.json") is ToyFamily
    assert isinstance(
        family_of_denoiser(
            ToyDenoiser(
                block_out_channels=(8,),
                down_block_types=("DownBlock2D",),
                up_block_types=("UpBlock2D",),
                norm_num_groups=8,
            )
        ),
        ToyFamily,
    )
    with pytest.raises(ConfigError, match="model_index.json: is a StableDiffusionPipeline; allowed: ToyPipeline$"):
        family_class("StableDiffusionPipeline", "model_index.json")
    with pytest.raises(ValueError, match="needs name, pipeline_class and denoiser_class"):
        register_family(type("Nameless", (ClassConditionalFamily,), {"pipeline_class": ""}))


# ---------------------------------------------------------------------------------------------------------
# A family defined here, not in the package, goes through the whole product by the public registry alone
# ---------------------------------------------------------------------------------------------------------


class ToyPipeline(StableDiffusionPipeline):
    """A pipeline class diffusers does not know: only the registry can tell the product what it is."""


class ToyFamily(StableDiffusionFamily):
    name = "toy"
    pipeline_class = "ToyPipeline"
    pipeline_type = ToyPipeline
    loader = ToyPipeline


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    """The tiny SD pipeline saved as a ToyPipeline, with ToyFamily registered for the module's tests."""
    root = tmp_path_factory.mktemp("toy")
    assets = artbench_assets(root, build_tiny_sd(root / "sd"))
    index = assets.base / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "ToyPipeline"}))
    data = assets.data / "data"  # the reference split capman-eval compares with: the same images
    shutil.copy(data / "train-00000-of-00001.parquet", data / "test-00000-of-00001.parquet")
    register_family(ToyFamily)
    yield assets
    FAMILIES.pop("ToyPipeline")


def test_a_family_registered_outside_the_package_trains_exports_and_evaluates(toy_base, tmp_path):
    out = tmp_path / "out"
    train_text_to_image_cm.main(text_to_image_args(toy_base.base, out, **toy_base.args))
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "ToyPipeline"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["args"]["family"] == "toy" and summary["expert_use"]  # the expert-use report ran on it
    assert (out / "pytorch_lora_weights.safetensors").is_file() and "ToyPipeline" in (out / "README.md").read_text()
    for expert in ("on", "off"):
        metrics = tiny_capman_eval(out, toy_base.data, tmp_path / expert, expert, tmp_path)
        assert metrics["expert"] == expert and metrics["num_classes"] == 10 and metrics["kind"] == "text-to-image"
