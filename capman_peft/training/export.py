"""Exporting a finished run: the expert-use report, ``training_summary.json``, the model card, the sample grid,
the upload; and publishing images to the trackers."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from ..checkpointing import INCOMPLETE, WRITE_ERRORS, write_failure
from ..data import listed_classes
from ..objective import class_weights, drop_coral_head
from ..settings import TrainingSettings
from .loop import Trained, Training

logger = logging.getLogger("capman_peft")


def publish_image(accelerator: Accelerator, image: Image.Image, path: Path, step: int, key: str = "validation") -> Path:
    """Save `image` as PNG at `path` and send it to the trackers (tensorboard, wandb)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(key, np.asarray(image)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({key: wandb.Image(image)}, step=step)
    return path


# The packages whose versions a run's numbers depend on, recorded in training_summary.json.
RECORDED_PACKAGES = ("capman_peft", "torch", "diffusers", "peft", "accelerate", "transformers")


def environment() -> dict[str, Any]:
    """What a run's floats depend on beyond its flags: the package versions (torch's with its build, e.g. +cu130),
    and the hardware torch chose its kernels for (its CPU instruction set, the GPU when there is one)."""
    return {
        "versions": {name: import_module(name).__version__ for name in RECORDED_PACKAGES},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_training_summary(
    path: Path,
    settings: TrainingSettings,
    run_id: str,
    *,
    class_names: Sequence[str],
    class_counts: Sequence[int],
    final_logs: dict[str, float],
    **extra: Any,
) -> None:
    """``training_summary.json``: what was trained on what, where, the omega tables and the final losses."""
    omega_con, omega_div = class_weights(class_counts)
    summary = {
        "run_id": run_id,
        "args": settings.flags(),
        "class_names": list(class_names),
        "class_counts": list(class_counts),
        "omega_con": omega_con.tolist(),
        "omega_div": omega_div.tolist(),
        "final_losses": final_logs,
        "environment": environment(),
        **extra,
    }
    path.write_text(json.dumps(summary, indent=2, default=str))


def final_model(accelerator: Accelerator, run: Training) -> nn.Module:
    """The trained UNet (PEFT-wrapped with CM) with the weights to export: the EMA weights when EMA is on, without
    CORAL's projection head (it only shapes training)."""
    if run.ema is not None:
        run.ema.copy_to(run.params)
    return drop_coral_head(accelerator.unwrap_model(run.denoiser).unet)


@contextmanager
def staged_export(output_dir: str | Path) -> Iterator[Path]:
    """Write a run's export (pipeline, adapter, card, summary, samples) into a temporary folder inside `output_dir`,
    then move it into place, ``model_index.json`` last: a crash or a full disk never leaves a half pipeline that
    loads, and an earlier run's export stays whole until the new one is complete. A failure to write is one
    ``ConfigError`` naming the folder; the checkpoints are kept."""
    from ..errors import ConfigError

    final = Path(output_dir)
    stage = final / f".export{INCOMPLETE}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
        yield stage
        (final / "model_index.json").unlink(missing_ok=True)  # the folder is no pipeline while entries move
        for entry in sorted(stage.iterdir(), key=lambda path: path.name == "model_index.json"):
            target = final / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            entry.rename(target)
        stage.rmdir()
    except WRITE_ERRORS as err:
        shutil.rmtree(stage, ignore_errors=True)
        raise ConfigError(
            f"--output_dir {final}: writing the exported pipeline failed ({write_failure(err)}); the checkpoints "
            "are kept; allowed: free space (or fix the folder) and run again with --resume_from_checkpoint latest"
        ) from None


def finish_export(
    accelerator: Accelerator,
    settings: TrainingSettings,
    output_dir: Path,
    *,
    run_id: str,
    dataset: Any,
    trained: Trained,
    expert_report: dict[str, Any] | None,
    samples: Image.Image,
    card: dict[str, Any],
    summary: dict[str, Any] | None = None,
) -> None:
    """What both scripts write beside their pipeline into `output_dir` (the export stage): ``training_summary.json``,
    the model card and ``samples.png``."""
    from ..hub import write_model_card

    write_training_summary(
        output_dir / "training_summary.json",
        settings,
        run_id,
        class_names=dataset.class_names,
        class_counts=dataset.class_counts,
        final_logs=trained.logs,
        steps=trained.steps,
        train_seconds=round(trained.seconds, 1),
        expert_use=expert_report,
        splits=dataset.splits,
        **(summary or {}),
    )
    write_model_card(
        output_dir,
        dataset=settings.data.source,
        imbalance_ratio=settings.data.imbalance_ratio,
        class_names=dataset.class_names,
        class_counts=dataset.class_counts,
        expert_use=expert_report,
        listed_classes=listed_classes(dataset.class_counts),
        title=Path(settings.output.output_dir).name,
        **card,
    )
    publish_image(accelerator, samples, output_dir / "samples.png", trained.steps, key="samples")


def publish_export(settings: TrainingSettings, trained: Trained, lora_only: bool = False) -> None:
    """After the export is in place: the closing log lines, the folder's lock released, and the upload with
    ``--push_to_hub`` (`lora_only`: the LoRA files and card only)."""
    from ..hub import push_to_hub
    from ..pipelines import GENERAL_LORA_FILE, LORA_FILE
    from ..run_folder import unlock_output_dir

    output_dir, hub = Path(settings.output.output_dir), settings.hub
    logger.info(
        "Saved the pipeline to %s (%.0f s of training); samples in %s",
        output_dir,
        trained.seconds,
        output_dir / "samples.png",
    )
    logger.info("Final losses: %s", json.dumps({k: round(v, 5) for k, v in trained.logs.items()}))
    unlock_output_dir(output_dir)  # the folder is complete; its lock file is not part of what is uploaded
    if hub.push_to_hub:
        lora_files = [LORA_FILE, GENERAL_LORA_FILE] if lora_only else None
        repo = push_to_hub(output_dir, hub.hub_model_id, hub.hub_token, lora_files=lora_files)
        logger.info("Pushed to https://huggingface.co/%s", repo)
