#!/usr/bin/env python
"""Fine-tune Stable Diffusion with LoRA and Capacity Manipulation on class-imbalanced data (paper sec. 4.2).

    accelerate launch train_text_to_image_cm.py --dataset imb-artbench10 --imbalance_ratio 100

The defaults are the paper's Imb. ArtBench-10 recipe: lambdalabs/miniSD-diffusers at 256 px, a CapMan adapter in lora
mode on the attention projections (general rank 128, expert rank 8, dropout 0.1), the prompt "a {class} painting",
AdamW (lr 3e-4, weight decay 1e-6), batch 64, 100 epochs. With --no_capacity_manipulation the same script trains the
plain rank-128 LoRA baseline. With --model_config_name_or_path it trains a UNet from scratch instead, without CM
unless --capacity_manipulation is given (docs/study.md, testbed 5). The output folder is an ordinary
StableDiffusionPipeline with the adapter merged into the UNet (no capman_peft needed to load it), plus adapter/,
training_summary.json and a model card.

Work done once per run: the C class prompts and the empty prompt are encoded in one text-encoder call, after which
the text encoder leaves the device; with --cache_latents every image is VAE-encoded once per flip state before
training.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import SchedulerMixin
from peft import PeftModel
from torch.utils.data import Dataset

from capman_peft.data import get_dataset_spec
from capman_peft.errors import ConfigError, run_cli
from capman_peft.expert_use import summarize_expert_use
from capman_peft.families import PretrainedFamily, cast_frozen_weights, family_named
from capman_peft.families.pretrained import (
    PretrainedModelSettings,
    add_adapter,
    base_family,
    prompts_per_class,
    sample_class_grid,
)
from capman_peft.families.pretrained_output import card, export_model, export_pipeline
from capman_peft.flags import check_every_flag_placed, section
from capman_peft.flags.fine_tuning import check_adapter_flags, fine_tuning_parser
from capman_peft.recipes import parse_settings
from capman_peft.settings import TrainingSettings
from capman_peft.training.export import (
    final_model,
    finish_export,
    publish_export,
    publish_image,
    staged_export,
)
from capman_peft.training.loop import TrainingCallbacks, family_step_loss, train
from capman_peft.training.setup import (
    frozen_weight_dtype,
    load_training_data,
    make_accelerator,
    make_objective,
    prepare_cm,
    prepare_training,
)

logger = logging.getLogger("capman_peft")


def parse_args(argv: Sequence[str] | None = None) -> TrainingSettings:
    """The run's typed settings from the command line (and ``--config``), checked before any work."""
    parser = fine_tuning_parser(__doc__)
    args, settings = parse_settings(parser, argv)
    check_adapter_flags(parser, args, settings.objective)
    # Last, as it reads the base model's model_index.json: the family decides the default resolution and targets.
    template = args.prompt_template or get_dataset_spec(settings.data.dataset).prompt_template
    family = base_family(args.pretrained_model_name_or_path, cache_dir=args.cache_dir, revision=args.revision)
    unset = {flag: value for flag, value in family.flag_defaults.items() if getattr(args, flag) is None}
    vars(args).update(unset)
    guidance = args.guidance_scale if family.guidance_embedded else None
    model = section(
        PretrainedModelSettings, args, prompt_template=template, family=family.name, guidance_embedding=guidance
    )
    settings = family.resolve(dataclasses.replace(settings.with_flags(unset), model=model))
    check_text_settings(settings)
    family.check_settings(settings)
    check_every_flag_placed(args, settings)
    return settings


def check_text_settings(settings: TrainingSettings) -> None:
    """What the text flags require."""
    data = settings.data
    if settings.model.validation_prompts_per_class:
        prompts_per_class(settings.model.validation_prompts_per_class, None)
    described = data.dataset is not None and get_dataset_spec(data.dataset).text_layout is not None
    if data.caption_column and described:
        raise ConfigError(
            f"--caption_column {data.caption_column}: --dataset {data.dataset} brings its own per-image "
            "descriptions; allowed: leave it unset"
        )
    if (data.caption_column or described) and settings.objective.objective == "cbdm":
        captions = f"--caption_column {data.caption_column}" if data.caption_column else f"--dataset {data.dataset}"
        raise ConfigError(
            f"{captions}: CBDM conditions each image on a second, drawn class, which has a class prompt but no "
            "caption of that image; allowed: --objective ddpm or oc with captions"
        )


