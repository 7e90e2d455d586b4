#!/usr/bin/env python
"""Fine-tune Stable Diffusion with LoRA and Capacity Manipulation on class-imbalanced data (paper sec. 4.2).

    accelerate launch train_text_to_image_cm.py --dataset imb-artbench10 --imbalance_ratio 100

The defaults are the paper's Imb. ArtBench-10 recipe: lambdalabs/miniSD-diffusers at 256 px, a CapMan adapter in lora
mode on the attention projections (general rank 128, expert rank 8, dropout 0.1), the prompt "a {class} painting",
AdamW (lr 3e-4, weight decay 1e-6), batch 64, 100 epochs. With --no_capacity_manipulation the same script trains the
plain rank-128 LoRA baseline. The output folder is an ordinary StableDiffusionPipeline with the adapter merged into
the UNet (no capman_peft needed to load it), plus adapter/, training_summary.json and a model card.

Work done once per run: the C class prompts and the empty prompt are encoded in one text-encoder call, after which
the text encoder leaves the device; with --cache_latents every image is VAE-encoded once per flip state before
training.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import (
    SchedulerMixin,
)
from diffusers.utils.import_utils import is_xformers_available
from torch.utils.data import Dataset

from capman_peft.data import get_dataset_spec
from capman_peft.errors import ConfigError, run_cli
from capman_peft.expert_use import summarize_expert_use
from capman_peft.families import StableDiffusionFamily, cast_frozen_weights
from capman_peft.families.stable_diffusion import (
    BASE_LICENSE,
    DEFAULT_RESOLUTION,
    StableDiffusionSettings,
    add_adapter,
    base_family,
    cache_latents,
    card,
    export_pipeline,
    export_unet,
    grid_pipeline,
    load_base,
    prompts_per_class,
    sample_class_grid,
)
from capman_peft.flags import (
    check_every_flag_placed,
    module_patterns,
    nonnegative_float,
    positive_float,
    positive_int,
    probability,
    prompt_template_value,
    script_parser,
    section,
)
from capman_peft.recipes import parse_settings
from capman_peft.settings import ObjectiveSettings, TrainingSettings
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

# The LoRA mode's default is not measured on quality: no testbed of the study fine-tunes (docs/study.md).
LORA_CM_HELP = (
    "Train with the CM loss: a general LoRA and a reserved expert LoRA. On by default; the LoRA mode has no quality "
    "testbed yet, so neither this default nor --cm_form's is measured for it (the from-scratch script has CM off "
    "by default after its testbeds, docs/study.md). --no_capacity_manipulation: one plain LoRA."
)

BASE_MODEL = "lambdalabs/miniSD-diffusers"
ATTENTION_PROJECTIONS = "to_q,to_k,to_v,to_out.0"


def parse_args(argv: Sequence[str] | None = None) -> TrainingSettings:
    """The run's typed settings from the command line (and ``--config``), checked before any work."""
    parser = script_parser(
        __doc__, dataset="imb-artbench10", resolution=None, objective="ddpm", validation_epochs=10, guidance_scale=7.5,
        capacity_manipulation=True, capacity_manipulation_help=LORA_CM_HELP,
    )  # fmt: skip
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        default=BASE_MODEL,
        help="Stable Diffusion 1.x/2.x or SDXL pipeline to fine-tune (Hub id or local folder; the family is read from "
        "its model_index.json); the paper uses miniSD (256 px).",
    )
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE to use instead of the base pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix for fp16 SDXL training).",
    )
    group.add_argument("--revision", default=None, help="Revision of the base model on the Hub.")
    group.add_argument("--variant", default=None, help='Weight variant of the base model files, e.g. "fp16".')
    group.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")
    group.add_argument("--rank", type=positive_int, default=128, help="Rank of the general LoRA adapter (paper: 128).")
    group.add_argument("--expert_rank", type=positive_int, default=8, help="Rank of the reserved expert (paper: 8).")
    group.add_argument(
        "--lora_alpha", type=positive_float, default=None, help="General adapter alpha (default: --rank)."
    )
    group.add_argument(
        "--expert_alpha", type=positive_float, default=None, help="Expert alpha (default: --expert_rank)."
    )
    group.add_argument(
        "--lora_dropout", type=probability, default=0.1, help="Dropout on the adapter input (paper: 0.1)."
    )
    group.add_argument(
        "--target_modules",
        type=module_patterns,
        default=ATTENTION_PROJECTIONS,
        help="UNet layers that get the adapter: comma-separated names or name suffixes, or one regex.",
    )
    group.add_argument(
        "--expert_target_modules",
        type=module_patterns,
        default=None,
        help="Layers that also get the expert (default: all targets).",
    )
    group.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention."
    )
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (saves memory).")
    group = parser.add_argument_group("text and latents")
    group.add_argument(
        "--prompt_template",
        type=prompt_template_value,
        default=None,
        help='Class prompt; "{}" is the class name ("a" before it becomes "an" before a vowel). Default: the named '
        'dataset\'s ("a {} painting" for imb-artbench10, "a photo of a {}" for CIFAR), else "a {} painting".',
    )
    group.add_argument(
        "--caption_column",
        default=None,
        help="Per-image captions: the caption column of a --dataset_name or of a --train_data_dir metadata.jsonl. Each "
        "image trains on its own caption; its class (--class_column) still decides the CM weights, the splits and the "
        "evaluation. Default: none (the class prompt for every image).",
    )
    group.add_argument(
        "--validation_prompts_per_class",
        default=None,
        help='A JSON file {"class name": "prompt", ...}: the class prompts of the validation grids, the expert-use '
        "report and capman-eval, instead of --prompt_template (useful with --caption_column).",
    )
    group.add_argument(
        "--caption_dropout",
        "--proportion_empty_prompts",
        dest="label_dropout",
        type=probability,
        default=argparse.SUPPRESS,
        help="Probability of training on the empty prompt instead (classifier-free guidance); same as "
        "--label_dropout. Default 0.1, as in Stable Diffusion's own training.",
    )
    group.add_argument(
        "--noise_offset", type=nonnegative_float, default=0.0, help="Noise offset (diffusers' flag; 0: off)."
    )
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="VAE-encode every training image once per flip state before training (implies a center crop).",
    )
    group = parser.add_argument_group("export")
    group.add_argument(
        "--push_merged_pipeline",
        action="store_true",
        help="With --push_to_hub, upload the whole merged pipeline folder instead of only the LoRA file and card.",
    )
    group.add_argument(
        "--license",
        default=None,
        help=f"License in the model card; default: the base model card's, else {BASE_LICENSE}.",
    )
    # theta^g on a quarter of each batch: the CM step costs ~1.25x plain LoRA instead of ~2x (docs/benchmarks.md),
    # with the same CM loss in expectation (importance-weighted rows).
    parser.set_defaults(
        learning_rate=3e-4,
        adam_weight_decay=1e-6,
        num_train_epochs=100,
        lr_warmup_steps=0,
        label_dropout=0.1,
        cm_general_fraction=0.25,
    )
    args, settings = parse_settings(parser, argv)
    check_adapter_flags(args, settings.objective)
    # Last, as it reads the base model's model_index.json: the family decides the default resolution.
    template = args.prompt_template or get_dataset_spec(settings.data.dataset).prompt_template
    family = base_family(args.pretrained_model_name_or_path, cache_dir=args.cache_dir, revision=args.revision)
    model = section(StableDiffusionSettings, args, prompt_template=template, family=family)
    data = settings.data
    if data.resolution is None:
        data = dataclasses.replace(data, resolution=DEFAULT_RESOLUTION[family])
    settings = dataclasses.replace(settings, data=data, model=model)
    check_family_settings(settings)
    check_every_flag_placed(args, settings)
    return settings


