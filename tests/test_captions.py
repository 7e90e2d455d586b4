"""Practitioners' own data: images with per-image captions and a class column (a metadata.jsonl image folder or a
Hub-format dataset), the class prompts from a file, and what trains on which text."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import text_to_image_args
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

import train_text_to_image_cm
from capman_peft.data import load_imbalanced_dataset
from capman_peft.errors import ConfigError
from capman_peft.families import StableDiffusionFamily
from capman_peft.families.stable_diffusion import StableDiffusionXLFamily
from capman_peft.testing import build_tiny_sd

# Name order (ink, oil, sketch) differs from count order (sketch 6, ink 3, oil 2).
STYLE_COUNTS = {"sketch": 6, "ink": 3, "oil": 2}


def rows_of(counts: dict[str, int]) -> list[dict]:
    """One row per image: a solid grey whose level is the image's number, and a caption that names both."""
    rows, number = [], 0
    for style, count in counts.items():
        for _ in range(count):
            rows.append({"number": number, "style": style, "text": f"{style} study number {number}"})
            number += 1
    return rows


def grey(number: int) -> Image.Image:
    return Image.new("RGB", (20, 20), (10 * number,) * 3)


def write_metadata_folder(root: Path, counts: dict[str, int] = STYLE_COUNTS) -> Path:
    root.mkdir(parents=True)
    lines = []
    for row in rows_of(counts):
        name = f"img{row['number']:03d}.png"
        grey(row["number"]).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": row["text"], "style": row["style"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_caption_parquet(root: Path, counts: dict[str, int] = STYLE_COUNTS) -> Path:
    rows = rows_of(counts)
    table = datasets.Dataset.from_dict(
        {
            "image": [grey(r["number"]) for r in rows],
            "text": [r["text"] for r in rows],
            "style": [r["style"] for r in rows],
        }
    ).cast_column("image", datasets.Image())
    (root / "data").mkdir(parents=True)
    table.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def number_in(caption: str) -> int:
    return int(re.search(r"number (\d+)$", caption).group(1))


def check_captions_follow_their_images(data) -> None:
    assert data.captions is not None and len(data) == sum(STYLE_COUNTS.values())
    assert sorted(data.class_names) == sorted(STYLE_COUNTS)
    for c, name in enumerate(data.class_names):
        assert data.class_counts[c] == STYLE_COUNTS[name]
    for i in range(len(data)):
        item = data[i]
        number = number_in(item["caption"])
        assert item["caption"].startswith(item["class_name"])  # the class comes from the class column
        # the image is the caption's own: its grey level is 10 * number, mapped to [-1, 1]
        expected = 10 * number / 127.5 - 1
        assert torch.allclose(item["pixel_values"], torch.full_like(item["pixel_values"], expected), atol=1e-5)


@pytest.mark.parametrize("kind", ["metadata_folder", "hub_parquet"])
def test_each_image_gets_its_caption_and_the_class_of_the_class_column(tmp_path, kind):
    if kind == "metadata_folder":
        source = {"train_data_dir": write_metadata_folder(tmp_path / "mine")}
    else:
        source = {"dataset_name": str(write_caption_parquet(tmp_path / "hub"))}
    data = load_imbalanced_dataset(
        None,
        imbalance_ratio=None,
        resolution=8,
        label_column="style",
        caption_column="text",
        cache_dir=str(tmp_path / "hf"),
        **source,
    )
    check_captions_follow_their_images(data)


def test_caption_and_class_column_errors_name_the_flag(tmp_path):
    folder = write_metadata_folder(tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"--class_column kind: not a column .* available columns: .*'style'"):
        load_imbalanced_dataset(None, imbalance_ratio=None, train_data_dir=folder, label_column="kind")
    with pytest.raises(ConfigError, match=r"--caption_column caption: not a column"):
        load_imbalanced_dataset(
            None, imbalance_ratio=None, train_data_dir=folder, label_column="style", caption_column="caption"
        )
    class_folders = tmp_path / "classes"
    (class_folders / "a").mkdir(parents=True)
    grey(1).save(class_folders / "a" / "x.png")
    with pytest.raises(ConfigError, match=r"--caption_column text: .* class folders, which has no captions"):
        load_imbalanced_dataset(None, imbalance_ratio=None, train_data_dir=class_folders, caption_column="text")


