"""Training checkpoints in safetensors + JSON only, written so that a crash mid-save never destroys the last good one.

A checkpoint folder ``checkpoint-<step>/`` holds ``model.safetensors`` (the trainable parameters), and
``state.safetensors`` + ``state.json`` (optimizer, LR schedule, EMA, loop counters and the run's identity: tensors in
safetensors, the rest in JSON). Nothing is unpickled on resume. The folder is written under a temporary name, its
files and the folder are flushed to disk (fsync), and only then is it renamed into place, so a crash or power loss
mid-save never leaves a "complete" checkpoint with missing data; old checkpoints beyond the limit are removed only
after that. A checkpoint that cannot be read is reported by file name (``CheckpointError``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .settings import TrainingSettings

logger = logging.getLogger("capman_peft")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model; the message names the file."""


class ForeignCheckpointError(CheckpointError):
    """A readable checkpoint written by a run with other settings: never resumed, not even by ``latest``."""


# What a failed write raises: the OS's error, or safetensors' own for the same cause (a full disk while serialising).
WRITE_ERRORS = (OSError, SafetensorError)


def write_failure(err: Exception) -> str:
    """Why a write failed, in the OS's words (``No space left on device``)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err).rsplit("I/O error: ", 1)[-1].split(" (os error")[0]


# What a write in progress is called until it is complete (checkpoints, the export's stage): a crash leaves it behind.
INCOMPLETE = ".incomplete"


def _split(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """Replace every tensor in a nested state by a reference into `tensors` (JSON keeps the structure)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__int_keys__": {str(k): _split(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__int_keys__" in obj:
            return {int(k): _join(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must keep of the model: the parameters that train (frozen weights come from the base)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary folders of an interrupted save are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str) -> list[Path]:
    """The checkpoints to try, in order: ``latest`` → every checkpoint in `output_dir`, newest first (empty if
    there is none); otherwise the given folder (relative to `output_dir` when it is not a path that exists)."""
    if resume_from_checkpoint == "latest":
        return list_checkpoints(output_dir)[::-1]
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / path
    if not path.is_dir():
        raise CheckpointError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint folder at {path}; "
            "allowed: a checkpoint-<step> folder or latest"
        )
    return [path]


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (folders: the entries; not supported everywhere, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    training_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and durably, then prune the oldest beyond `total_limit`.

    `training_state` is any nested dict of tensors and JSON values (optimizer/scheduler/EMA ``state_dict()``s, loop
    counters, the run's identity).
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"total_limit must be >= 1 or None, got {total_limit}")
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}{INCOMPLETE}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.cpu().contiguous() for k, v in trainable_state(model).items()}, tmp / "model.safetensors")
        tensors: dict[str, torch.Tensor] = {}
        meta = _split({**training_state, "step": step}, tensors, "state")
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    except WRITE_ERRORS as err:  # a full disk: the earlier checkpoints stay, the partial one goes
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = list_checkpoints(output_dir)
        kept = f"{earlier[-1]} is kept" if earlier else "no earlier checkpoint exists"
        raise ConfigError(
            f"--output_dir {output_dir}: writing checkpoint-{step} failed ({write_failure(err)}); {kept}; allowed: "
            "free space on that disk and run again with --resume_from_checkpoint latest"
        ) from None
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():  # re-saving the same step: keep the old one until the new one is in place
        old = output_dir / f".checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(output_dir)
    if total_limit is not None:
        for stale in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(stale)
    return final


def _read(path: Path, reader: Any) -> Any:
    try:
        return reader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except Exception as err:  # safetensors and json report corruption with their own exception types
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{path}: cannot be read ({reason}); the file is truncated or corrupt") from None


# Settings derived from a flag, named by that flag when they differ.
SETTING_FLAGS = {"unet_config": "model_config_name_or_path"}


def _describe_change(name: str, saved: Any, now: Any) -> str:
    """``--flag old (now new)``; a config (a dict) by the keys that differ, not whole."""
    flag = f"--{SETTING_FLAGS.get(name, name)}"
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        return f"{flag} " + ", ".join(f"{k} {saved.get(k)} (now {now.get(k)})" for k in keys[:4])
    return f"{flag} {saved} (now {now})"


def _check_run(path: Path, state: dict[str, Any], expected: dict[str, Any]) -> None:
    saved = state.get("run", {}).get("config")
    if saved is None:
        return  # written before runs recorded their settings
    saved = {RENAMED_SETTINGS.get(k, k): v for k, v in saved.items()}
    # A setting the checkpoint does not record came after it was written (e.g. --cm_relative_margin): not compared.
    changed = [k for k in sorted(set(saved) | set(expected)) if k in saved and saved.get(k) != expected.get(k)]
    if changed:
        listed = ", ".join(_describe_change(k, saved.get(k), expected.get(k)) for k in changed[:4])
        raise ForeignCheckpointError(
            f"{path}: was written by a run with other settings: {listed}; allowed: resume with the settings it "
            "was trained with, or start a new run in another --output_dir"
        )