def check_adapter_flags(args: argparse.Namespace, objective: ObjectiveSettings) -> None:
    """The adapter and optional-package flags, checked before the base model is read."""
    cm = objective.capacity_manipulation
    if args.resolution is not None and args.resolution % 8:
        raise ConfigError(
            f"--resolution {args.resolution}: the VAE downsamples by 8; allowed: a positive multiple of 8"
        )
    if cm and not args.expert_rank < args.rank:
        raise ConfigError(
            f"--expert_rank {args.expert_rank}: not below --rank {args.rank}; allowed: 1 .. rank - 1 (paper: r_e < r_g)"
        )
    if cm and objective.cm_forward == "shared_prefix" and not args.expert_target_modules:
        raise ConfigError(
            "--cm_forward shared_prefix: computes the down path once for theta and theta^g, but the experts sit on "
            "every target layer, the down path's too; allowed: --cm_forward fused, or --expert_target_modules with "
            "up_blocks layers only (e.g. 'up_blocks.*(to_q|to_k|to_v|to_out.0)')"
        )
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "--use_8bit_adam: needs bitsandbytes, which is not installed; allowed: pip install bitsandbytes"
        )
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise ConfigError(
            "--enable_xformers_memory_efficient_attention: needs xformers, which is not installed; allowed: pip "
            "install xformers"
        )


