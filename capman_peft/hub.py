"""Model card and Hub upload of an exported pipeline folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_START, METRICS_END = "<!-- capman-metrics -->", "<!-- /capman-metrics -->"


def write_model_card(
    output_dir: str | Path,
    *,
    base_model: str | None,
    dataset: str,
    imbalance_ratio: float | None,
    class_names: Sequence[str],
    class_counts: Sequence[int],
    cm_settings: dict[str, Any] | None,
    license: str = "apache-2.0",
    pipeline_note: str = "",
) -> Path:
    """README.md with YAML metadata (tags, base model, license) and the facts a user needs to trust the weights."""
    tags = ["diffusers", "capman-peft", "capacity-manipulation", "class-imbalanced"]
    header = ["---", f"license: {license}", "library_name: diffusers", "tags:"] + [f"- {t}" for t in tags]
    if base_model:
        header.append(f"base_model: {base_model}")
    header.append("---")
    rows = "\n".join(
        f"| {i} | {name} | {count} |" for i, (name, count) in enumerate(zip(class_names, class_counts, strict=True))
    )
    cm = (
        "Trained with Capacity Manipulation (CM): "
        + ", ".join(f"{k}={v}" for k, v in cm_settings.items())
        + ". The reserved expert is merged into the weights: same architecture and speed as the base model."
        if cm_settings
        else "Trained without Capacity Manipulation (baseline)."
    )
    body = f"""
# {Path(output_dir).name}

Diffusion model trained with [capman-peft](https://pypi.org/project/capman-peft/) on **{dataset}**
(imbalance ratio {imbalance_ratio}){f" starting from `{base_model}`" if base_model else ""}.

{cm}
{pipeline_note}

The unmerged CapMan adapter (PEFT format) is in `adapter/`; `training_summary.json` has the full configuration.

## Training classes (largest first)

| id | class | images |
|---|---|---|
{rows}

## Metrics

{METRICS_START}
Not evaluated yet: run `capman-eval --pipeline <this folder> --dataset {dataset}`.
{METRICS_END}
"""
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(header) + "\n" + body)
    return path


def update_model_card_metrics(output_dir: str | Path, metrics_markdown: str) -> None:
    """Replace the metrics section of the card (append one if the card has none)."""
    path = Path(output_dir) / "README.md"
    text = path.read_text() if path.exists() else ""
    block = f"{METRICS_START}\n{metrics_markdown.strip()}\n{METRICS_END}"
    if METRICS_START in text and METRICS_END in text:
        before, rest = text.split(METRICS_START, 1)
        text = before + block + rest.split(METRICS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Metrics\n\n" + block + "\n"
    path.write_text(text)


def push_to_hub(output_dir: str | Path, repo_id: str, token: str | None = None) -> str:
    """Create (or reuse) the model repo and upload the exported folder, checkpoints and logs excluded."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, token=token, exist_ok=True)
    upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(output_dir),
        token=token,
        commit_message="Upload CapMan pipeline",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*", "validation/*", "eval/*"],
    )
    return repo.repo_id


def read_summary(output_dir: str | Path) -> dict[str, Any]:
    path = Path(output_dir) / "training_summary.json"
    return json.loads(path.read_text()) if path.exists() else {}
