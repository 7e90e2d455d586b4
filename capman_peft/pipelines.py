"""Exporting a trained model, for every family: the adapter in PEFT format beside the merged model, the adapter as
diffusers LoRA files (θ and θ^g), and sample grids. What a family's own pipeline looks like is in
``capman_peft.families``.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

__all__ = [
    "image_grid",
    "save_adapter_and_merge",
    "save_lora_weights",
]

# diffusers' LoRA file names: the full model theta (what users load), and theta^g alone for analysis.
LORA_FILE = "pytorch_lora_weights.safetensors"
GENERAL_LORA_FILE = "pytorch_lora_weights_general.safetensors"


# Beside the adapter: the id of the run that wrote it, also in training_summary.json, so that an adapter left over
# from an earlier run in the same folder is never taken for this pipeline's.
RUN_FILE = "capman_run.json"


def lora_state_dict(model: torch.nn.Module, include_expert: bool = True) -> dict[str, torch.Tensor]:
    """The CapMan adapter of a lora-mode model as one plain LoRA (PEFT key names, ``lora_A`` / ``lora_B``): theta
    with the expert, or theta^g without it. ``W^f + B A`` then equals the merged weight."""
    from .tuner import CapManLayer, base_model

    base = base_model(model)
    state = {}
    for name, layer in base.named_modules():
        if isinstance(layer, CapManLayer) and layer.capman_A:
            (adapter,) = layer.capman_A.keys()
            a, b = layer.lora_factors(adapter, include_expert)
            if a.ndim == 4:  # conv: B is a 1x1 conv
                b = b[:, :, None, None]
            state[f"{name}.lora_A.weight"] = a.contiguous()
            state[f"{name}.lora_B.weight"] = b.contiguous()
    return state


def uniform_rank(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every LoRA pair of `state` at the largest rank, the extra rows of A and columns of B zero: B A is unchanged.

    A file without alphas is loaded with scale 1 on every module only when its ranks agree: diffusers before 0.42
    takes one alpha for the whole file (the first module's rank), so a module of another rank (one with no expert
    next to ones with an expert) would load with the wrong scale.
    """
    rank = max(value.shape[0] for key, value in state.items() if key.endswith("lora_A.weight"))
    padded = {}
    for key, value in state.items():
        missing = rank - (value.shape[0] if key.endswith("lora_A.weight") else value.shape[1])
        if missing and key.endswith("lora_A.weight"):
            value = torch.cat([value, value.new_zeros(missing, *value.shape[1:])])
        elif missing:
            value = torch.cat([value, value.new_zeros(value.shape[0], missing, *value.shape[2:])], dim=1)
        padded[key] = value
    return padded


LoraWriter = Callable[[dict[str, torch.Tensor], Path, str], None]
"""Writes diffusers-format LoRA layers to a folder under a file name, as a family's pipeline reads them."""


def save_lora_weights(model: torch.nn.Module, output_dir: str | Path, write: LoraWriter) -> list[Path]:
    """Write the adapter as diffusers LoRA files that the family's ``load_lora_weights`` reads (`write`: the family's
    writer): ``pytorch_lora_weights.safetensors`` (theta = general + expert) and ``..._general.safetensors``
    (theta^g), each at one rank (:func:`uniform_rank`)."""
    written = []
    for name, include_expert in ((LORA_FILE, True), (GENERAL_LORA_FILE, False)):
        write(uniform_rank(lora_state_dict(model, include_expert)), Path(output_dir), name)
        written.append(Path(output_dir) / name)
    return written


def save_plain_lora_and_merge(model: torch.nn.Module, output_dir: str | Path, write: LoraWriter) -> torch.nn.Module:
    """The baseline (a plain PEFT LoRA, no expert): ``pytorch_lora_weights.safetensors`` as diffusers' own LoRA
    scripts write it, and the merged model. No ``adapter/``: there is no θ^g to evaluate."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    write(convert_state_dict_to_diffusers(state), Path(output_dir), LORA_FILE)
    return model.merge_and_unload()


def save_adapter(model: torch.nn.Module, output_dir: str | Path, run_id: str) -> None:
    """Write the unmerged CapMan adapter to ``output_dir/adapter`` (PEFT format, with the run's id)."""
    adapter = Path(output_dir) / "adapter"
    model.save_pretrained(str(adapter), safe_serialization=True)
    (adapter / RUN_FILE).write_text(json.dumps({"run_id": run_id}))


def save_adapter_and_merge(model: torch.nn.Module, output_dir: str | Path, run_id: str) -> torch.nn.Module:
    """Write the unmerged CapMan adapter (:func:`save_adapter`), then merge theta^g + theta^e.

    The returned module is a plain diffusers model: zero inference overhead. `model` must not be used afterwards.
    """
    save_adapter(model, output_dir, run_id)
    return model.merge_and_unload()


def image_grid(images: Sequence[Image.Image], rows: int, cols: int, min_size: int = 64, pad: int = 2) -> Image.Image:
    """A rows x cols grid on white; tiny images (8-32 px) are enlarged without smoothing so digits stay legible."""
    width, height = images[0].size
    scale = max(1, -(-min_size // max(width, height)))
    cell_w, cell_h = width * scale, height * scale
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    for index, image in enumerate(images[: rows * cols]):
        row, col = divmod(index, cols)
        cell = image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(cell, (pad + col * (cell_w + pad), pad + row * (cell_h + pad)))
    return grid