class FakeEncoder:
    """Stands in for the text encoders: caption k -> a tensor filled with its number (SDXL's pooled: minus it)."""

    def __init__(self, xl: bool) -> None:
        self.xl = xl

    def __call__(self, prompts):
        numbers = torch.tensor([float(number_in(p)) for p in prompts])
        pooled = -numbers[:, None].expand(-1, 2).clone() if self.xl else None
        return numbers[:, None, None].expand(-1, 3, 2).clone(), pooled


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_family_conditions_rows_on_their_captions_and_dropped_rows_on_the_empty_prompt(xl):
    table = torch.arange(4.0)[:, None, None].expand(-1, 3, 2) + 100  # 3 class prompts + the empty prompt (row 3)
    pooled_table = -table[:, 0, :]
    if xl:
        family = StableDiffusionXLFamily(None, table, pooled_table, 16, captions=FakeEncoder(xl))
    else:
        family = StableDiffusionFamily(None, table, captions=FakeEncoder(xl))
    batch = {"caption": ["a study number 7", "b study number 2", "c study number 5"], "label": torch.tensor([0, 2, 1])}
    ids = torch.tensor([0, 3, 1])  # the second row's label was dropped
    cond = family.condition(ids, batch)
    hidden = cond["encoder_hidden_states"] if xl else cond
    assert hidden[:, 0, 0].tolist() == [7.0, 103.0, 5.0]
    if xl:
        assert cond["text_embeds"][:, 0].tolist() == [-7.0, -103.0, -5.0]
    # without a batch (validation grids, the expert-use report, evaluation): the class prompts
    plain = family.condition(ids)
    assert (plain["encoder_hidden_states"] if xl else plain)[:, 0, 0].tolist() == [100.0, 103.0, 101.0]


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("caption-sd"))


def caption_args(base: Path, tmp_path: Path, **overrides) -> list[str]:
    """A captioned image folder (`tmp_path/mine`), half the captions dropped, at the script's learning rate."""
    values = {
        "train_data_dir": tmp_path / "mine",
        "class_column": "style",
        "caption_column": "text",
        "cache_dir": tmp_path / "hf",
        "caption_dropout": 0.5,
        "learning_rate": None,
        "checkpointing_steps": None,
    }
    return text_to_image_args(base, tmp_path / "out", **{**values, **overrides})


def reference_embeddings(base: Path, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden state for prompts padded to the tokenizer's max length, as SD encodes them."""
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    with torch.no_grad():
        return encoder(torch.tensor(ids)).last_hidden_state


def record_conditions(monkeypatch) -> list:
    """(captions, label-dropped rows, the condition the family gives them) of every training step of the script."""
    seen = []
    real_step_loss = train_text_to_image_cm.family_step_loss

    def recording(family, *args, **kwargs):
        inner = real_step_loss(family, *args, **kwargs)

        def step_loss(batch, draws, step):
            ids = torch.where(draws.label_dropped, len(family.cond_table) - 1, batch["label"])
            seen.append((list(batch["caption"]), draws.label_dropped.clone(), family.condition(ids, batch)))
            return inner(batch, draws, step)

        return step_loss

    monkeypatch.setattr(train_text_to_image_cm, "family_step_loss", recording)
    return seen


@pytest.mark.parametrize("cache_latents", [False, True], ids=["images", "cached_latents"])
def test_training_conditions_each_image_on_its_caption_and_splits_by_class(
    sd_base, tmp_path, monkeypatch, cache_latents
):
    write_metadata_folder(tmp_path / "mine")
    seen = record_conditions(monkeypatch)
    train_text_to_image_cm.main(caption_args(sd_base, tmp_path, cache_latents=cache_latents))

    assert len(seen) == 2
    empty = reference_embeddings(sd_base, [""])[0]
    for captions, dropped, condition in seen:
        expected = reference_embeddings(sd_base, captions)
        expected[dropped] = empty
        torch.testing.assert_close(condition, expected, atol=1e-5, rtol=1e-5)
    assert any(d.any() for _, d, _ in seen) and any((~d).any() for _, d, _ in seen)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    names = summary["class_names"]
    assert dict(zip(names, summary["class_counts"], strict=True)) == STYLE_COUNTS
    assert summary["args"]["caption_column"] == "text" and summary["args"]["class_column"] == "style"
    # Many / Few by class size: sketch (6 images) is Many and oil (2) Few, whatever the name order
    from capman_peft.data import class_splits

    splits = class_splits(summary["class_counts"])
    assert [names[c] for c in splits["many"]] == ["sketch"] and [names[c] for c in splits["few"]] == ["oil"]


def test_validation_prompts_per_class_replace_the_template(sd_base, tmp_path):
    write_metadata_folder(tmp_path / "mine")
    prompts = {"sketch": "a pencil sketch", "ink": "an ink drawing", "oil": "an oil painting"}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    train_text_to_image_cm.main(
        caption_args(sd_base, tmp_path, max_train_steps=1, validation_prompts_per_class=tmp_path / "prompts.json")
    )
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["prompts"] == [prompts[name] for name in summary["class_names"]]


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "cannot be read as JSON"),
        ('["a", "b"]', "not an object of non-empty text prompts"),
        ('{"sketch": "a sketch", "ink": "ink", "oil": "oil", "tempera": "t"}', r"unknown classes \['tempera'\]"),
        ('{"sketch": "a sketch", "ink": "ink"}', r"no prompt for classes \['oil'\]"),
    ],
    ids=["not_json", "not_an_object", "unknown_class", "missing_class"],
)
def test_bad_prompt_files_are_refused_naming_the_flag(sd_base, tmp_path, content, message):
    write_metadata_folder(tmp_path / "mine")
    (tmp_path / "prompts.json").write_text(content)
    with pytest.raises(ConfigError, match=rf"--validation_prompts_per_class .*prompts.json: .*{message}"):
        train_text_to_image_cm.main(
            caption_args(sd_base, tmp_path, validation_prompts_per_class=tmp_path / "prompts.json")
        )
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_captions_with_cbdm_are_refused(sd_base, tmp_path):
    write_metadata_folder(tmp_path / "mine")
    with pytest.raises(ConfigError, match="--caption_column text: CBDM"):
        train_text_to_image_cm.main(caption_args(sd_base, tmp_path, objective="cbdm"))


