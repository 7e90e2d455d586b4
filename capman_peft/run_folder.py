"""A training run's output folder: the lock a run holds while it writes there, and reading what it holds (the
pipeline, its training summary, the unmerged adapter).

Shared by ``capman-eval`` (:mod:`capman_peft.evaluation`) and ``capman-analyze`` (:mod:`capman_peft.analysis`):
:func:`read_pipeline_folder` checks the folder and reads ``model_index.json`` and ``training_summary.json``,
:func:`load_pipeline` loads the model to sample from (θ merged, or θ^g built from ``output_dir/adapter``).
"""

from __future__ import annotations

import atexit
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, call_on_exit
from .families import ModelFamily, family_class

SCHEDULERS = ("ddim", "dpm", "pipeline")
# Room the result files of a run or an evaluation need at the least, checked before any work.
MIN_FREE_BYTES = 16 * 2**20


# Held (flock) by the training run writing an output folder, for its lifetime.
LOCK_FILE = ".capman-training.lock"
_held_locks: dict[Path, Any] = {}


def _release_all_locks() -> None:
    for path in list(_held_locks):
        unlock_output_dir(path.parent)


atexit.register(_release_all_locks)


def lock_output_dir(output_dir: str | Path) -> None:
    """Take an exclusive lock on a training run's output folder for the run's lifetime (released by
    :func:`unlock_output_dir` or at exit): a second run started into the same folder stops at once instead of
    silently replacing the first one's files. A new run in this same process takes the lock over."""
    import fcntl

    path = (Path(output_dir) / LOCK_FILE).resolve()
    unlock_output_dir(output_dir)
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held open for the run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"--output_dir {output_dir}: another training run is writing to it; allowed: wait for it to finish, "
            "or another --output_dir"
        ) from None
    _held_locks[path] = (handle, created)
    call_on_exit(lambda: unlock_output_dir(output_dir))


def unlock_output_dir(output_dir: str | Path) -> None:
    """Release the lock :func:`lock_output_dir` took, if this process holds it: its file goes, and so does the folder
    if the lock created it and nothing else was written (a refused run leaves no trace)."""
    path = (Path(output_dir) / LOCK_FILE).resolve()
    held = _held_locks.pop(path, None)
    if held is not None:
        handle, created = held
        path.unlink(missing_ok=True)
        handle.close()
        if created and not any(path.parent.iterdir()):
            path.parent.rmdir()