def _check_counters(path: Path, state: Any) -> None:
    """Every number read back must be one training could have written: a step >= 1 that matches the folder's name,
    non-negative scheduler and EMA counters, an EMA decay in [0, 1]."""

    def bad(what: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{path / 'state.json'}: {what} is {value!r}; the checkpoint is corrupt")

    if not isinstance(state, dict):
        raise bad("the state", type(state).__name__)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise bad("the step counter", step)
    named = _CHECKPOINT.match(path.name)
    if named and int(named.group(1)) != step:
        raise bad(f"the step counter (the folder says {named.group(1)})", step)
    for group, key, valid in (
        ("lr_scheduler", "last_epoch", lambda v: isinstance(v, int) and v >= 0),
        ("lr_scheduler", "_step_count", lambda v: isinstance(v, int) and v >= 0),
        ("ema", "optimization_step", lambda v: isinstance(v, int) and v >= 0),
        ("ema", "decay", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1),
    ):
        part = state.get(group)
        if isinstance(part, dict) and key in part and not valid(part[key]):
            raise bad(f"{group}.{key}", part[key])


def remove_incomplete_writes(output_dir: str | Path) -> list[str]:
    """Remove what an interrupted checkpoint save or export left in `output_dir` (never a complete checkpoint)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    leftovers = [p for p in output_dir.iterdir() if p.name.startswith(".") and p.name.endswith(INCOMPLETE)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in leftovers)


def remove_earlier_checkpoints(output_dir: str | Path) -> list[str]:
    """``--overwrite_output_dir``: the checkpoints an earlier run left in the folder, removed before this run writes
    its own (they would otherwise count as newer than this run's for pruning and ``latest``)."""
    names = []
    for path in list_checkpoints(output_dir):
        shutil.rmtree(path)
        names.append(path.name)
    return names


def load_checkpoint(path: str | Path, model: nn.Module, expected_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check and load a checkpoint: the trainable parameters into `model`, and return the training state.

    Everything is read and checked (the run's settings against `expected_run`, names and shapes of the weights, the
    state files) before `model` is touched.
    """
    path = Path(path)
    weights = _read(path / "model.safetensors", load_file)
    tensors = _read(path / "state.safetensors", load_file)
    meta = _read(path / "state.json", lambda p: json.loads(p.read_text()))
    try:
        state = _join(meta, tensors)
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{path / 'state.json'}: does not match {path / 'state.safetensors'} ({err}); the checkpoint is corrupt"
        ) from None
    _check_counters(path, state)
    if expected_run is not None:
        _check_run(path, state, expected_run)  # first: a changed flag explains a model that does not fit, by name
    expected = trainable_state(model)
    if set(weights) != set(expected):
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ForeignCheckpointError(
            f"{path / 'model.safetensors'}: does not fit the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); it was written for another model or adapter configuration"
        )
    wrong = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise ForeignCheckpointError(
            f"{path / 'model.safetensors'}: {k} has shape {tuple(weights[k].shape)} but the model's is "
            f"{tuple(expected[k].shape)} ({len(wrong)} such tensors); it was written for another model, "
            "resolution or number of classes"
        )
    model.load_state_dict(weights, strict=False)
    return state


# Settings a checkpoint may record under an earlier name; they are compared under the current one.
RENAMED_SETTINGS = {"cm_diversity": "cm_form"}


def save_training_checkpoint(
    settings: TrainingSettings,
    step: int,
    model: nn.Module,
    *,
    run_id: str,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None = None,
) -> Path:
    """``output_dir/checkpoint-<step>``: the trainable parameters of `model`, the optimizer/LR/EMA state and the
    run's identity (`run_id` and ``settings.identity()``)."""
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "run": {"id": run_id, "config": settings.identity()},
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    output = settings.output
    return save_checkpoint(output.output_dir, step, model, state, output.checkpoints_total_limit)


def _restore(path: Path, state: dict[str, Any], optimizer: Any, lr_scheduler: Any, ema: Any | None) -> None:
    if ema is not None and "ema" not in state:
        raise ForeignCheckpointError(f"{path}: has no EMA state; allowed: resume it without --use_ema")
    try:
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(
            f"{path / 'state.safetensors'}: the optimizer, LR or EMA state does not fit this run ({reason})"
        ) from None


class Resumed(NamedTuple):
    """Where a run continues: the optimizer step reached, and the run's id (the checkpoint's, or a new one)."""

    step: int
    run_id: str


def resume_training(
    settings: TrainingSettings,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None = None,
) -> Resumed:
    """Load ``--resume_from_checkpoint`` (if any) into the model and training state.

    With ``latest``, a checkpoint that cannot be read is skipped with a warning naming it and the reason, and the
    next older one is tried; a checkpoint of another run configuration is refused.
    """
    output = settings.output
    fresh = Resumed(0, uuid.uuid4().hex)
    if not output.resume_from_checkpoint:
        return fresh
    candidates = resolve_checkpoint(output.output_dir, output.resume_from_checkpoint)
    if not candidates:
        logger.info("No checkpoint in %s; starting from scratch", output.output_dir)
        return fresh
    skipped = []
    for path in candidates:
        try:
            state = load_checkpoint(path, model, settings.identity())
            _restore(path, state, optimizer, lr_scheduler, ema)
        except CheckpointError as err:
            if output.resume_from_checkpoint != "latest" or isinstance(err, ForeignCheckpointError):
                raise
            logger.warning("Skipping %s: %s", path.name, err)
            skipped.append(path.name)
            continue
        logger.info("Resumed from %s at step %d%s", path, state["step"], f" (skipped {skipped})" if skipped else "")
        return Resumed(state["step"], state.get("run", {}).get("id", fresh.run_id))
    raise CheckpointError(
        f"--resume_from_checkpoint latest: no readable checkpoint in {output.output_dir} (skipped {skipped}; see the "
        "warnings above); allowed: a folder with a valid checkpoint, or no --resume_from_checkpoint"
    )