def check_family_settings(settings: TrainingSettings) -> None:
    """What the base model's family and the text flags require."""
    if settings.model.validation_prompts_per_class:
        prompts_per_class(settings.model.validation_prompts_per_class, None)
    if settings.data.caption_column and settings.objective.objective == "cbdm":
        raise ConfigError(
            f"--caption_column {settings.data.caption_column}: CBDM conditions each image on a second, drawn class, "
            "which has a class prompt but no caption of that image; allowed: --objective ddpm or oc with captions"
        )
    if settings.model.xl and not (settings.data.center_crop or settings.model.cache_latents):
        raise ConfigError(
            "--center_crop: needed for SDXL, whose time ids give the crop's position (a center crop's follows from "
            "the image size); allowed: --center_crop or --cache_latents"
        )


def publish_validation_grid(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    *,
    family: StableDiffusionFamily,
    noise_scheduler: SchedulerMixin,
    settings: TrainingSettings,
    class_counts: Sequence[int],
    epoch: int,
    step: int,
) -> Path:
    """A per-class grid from the model being trained (adapters active, dropout off), saved and sent to trackers."""
    pipeline = grid_pipeline(unet, family.vae, noise_scheduler, xl=settings.model.xl)
    was_training = unet.training
    unet.eval()
    grid = sample_class_grid(pipeline, family, settings, frozen_weight_dtype(accelerator), class_counts)
    unet.train(was_training)
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
    base = load_base(settings, dataset, weight_dtype, device)
    vae, noise_scheduler, unet = base.vae, base.noise_scheduler, base.unet
    train_set: Dataset = dataset
    if model_settings.cache_latents:
        train_set = cache_latents(vae, dataset, data.random_flip, settings, not accelerator.is_main_process)

    if settings.optimization.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if model_settings.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    torch.manual_seed(settings.optimization.seed)  # adapter initialisation independent of the data work above
    model = add_adapter(unet, settings)
    cast_frozen_weights(model, weight_dtype)
    objective = make_objective(settings.objective, noise_scheduler, dataset.class_counts)
    optimizer_cls = torch.optim.AdamW
    if model_settings.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    family = base.family
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
    )
    logger.info("Frozen weights in %s, adapters in float32", weight_dtype)
    step_loss = family_step_loss(
        family, run.denoiser, objective, noise_scheduler, num_classes=dataset.num_classes, cm=cm
    )

    def validate_grid(trained: torch.nn.Module, epoch: int, step: int) -> None:
        publish_validation_grid(
            accelerator,
            trained.get_base_model(),
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
        model, report = export_unet(settings, final_model(accelerator, run)), None
        if cm is not None:  # in float32: the report's distances have no mixed-precision rounding floor
            report = summarize_expert_use(model.to(device), noise_scheduler, dataset, family)
        with staged_export(settings.output.output_dir) as out:
            pipeline = export_pipeline(settings, model, noise_scheduler, out, run.run_id)
            pipeline.set_progress_bar_config(disable=True)
            samples = sample_class_grid(pipeline.to(device), family, settings, torch.float32, dataset.class_counts)
            finish_export(
                accelerator, settings, out, run_id=run.run_id, dataset=dataset, trained=trained,
                expert_report=report, samples=samples, card=card(settings, base.prompts, dataset.class_counts),
                summary=dict(prompts=base.prompts),
            )  # fmt: skip
        # A CM run shares its LoRA file (and card); the merged 4 GB pipeline only when asked.
        lora_only = settings.objective.capacity_manipulation and not model_settings.push_merged_pipeline
        publish_export(settings, trained, lora_only=lora_only)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