def publish_validation_grid(
    accelerator: Accelerator,
    denoiser: torch.nn.Module,
    *,
    family: PretrainedFamily,
    noise_scheduler: SchedulerMixin,
    settings: TrainingSettings,
    class_counts: Sequence[int],
    epoch: int,
    step: int,
) -> Path:
    """A per-class grid from the model being trained (adapters active, dropout off), saved and sent to trackers."""
    pipeline = family.grid_pipeline(denoiser, noise_scheduler)
    was_training = denoiser.training
    denoiser.eval()
    grid = sample_class_grid(pipeline, family, settings, frozen_weight_dtype(accelerator), class_counts)
    denoiser.train(was_training)
    path = Path(settings.output.output_dir) / "validation" / f"epoch-{epoch:03d}.png"
    return publish_image(accelerator, grid, path, step)


def main(argv: Sequence[str] | None = None, callbacks: TrainingCallbacks | None = None) -> None:
    settings = parse_args(argv)
    data, model_settings = settings.data, settings.model
    accelerator = make_accelerator(settings)
    device = accelerator.device
    # Frozen weights (VAE, text encoder, UNet base) in the precision in effect, adapters in float32.
    weight_dtype = frozen_weight_dtype(accelerator)
    # Flips are drawn per step (see StepRandomness), not by the data transform.
    center_crop = data.center_crop or model_settings.cache_latents
    dataset = load_training_data(data, center_crop=center_crop, random_flip=False)
    cm = prepare_cm(settings.objective, dataset, device)
    family_type = family_named(model_settings.family)
    base = family_type.load_base(settings, dataset, weight_dtype, device)
    noise_scheduler, denoiser, family = base.noise_scheduler, base.denoiser, base.family
    train_set: Dataset = dataset
    if model_settings.cache_latents:
        train_set = family.cache_latents(dataset, data.random_flip, settings, not accelerator.is_main_process)

    if settings.optimization.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if model_settings.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()
    torch.manual_seed(settings.optimization.seed)  # adapter initialisation independent of the data work above
    model = add_adapter(denoiser, settings)
    cast_frozen_weights(model, weight_dtype)
    objective = make_objective(
        settings.objective, noise_scheduler, dataset.class_counts, weighting=family_type.weighting(settings)
    )
    optimizer_cls = torch.optim.AdamW
    if model_settings.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    run = prepare_training(
        accelerator,
        settings,
        model,
        cm=cm,
        objective=objective,
        optimizer_cls=optimizer_cls,
        train_set=train_set,
        labels=dataset.labels,
        sample_shape=base.latent_shape,
        project="capman-text-to-image",
        family=family,
        noise_offset=model_settings.noise_offset,
        flip=data.random_flip,
        latent_noise=True,
        caption_draw=dataset.captions is not None,
    )
    logger.info("Frozen weights in %s, adapters in float32", weight_dtype)
    step_loss = family_step_loss(
        family, run.denoiser, objective, num_classes=dataset.num_classes, cm=cm, coral=run.coral
    )

    def validate_grid(trained: torch.nn.Module, epoch: int, step: int) -> None:
        publish_validation_grid(
            accelerator,
            trained.get_base_model() if isinstance(trained, PeftModel) else trained,
            family=family,
            noise_scheduler=noise_scheduler,
            settings=settings,
            class_counts=dataset.class_counts,
            epoch=epoch,
            step=step,
        )

    trained = train(accelerator, settings, run, step_loss=step_loss, validate=validate_grid, callbacks=callbacks)

    # Export: the merged pipeline (EMA weights where EMA is on) with the unmerged adapter beside it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model, report = export_model(family_type, settings, final_model(accelerator, run)), None
        if cm is not None:  # in float32: the report's distances have no mixed-precision rounding floor
            report = summarize_expert_use(model.to(device), noise_scheduler, dataset, family)
        with staged_export(settings.output.output_dir) as out:
            pipeline = export_pipeline(family_type, settings, model, noise_scheduler, out, run.run_id)
            pipeline.set_progress_bar_config(disable=True)
            samples = sample_class_grid(pipeline.to(device), family, settings, torch.float32, dataset.class_counts)
            finish_export(
                accelerator, settings, out, run_id=run.run_id, dataset=dataset, trained=trained,
                expert_report=report, samples=samples, summary=dict(prompts=base.prompts),
                card=card(family_type, settings, base.prompts, dataset.class_counts),
            )  # fmt: skip
        # A CM run shares its LoRA file (and card); the merged 4 GB pipeline only when asked.
        lora_only = settings.objective.capacity_manipulation and not model_settings.push_merged_pipeline
        lora_only = lora_only and model_settings.unet_config is None  # from scratch there is no LoRA file
        publish_export(settings, trained, lora_only=lora_only)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
