#!/usr/bin/env python
"""Train a class-conditional UNet2DModel from scratch on class-imbalanced data with Capacity Manipulation.

    accelerate launch train_unet_cm.py --dataset imb-cifar100 --imbalance_ratio 100
    python train_unet_cm.py --config configs/demo_digits.yaml          # CPU demo, a few minutes

CM runs in full mode: the UNet's weights are the general part theta^g and a low-rank expert (rank 10% of each
weight) is reserved in the up path (paper G.1). With --no_capacity_manipulation the same script is the plain
DDPM / CBDM / OC baseline with one UNet call per step. The output folder is a ClassConditionalPipeline with merged
(EMA) weights, plus adapter/, training_summary.json and a model card.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from peft import get_peft_model

from capman_peft import CapManConfig, ClassConditionalPipeline
from capman_peft.denoiser import AFTER_SPLIT
from capman_peft.errors import ConfigError, run_cli
from capman_peft.expert_use import summarize_expert_use
from capman_peft.families import ClassConditionalFamily
from capman_peft.flags import (
    fraction,
    module_patterns,
    script_parser,
)
from capman_peft.hub import hub_source
from capman_peft.pipelines import image_grid, save_adapter_and_merge, save_class_conditional_pipeline
from capman_peft.recipes import parse_settings
from capman_peft.settings import TrainingSettings
from capman_peft.training.export import (
    cm_card_settings,
    final_model,
    finish_export,
    publish_export,
    publish_image,
    staged_export,
)
from capman_peft.training.loop import TrainingCallbacks, family_step_loss, train
from capman_peft.training.setup import (
    load_training_data,
    make_accelerator,
    make_objective,
    prepare_cm,
    prepare_training,
)

logger = logging.getLogger("capman_peft")

PIPELINE_NOTE = (
    "Load with `capman_peft.ClassConditionalPipeline.from_pretrained(path)` or "
    '`DiffusionPipeline.from_pretrained(path, custom_pipeline="pipeline", trust_remote_code=True)`.'
)

# The paper's expert placement: every weight matrix of the up path (G.1): the resnets' convs and time-embedding
# projections, the attention projections and the upsampler convs.
UP_PATH_TARGETS = (
    r"up_blocks\..*\.(conv1|conv2|conv_shortcut|time_emb_proj|to_q|to_k|to_v|to_out\.0|upsamplers\.\d+\.conv)"
)


@dataclass(frozen=True)
class UNetSettings:
    """The model flags of this script, and the UNet config they resolve to."""

    model_config_name_or_path: str | None
    expert_rank_ratio: float
    expert_target_modules: str
    unet_config: dict
    """The content of --model_config_name_or_path (or the paper's preset): a moved config file does not matter."""


def parse_args(argv: Sequence[str] | None = None) -> TrainingSettings:
    """The run's typed settings from the command line (and ``--config``), checked before any work."""
    parser = script_parser(
        __doc__, dataset="imb-cifar10", resolution=32, objective="oc", validation_epochs=0, guidance_scale=1.5
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_config_name_or_path",
        default=None,
        help="UNet2DModel config (a JSON file or folder); default: the paper's preset (ch 128, "
        "mult [1,2,2,2], 2 res blocks, attention at 16x16, dropout 0.1).",
    )
    group.add_argument("--expert_rank_ratio", type=fraction, default=0.1, help="Expert rank / min(d, k) (paper: 0.1).")
    group.add_argument(
        "--expert_target_modules", type=module_patterns, default=UP_PATH_TARGETS, help="Regex of layers with an expert."
    )
    # shared_prefix: the experts sit in the up path only, so the down path and mid block run once for theta and
    # theta^g (fastest and leanest mode, see README "Benchmarks"); custom expert targets elsewhere need "fused".
    parser.set_defaults(
        learning_rate=2e-4, lr_warmup_steps=5000, max_train_steps=300_000, use_ema=True, cm_forward="shared_prefix"
    )
    args, settings = parse_settings(parser, argv)
    model = UNetSettings(
        model_config_name_or_path=args.model_config_name_or_path,
        expert_rank_ratio=args.expert_rank_ratio,
        expert_target_modules=args.expert_target_modules,
        unet_config=unet_config(args.model_config_name_or_path, settings.data.resolution),
    )
    settings = dataclasses.replace(settings, model=model)
    check_expert_placement(settings)
    return settings


def check_expert_placement(settings: TrainingSettings) -> None:
    """``--cm_forward shared_prefix`` runs the down path once for θ and θ^g, so every expert must sit after it; the
    layers the regex selects are found on a model built without memory (meta device), before any data is read."""
    objective, model = settings.objective, settings.model
    if not objective.capacity_manipulation or objective.cm_forward != "shared_prefix":
        return
    with torch.device("meta"):
        unet = build_unet(model.unet_config, settings.data.resolution, 2)
    chosen = [name for name, _ in unet.named_modules() if re.fullmatch(model.expert_target_modules, name)]
    outside = [name for name in chosen if not name.startswith(AFTER_SPLIT)]
    if outside:
        raise ConfigError(
            f"--expert_target_modules {model.expert_target_modules}: puts experts before the up path ({outside[0]}, "
            f"{len(outside)} layers), which --cm_forward shared_prefix computes once for theta and theta^g; allowed: "
            "--cm_forward fused, or experts in up_blocks only"
        )


def unet_config(model_config_name_or_path: str | None, resolution: int) -> dict:
    """The UNet2DModel config: ``--model_config_name_or_path`` or the paper's preset, checked against --resolution."""
    if model_config_name_or_path:
        name = hub_source(model_config_name_or_path, "--model_config_name_or_path")
        try:
            config = dict(UNet2DModel.load_config(name))
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"--model_config_name_or_path {model_config_name_or_path}: cannot be read "
                f"({str(err).splitlines()[0]}); allowed: a UNet2DModel config.json, or a folder or Hub id with one"
            ) from None
    else:
        levels = 4
        attention = [resolution // 2**i == 16 for i in range(levels)]
        config = dict(
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            dropout=0.1,
            attention_head_dim=64,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        )
    factor = 2 ** (len(config.get("block_out_channels", ())) - 1)
    if resolution % factor:
        raise ConfigError(
            f"--resolution {resolution}: the UNet downsamples by {factor}; allowed: a multiple of {factor}"
        )
    return config


def build_unet(config: dict, resolution: int, num_classes: int) -> UNet2DModel:
    """The UNet from `config`, with one class embedding per class plus the null class."""
    return UNet2DModel.from_config({**config, "sample_size": resolution, "num_class_embeds": num_classes + 1})


def class_grid(
    unet: torch.nn.Module, scheduler: DDPMScheduler, class_names: list[str], settings: TrainingSettings, device
):
    """A per-class sample grid (rows = classes) with DDIM and guidance, from fixed seeds."""
    pipeline = ClassConditionalPipeline(
        unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config), id2label=dict(enumerate(class_names))
    )
    pipeline.set_progress_bar_config(disable=True)
    output = settings.output
    labels = [c for c in range(len(class_names)) for _ in range(output.num_validation_images)]
    generator = torch.Generator(device).manual_seed(settings.optimization.seed)
    was_training = unet.training
    unet.eval()
    with torch.no_grad():
        images = pipeline(
            class_labels=labels,
            num_inference_steps=output.num_inference_steps,
            guidance_scale=output.guidance_scale,
            generator=generator,
        ).images
    unet.train(was_training)
    return image_grid(images, rows=len(class_names), cols=output.num_validation_images)


