"""What a fine-tuning run writes, for any :class:`PretrainedFamily`: the trained adapter on a float32 base, the
merged pipeline of the family's own class with the adapter beside it (PEFT format and diffusers LoRA files), and the
model card's run-specific parts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin
from peft import PeftModel

from ..checkpointing import trainable_state
from ..data import grid_classes
from ..hub import card_license
from ..objective import cm_card_settings
from ..pipelines import save_adapter_and_merge, save_lora_weights, save_plain_lora_and_merge
from ..settings import TrainingSettings
from .pretrained import PretrainedFamily, add_adapter, base_source, load_denoiser, load_vae

BASE_LICENSE = "creativeml-openrail-m"  # miniSD's, inherited from Stable Diffusion v1
LORA_CARD_NOTE = """ The LoRA mode's CM default has no quality measurement yet: no testbed of capman-peft's study
fine-tunes (docs/study.md).

The trained adapter is also a plain diffusers LoRA (general and expert part stacked, rank r_g + r_e, scale 1):
`pytorch_lora_weights.safetensors`, and the general part alone (theta^g) in `pytorch_lora_weights_general.safetensors`.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{repo}")  # or pipe.fuse_lora() after it: no inference overhead
```"""


def export_model(family: type[PretrainedFamily], settings: TrainingSettings, trained: torch.nn.Module) -> PeftModel:
    """The trained adapter on a fresh float32 copy of the base denoiser (on the CPU): what the export merges and what
    the end-of-training expert-use report measures. Training kept the base weights in the mixed-precision dtype;
    merging into rounded weights would bake the rounding into the export, and θ and θ^g computed in bf16 differ by a
    rounding floor (~1e-5 in (ε_θ − ε_θg)², docs/method.md) that would compress the report's Few/Many ratio."""
    weights = {name: value.float().cpu() for name, value in trainable_state(trained).items()}
    model = add_adapter(load_denoiser(family, settings), settings)
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected or set(weights) != set(trainable_state(model)):
        raise RuntimeError(f"trained adapter does not fit the export model: {sorted(unexpected)[:3]}")
    return model


def export_pipeline(
    family: type[PretrainedFamily],
    settings: TrainingSettings,
    model: PeftModel,
    noise_scheduler: SchedulerMixin,
    output_dir: Path,
    run_id: str,
) -> Any:
    """Write `output_dir` (the export stage) from the float32 model of :func:`export_model`: the adapter (PEFT format
    in adapter/ and as diffusers LoRA files; the baseline's LoRA file only) and the merged float32 pipeline of the
    family's class (with the ``--pretrained_vae_model_name_or_path`` VAE where given)."""
    sd, cm = settings.model, settings.objective.capacity_manipulation
    if sd.unet_config is not None:  # from scratch: the trained UNet is the denoiser (no LoRA of a base to write)
        merged = save_adapter_and_merge(model, output_dir, run_id) if cm else model
    elif cm:
        save_lora_weights(model, output_dir, family.write_lora)  # before merging: the adapter as a diffusers LoRA
        merged = save_adapter_and_merge(model, output_dir, run_id)
    else:
        merged = save_plain_lora_and_merge(model, output_dir, family.write_lora)
    vae = {"vae": load_vae(settings)} if sd.pretrained_vae_model_name_or_path else {}
    pipeline = family.pipeline_type.from_pretrained(
        base_source(settings),
        use_safetensors=True,
        **{family.denoiser: merged},
        **vae,
        scheduler=family.inference_scheduler(noise_scheduler),
        revision=sd.revision,
        variant=sd.variant,
        cache_dir=settings.data.cache_dir,
        **({"torch_dtype": torch.float32} if sd.variant else {}),  # variant files may be fp16
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return pipeline


def base_model_license(settings: TrainingSettings) -> str:
    """``--license``, else the license in the base model's card when it is on disk, else miniSD's."""
    sd = settings.model
    if sd.license:
        return sd.license
    card = Path(sd.pretrained_model_name_or_path) / "README.md"
    if not card.parent.exists():  # a Hub id: its card counts only if it is already in the local cache
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(
                sd.pretrained_model_name_or_path,
                "README.md",
                cache_dir=settings.data.cache_dir,
                revision=sd.revision,
            )
        except ValueError:  # not a Hub id either
            cached = None
        card = Path(cached) if isinstance(cached, str) else card
    return (card_license(card) if card.is_file() else None) or BASE_LICENSE


def card(
    family: type[PretrainedFamily], settings: TrainingSettings, prompts: list[str], class_counts: Sequence[int]
) -> dict[str, Any]:
    """The model card's run-specific parts: base model, license, CM settings, how to load, widget prompts."""
    sd = settings.model
    base_is_local = Path(sd.pretrained_model_name_or_path).exists()
    note = (
        f"A plain `{family.pipeline_class}`: `DiffusionPipeline.from_pretrained(path)` loads it without "
        f"capman_peft; the saved scheduler is {family.sampler}. Class prompts: "
        + ", ".join(f'"{prompt}"' for prompt in prompts)
        + "."
        + family.card_note(settings)
    )
    scratch = sd.unet_config is not None
    if settings.objective.capacity_manipulation and not scratch:
        note += LORA_CARD_NOTE.format(
            base=sd.pretrained_model_name_or_path, repo=settings.hub.hub_model_id or "<this repo or folder>"
        )
    if scratch:
        note += (
            f" The UNet was trained from scratch (config `{Path(sd.model_config_name_or_path).name}`) in the latent "
            f"space of `{Path(sd.pretrained_model_name_or_path).name}`, whose VAE and text encoder it keeps."
        )
        adapter = dict(mode="full", expert_rank_ratio=sd.expert_rank_ratio, target_modules=sd.expert_target_modules)
    else:
        if base_is_local:
            note += f" Fine-tuned from a local base model folder `{Path(sd.pretrained_model_name_or_path).name}`."
        adapter = dict(
            mode="lora", rank=sd.rank, expert_rank=sd.expert_rank, lora_dropout=sd.lora_dropout,
            target_modules=sd.target_modules,
        )  # fmt: skip
    return dict(
        # the Hub rejects local paths
        base_model=None if base_is_local or scratch else sd.pretrained_model_name_or_path,
        cm_settings=cm_card_settings(settings.objective, **adapter),
        license=base_model_license(settings),
        pipeline_note=note,
        widget_prompts=[prompts[c] for c in grid_classes(class_counts)],  # the Hub widget: the grid's classes
    )