def check_writable_folder(path: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Refuse, before any work, a folder that cannot be written (read-only, a file on the way) or whose disk is full.

    A file is created and removed in the folder, or in its nearest existing parent when it does not exist yet (an
    access check would pass for root on a read-only mount); nothing is left behind.
    """
    import shutil
    import tempfile

    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file; allowed: a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".capman-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"{flag} {path}: {existing} cannot be written ({err.strerror}); allowed: a writable folder"
        ) from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            f"{flag} {path}: only {free // 2**20} MiB free on its disk; allowed: a folder with at least "
            f"{MIN_FREE_BYTES // 2**20} MiB free"
        )


@dataclass
class PipelineFolder:
    """What ``capman-eval`` / ``capman-analyze`` read from a training run's ``output_dir``."""

    path: Path
    model_index: dict[str, Any]
    summary: dict[str, Any]
    """``training_summary.json`` (empty when absent)."""

    @property
    def family(self) -> type[ModelFamily]:
        """The registered family of the saved pipeline (``model_index.json``'s ``_class_name``)."""
        return family_class(self.model_index.get("_class_name"), str(self.path / "model_index.json"))

    @property
    def kind(self) -> str:
        """``text-to-image`` (classes given as prompts) or ``class-conditional`` (as class ids)."""
        return "text-to-image" if self.family.prompted else "class-conditional"

    @property
    def args(self) -> dict[str, Any]:
        return self.summary.get("args") or {}

    @property
    def data_columns(self) -> dict[str, str | None]:
        """The columns the run read its images and classes from (``--image_column``, ``--class_column``), as the data
        loaders' keywords: evaluation and analysis read the same data the same way."""
        return {"image_column": self.args.get("image_column"), "label_column": self.args.get("class_column")}

    @property
    def learned_unconditional(self) -> bool:
        """Whether the model learned the unconditional prediction that guidance extrapolates from: a fine-tuned base
        brings one; a model trained from scratch learns it only with label (caption) dropout."""
        from_scratch = not self.family.prompted or bool(self.args.get("model_config_name_or_path"))
        return not (from_scratch and self.args.get("label_dropout") == 0)

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"


def read_pipeline_folder(path: str | os.PathLike) -> PipelineFolder:
    """Check that ``path`` is a diffusers pipeline folder and read its index and training summary."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            f"{str(path)!r} is not a pipeline folder (no model_index.json); pass a training run's output_dir"
        )
    model_index = _read_json(path / "model_index.json")
    summary_file = path / "training_summary.json"
    summary = _read_json(summary_file) if summary_file.is_file() else {}
    folder = PipelineFolder(path, model_index, summary)
    denoiser = folder.family.denoiser
    if denoiser not in model_index:
        raise ConfigError(
            f"{str(path)!r} holds a {model_index.get('_class_name')} without a {denoiser}; capman-eval evaluates a "
            "training run's output_dir"
        )
    weights = path / denoiser / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise ConfigError(
            f"{weights}: missing; the pipeline folder is incomplete (an interrupted export?); allowed: a finished "
            "run's output_dir"
        )
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: is not valid JSON ({err}); the file is cut off or damaged") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: holds a {type(value).__name__}, not a JSON object; the file is damaged")
    return value


def require_adapter(folder: PipelineFolder) -> Path:
    """``output_dir/adapter/adapter_config.json`` of the run that wrote the pipeline, or a ValueError: θ^g needs it,
    and an adapter left over from another run in the same folder must not be taken for it."""
    from .pipelines import RUN_FILE

    config_file = folder.adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{str(folder.path)!r} has no adapter/adapter_config.json: the expert-off model θ^g needs the unmerged "
            "CapMan adapter that training saves next to the merged pipeline"
        )
    run_file = folder.adapter_dir / RUN_FILE
    adapter_run = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
    pipeline_run = folder.summary.get("run_id")
    if adapter_run != pipeline_run:
        raise ConfigError(
            f"{str(folder.adapter_dir)!r} does not belong to the pipeline next to it (adapter of run {adapter_run}, "
            f"pipeline of run {pipeline_run}): it is left over from an earlier run in this folder; retrain, or "
            "evaluate the expert-on model only"
        )
    return config_file


def load_capman_unet(folder: PipelineFolder) -> nn.Module:
    """The unmerged CapMan UNet (a ``PeftModel``, eval mode) from ``output_dir/adapter``.

    Full mode: the adapter holds every trained weight, so the base is built from ``output_dir/unet``'s config.
    LoRA mode: the base is the pretrained UNet named by ``base_model_name_or_path`` in the adapter config (falling
    back to the summary's ``pretrained_model_name_or_path``); it must be available locally when offline.
    """
    from peft import PeftModel

    from . import tuner  # noqa: F401  (registers the CapMan tuner with PEFT)

    config_file = require_adapter(folder)
    adapter_config = json.loads(config_file.read_text())
    denoiser, denoiser_cls = folder.family.denoiser, folder.family.denoiser_class
    if adapter_config.get("mode") == "full":
        base = denoiser_cls.from_config(denoiser_cls.load_config(folder.path / denoiser))
    else:
        name = adapter_config.get("base_model_name_or_path") or folder.args.get("pretrained_model_name_or_path")
        if not name:
            raise ConfigError(
                f"{str(config_file)!r} names no base_model_name_or_path; θ^g of a LoRA run needs the pretrained base"
            )
        from .hub import hub_source

        name = hub_source(name, f"base model of {config_file}", "model")
        try:
            as_pipeline = not Path(name).exists() or (Path(name) / denoiser).is_dir()
            where = {"subfolder": denoiser} if as_pipeline else {}
            base = denoiser_cls.from_pretrained(name, use_safetensors=True, **where)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"θ^g of a LoRA run needs the base model {name!r} (base_model_name_or_path in {str(config_file)!r}) "
                f"available locally or from the Hub: {str(err).splitlines()[0]}"
            ) from err
    return PeftModel.from_pretrained(base, str(folder.adapter_dir)).eval()


def load_pipeline(
    path: str | os.PathLike | PipelineFolder,
    expert: str = "on",
    scheduler: str | None = "pipeline",
    device: str | torch.device = "cpu",
) -> Any:
    """Load a training run's pipeline for sampling, with the expert merged in (θ) or dropped (θ^g).

    Args:
        expert: ``"on"``: the merged pipeline as saved; ``"off"``: its UNet replaced by θ^g built from
            ``output_dir/adapter`` (:func:`load_capman_unet` + ``merge_general_and_unload``).
        scheduler: ``"ddim"``, ``"dpm"`` (DPM-Solver++ multistep) or ``"pipeline"`` (keep the saved one); None:
            DDIM, or the saved one for a flow-matching model (SD3) or a consistency model, which the DDPM samplers
            cannot sample.
    """
    from diffusers import (
        CMStochasticIterativeScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    from .tuner import merge_general_and_unload

    folder = path if isinstance(path, PipelineFolder) else read_pipeline_folder(path)
    if expert not in ("on", "off"):
        raise ConfigError(f"expert must be 'on' or 'off', got {expert!r}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    pipe = folder.family.loader.from_pretrained(
        str(folder.path), use_safetensors=True, **folder.family.load_kwargs(folder.summary)
    )
    # A flow-matching model (SD3, Flux) or a consistency model samples only with its own scheduler.
    own = (
        pipe.scheduler
        if isinstance(pipe.scheduler, (FlowMatchEulerDiscreteScheduler, CMStochasticIterativeScheduler))
        else None
    )
    if scheduler is None:
        scheduler = "pipeline" if own is not None else "ddim"
    elif own is not None and scheduler != "pipeline":
        kind = type(own).__name__
        raise ConfigError(
            f"--scheduler {scheduler}: {folder.path} samples only with its own {kind}, which DDPM samplers cannot "
            f"replace; allowed: pipeline"
        )
    if expert == "off":
        setattr(pipe, folder.family.denoiser, merge_general_and_unload(load_capman_unet(folder)).eval())
        if getattr(pipe.config, "class_groups", None) is not None:  # group experts: theta^g serves every class
            pipe.register_modules(unet_medium=None, unet_few=None)
            pipe.register_to_config(class_groups=None)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