def main(argv: Sequence[str] | None = None, callbacks: TrainingCallbacks | None = None) -> None:
    settings = parse_args(argv)
    data, model_settings, output = settings.data, settings.model, settings.output
    accelerator = make_accelerator(settings)
    dataset = load_training_data(data, center_crop=data.center_crop, random_flip=data.random_flip)
    cm = prepare_cm(settings.objective, dataset, accelerator.device)

    # Model: plain UNet (baseline) or the UNet with reserved experts in the up path (CM, full mode).
    unet = build_unet(model_settings.unet_config, data.resolution, dataset.num_classes)
    if settings.optimization.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model: torch.nn.Module = unet
    if cm is not None:
        targets = model_settings.expert_target_modules
        config = CapManConfig(mode="full", expert_rank_ratio=model_settings.expert_rank_ratio, target_modules=targets)
        try:
            model = get_peft_model(unet, config)
        except ValueError as err:
            raise ConfigError(f"--expert_target_modules {targets}: {err}") from None
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    objective = make_objective(settings.objective, noise_scheduler, dataset.class_counts)
    family = ClassConditionalFamily()
    run = prepare_training(
        accelerator, settings, model, cm=cm, objective=objective, optimizer_cls=torch.optim.Adam, train_set=dataset,
        labels=dataset.labels, sample_shape=(unet.config.in_channels, data.resolution, data.resolution),
        project="capman-unet", family=family,
    )  # fmt: skip
    step_loss = family_step_loss(
        family, run.denoiser, objective, noise_scheduler, num_classes=dataset.num_classes, cm=cm
    )

    def validate(trained: torch.nn.Module, epoch: int, step: int) -> None:
        sampler = trained.get_base_model() if cm is not None else trained
        grid = class_grid(sampler, noise_scheduler, dataset.class_names, settings, accelerator.device)
        publish_image(accelerator, grid, Path(output.output_dir) / "validation" / f"step-{step:07d}.png", step)

    trained = train(accelerator, settings, run, step_loss=step_loss, validate=validate, callbacks=callbacks)

    # Export: merged (EMA) weights as a plain pipeline, the unmerged adapter beside it, moved into place whole.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model, report = final_model(accelerator, run), None
        if cm is not None:
            report = summarize_expert_use(model, noise_scheduler, dataset, family)
        with staged_export(output.output_dir) as out:
            if cm is not None:
                model = save_adapter_and_merge(model, out, run.run_id)
            scheduler = DDIMScheduler.from_config(noise_scheduler.config)
            save_class_conditional_pipeline(model, scheduler, dataset.class_names, out)
            samples = class_grid(model, noise_scheduler, dataset.class_names, settings, accelerator.device)
            cm_settings = cm_card_settings(
                settings.objective, mode="full", expert_rank_ratio=model_settings.expert_rank_ratio
            )
            card = dict(base_model=None, cm_settings=cm_settings, pipeline_note=PIPELINE_NOTE)
            finish_export(
                accelerator, settings, out, run_id=run.run_id, dataset=dataset, trained=trained,
                expert_report=report, samples=samples, card=card,
            )  # fmt: skip
        publish_export(settings, trained)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
