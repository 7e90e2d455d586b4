"""Training checkpoints in safetensors + JSON only, written so that a crash mid-save never destroys the last good one.

A checkpoint folder ``checkpoint-<step>/`` holds ``model.safetensors`` (the trainable parameters), and
``state.safetensors`` + ``state.json`` (optimizer, LR schedule, EMA and loop counters: tensors in safetensors, the
rest in JSON). Nothing is unpickled on resume. The folder is written under a temporary name and renamed into place
only when complete; old checkpoints beyond the limit are removed only after that.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str) -> Path | None:
    """``latest`` → the newest checkpoint in `output_dir` (None if there is none); otherwise the given folder."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / path
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r}: no checkpoint at {path}")
    return path


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    training_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then prune the oldest beyond `total_limit`.

    `training_state` is any nested dict of tensors and JSON values (optimizer/scheduler/EMA ``state_dict()``s and
    loop counters).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.cpu().contiguous() for k, v in trainable_state(model).items()}, tmp / "model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    meta = _split({**training_state, "step": step}, tensors, "state")
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if final.exists():  # re-saving the same step: keep the old one until the new one is in place
        old = output_dir / f".checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if total_limit is not None:
        for stale in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(stale)
    return final


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load the trainable parameters into `model` and return the training state saved with them."""
    path = Path(path)
    weights = load_file(path / "model.safetensors")
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(weights, strict=False)
    tensors = load_file(path / "state.safetensors")
    return _join(json.loads((path / "state.json").read_text()), tensors)