def test_capman_eval_uses_the_runs_class_prompts():
    from capman_peft.evaluation.evaluate import _model_classes

    folder = SimpleNamespace(
        family=StableDiffusionFamily,
        summary={"class_names": ["sketch", "oil"], "prompts": ["a pencil sketch", "an oil painting"]},
        args={"prompt_template": "a {} painting"},
    )
    spec = SimpleNamespace(prompt_template="a {}")
    assert _model_classes(None, folder, None, spec, None)[2] == ["a pencil sketch", "an oil painting"]
    assert _model_classes(None, folder, None, spec, "a {} picture")[2] == ["a sketch picture", "an oil picture"]


@pytest.mark.slow
def test_capman_eval_and_analyze_read_the_runs_class_column(sd_base, tmp_path):
    """The reference images and the splits come from the same metadata.jsonl folder and class column as training."""
    from test_evaluation import TINY  # registers the tiny feature extractor

    from capman_peft.analysis.cli import main as analyze
    from capman_peft.evaluation.cli import main as evaluate

    write_metadata_folder(tmp_path / "mine")
    train_text_to_image_cm.main(caption_args(sd_base, tmp_path, max_train_steps=1))
    out = tmp_path / "out"
    evaluate([
        "--pipeline", str(out), "--num_images_per_class", "2", "--steps", "2", "--batch_size", "6",
        "--cache_dir", str(tmp_path / "features"), "--feature_extractor", TINY, "--metrics", "fid",
        "--output_dir", str(tmp_path / "eval"),
    ])  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_classes"] == 3 and set(metrics["splits"]) == {"many", "medium", "few"}
    names = metrics["class_names"]
    assert {split: [names[c] for c in ids] for split, ids in metrics["splits_classes"].items()} == {
        "many": ["sketch"], "medium": ["ink"], "few": ["oil"]
    }  # fmt: skip
    analyze(["capacity", "--pipeline", str(out), "--num_batches", "1", "--batch_size", "2", "--output_dir",
             str(tmp_path / "cap")])  # fmt: skip
    assert len(json.loads((tmp_path / "cap" / "capacity.json").read_text())["expert_usage"]) == 3


def test_sdxl_trains_each_image_on_its_caption_with_both_text_encoders(tmp_path, monkeypatch):
    """SDXL: the condition of a row is both encoders' penultimate hidden states of its caption, side by side, and the
    second encoder's projected embedding as the pooled one (empty prompt for dropped rows), as SDXL encodes prompts."""
    from transformers import CLIPTextModelWithProjection

    from capman_peft.testing import build_tiny_sdxl

    base = build_tiny_sdxl(tmp_path / "sdxl")
    write_metadata_folder(tmp_path / "mine")
    seen = record_conditions(monkeypatch)
    train_text_to_image_cm.main(caption_args(base, tmp_path, max_train_steps=2, center_crop=True))

    encoders = [
        (CLIPTokenizer.from_pretrained(base, subfolder=tok), model.from_pretrained(base, subfolder=enc))
        for tok, model, enc in [
            ("tokenizer", CLIPTextModel, "text_encoder"),
            ("tokenizer_2", CLIPTextModelWithProjection, "text_encoder_2"),
        ]
    ]

    def encode(prompts):
        hidden, pooled = [], None
        for tokenizer, encoder in encoders:
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
            with torch.no_grad():
                out = encoder(torch.tensor(ids.input_ids), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    empty_hidden, empty_pooled = encode([""])
    for captions, dropped, condition in seen:
        hidden, pooled = encode(captions)
        hidden[dropped], pooled[dropped] = empty_hidden[0], empty_pooled[0]
        torch.testing.assert_close(condition["encoder_hidden_states"], hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(condition["text_embeds"], pooled, atol=1e-5, rtol=1e-5)
