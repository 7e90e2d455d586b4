"""The Hugging Face Hub: where to load a model or dataset from, the model card, and the upload of a pipeline folder."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers at all (one TCP connection, at most `timeout` seconds, once per process).

    Without this, an offline machine spends ~30 s in the libraries' retry loops before failing with a traceback.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_source(
    repo_id: str, flag: str, repo_type: str = "model", cache_dir: str | None = None, revision: str | None = None
) -> str:
    """Where to load `repo_id` from: itself when it is a local path or the Hub answers; otherwise its snapshot in
    the local Hub cache; otherwise a one-line ``ConfigError`` naming `flag`."""
    if Path(repo_id).expanduser().exists():
        return str(Path(repo_id).expanduser())
    if not _is_repo_id(repo_id):
        raise ConfigError(f"{flag} {repo_id}: no such file or folder (and not a Hub repository id user/name)")
    if hub_reachable():
        return repo_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id, repo_type=repo_type, cache_dir=cache_dir, revision=revision, local_files_only=True
        )
    except Exception:  # not cached, or not a valid repo id: either way there is nothing to load offline
        raise ConfigError(
            f"{flag} {repo_id}: cannot reach the Hugging Face Hub for '{repo_id}' (offline?) and it is not in the "
            "local cache; allowed: a local path"
        ) from None


def load_model_config(
    model_class: Any, name_or_path: str, flag: str = "--model_config_name_or_path", **kwargs: Any
) -> dict:
    """A diffusers model config (a JSON file, or a folder or Hub id with ``config.json``; `kwargs`: e.g. its
    ``subfolder``); an unreadable one is a one-line error naming `flag`."""
    try:
        return dict(model_class.load_config(hub_source(name_or_path, flag), **kwargs))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{flag} {name_or_path}: cannot be read ({str(err).splitlines()[0]}); allowed: a "
            f"{model_class.__name__} config.json, or a folder or Hub id with one"
        ) from None


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return not text.startswith((".", "~"))


def check_hub_upload(repo_id: str, token: str | None = None) -> None:
    """``--push_to_hub``, checked before training rather than after it: a valid repository id, the Hub within reach,
    and a token (``--hub_token`` or the cached login) it accepts."""
    if not _is_repo_id(repo_id):
        raise ConfigError(f"--hub_model_id {repo_id}: not a Hub repository id; allowed: user/name")
    if not hub_reachable():
        raise ConfigError(
            "--push_to_hub: cannot reach the Hugging Face Hub (offline?); allowed: train without --push_to_hub and "
            "upload the folder later (huggingface-cli upload)"
        )
    from huggingface_hub import whoami

    try:
        whoami(token=token)
    except Exception as err:
        raise ConfigError(
            f"--push_to_hub: the Hub refused the {'--hub_token' if token else 'cached login'} "
            f"({type(err).__name__}); allowed: a write token (huggingface-cli login, or --hub_token)"
        ) from None


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
    expert_use: dict[str, Any] | None = None,
    widget_prompts: Sequence[str] = (),
    listed_classes: Sequence[int | None] | None = None,
    title: str | None = None,
) -> Path:
    """README.md with the Hub's metadata (tags, base model, license, widget prompts) and the facts a user needs to
    trust the weights. `listed_classes` are the class table's rows (None: left-out classes; default: every class);
    `title`: the model's name (default: the folder's, which a staged export must give as its final one's)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license=license,
        library_name="diffusers",
        tags=["diffusers", "capman-peft", "capacity-manipulation", "class-imbalanced"],
        base_model=base_model,
        widget=[{"text": prompt} for prompt in widget_prompts] or None,
    )
    listed = range(len(class_names)) if listed_classes is None else listed_classes
    shown = sum(i is not None for i in listed)
    rows = "\n".join(
        f"| {i} | {class_names[i]} | {class_counts[i]} |"
        if i is not None
        else f"| … | {len(class_names) - shown} more classes (all in `training_summary.json`) | |"
        for i in listed
    )
    cm = (
        "Trained with Capacity Manipulation (CM): "
        + ", ".join(f"{k}={v}" for k, v in cm_settings.items())
        + ". The reserved expert is merged into the weights: same architecture and speed as the base model."
        if cm_settings
        else "Trained without Capacity Manipulation (baseline)."
    )
    body = f"""
# {title or Path(output_dir).name}

Diffusion model trained with [capman-peft](https://pypi.org/project/capman-peft/) on **{dataset}**
(imbalance ratio {imbalance_ratio}){f" starting from `{base_model}`" if base_model else ""}.

{cm}
{pipeline_note}

The unmerged CapMan adapter (PEFT format) is in `adapter/`; `training_summary.json` has the full configuration.

## Training classes (largest first)

| id | class | images |
|---|---|---|
{rows}

{_expert_use_section(expert_use)}## Metrics

{METRICS_START}
Not evaluated yet: run `capman-eval --pipeline <this folder> --dataset {dataset}`.
{METRICS_END}
"""
    path = Path(output_dir) / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(path)
    return path


def card_license(path: str | Path) -> str | None:
    """The ``license`` in a model card's metadata (None when the card or the field is missing)."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.license
    except Exception:  # unreadable or malformed metadata counts as no license
        return None


def _expert_use_section(report: dict[str, Any] | None) -> str:
    """The card's "Expert use" table: θ vs θ^g per split on a fixed batch at the end of training."""
    from .objective.schedule import PREDICTED

    if report is None:
        return ""
    rows = "\n".join(
        f"| {split} | {v['distance']:.3g} | {v['loss_full']:.4f} | {v['loss_general']:.4f} |"
        for split, v in report["splits"].items()
    )
    verdict = "used" if report["expert_used"] else "barely used (Few/Many distance below 10×)"
    p = PREDICTED[report["prediction_type"]]
    return f"""## Expert use

θ (expert on) vs θ^g (expert off) on {report["images_per_class"]} training images per class with fixed noise: the
reserved expert is **{verdict}** (Few/Many distance {report["few_over_many"]:.3g}×).

| split | mean ({p}_θ − {p}_θg)² | loss θ | loss θ^g |
|---|---|---|---|
{rows}

"""


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


def push_to_hub(
    output_dir: str | Path, repo_id: str, token: str | None = None, lora_files: Sequence[str] | None = None
) -> str:
    """Create (or reuse) the model repo and upload the exported folder, checkpoints and logs excluded; with
    `lora_files`, only those files, the model card, the training summary and the sample grid."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, token=token, exist_ok=True)
    selection = (
        {"allow_patterns": [*lora_files, "README.md", "training_summary.json", "samples.png"]}
        if lora_files
        else {"ignore_patterns": ["checkpoint-*", ".checkpoint-*", "logs/*", "validation/*", "eval/*"]}
    )
    upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(output_dir),
        token=token,
        commit_message="Upload CapMan LoRA" if lora_files else "Upload CapMan pipeline",
        **selection,
    )
    return repo.repo_id
