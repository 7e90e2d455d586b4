#!/usr/bin/env python
"""Train a class-conditional UNet2DModel from scratch on class-imbalanced data with Capacity Manipulation.

    accelerate launch train_unet_cm.py --dataset imb-cifar100 --imbalance_ratio 100 --capacity_manipulation
    python train_unet_cm.py --config configs/demo_digits.yaml          # CPU demo, a few minutes

CM is opt-in (--capacity_manipulation; off by default, see its --help): it runs in full mode, the UNet's weights
are the general part theta^g and a low-rank expert (rank 10% of each weight) is reserved in the up path (paper G.1).
Without it the same script is the plain DDPM / CBDM / OC baseline with one UNet call per step, and --sampler
balanced, --ada_probability, --focal_gamma and --group_experts give the paper's other baselines (docs/recipes.md).
The output folder is a ClassConditionalPipeline with merged (EMA) weights, plus adapter/ (CM runs),
training_summary.json and a model card.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import get_peft_model

from capman_peft import CapManConfig
from capman_peft.data import SPLITS, split_of_class
from capman_peft.errors import ConfigError, run_cli
from capman_peft.expert_use import summarize_expert_use
from capman_peft.families import ClassConditionalFamily
from capman_peft.families.class_conditional import (
    CM_QUALITY_NOTE,
    CONSISTENCY_PIPELINE_NOTE,
    PIPELINE_NOTE,
    UP_PATH_TARGETS,
    GroupExpertFamily,
    UNetSettings,
    add_augment_embedding,
    build_unet,
    check_consistency_flags,
    check_expert_placement,
    class_grid,
    drop_augment_embedding,
    save_trained_pipeline,
    training_scheduler,
    unet_config,
)
from capman_peft.flags import (
    check_every_flag_placed,
    fraction,
    module_patterns,
    script_parser,
)
from capman_peft.objective import CONSISTENCY, cm_card_settings
from capman_peft.pipelines import save_adapter, save_adapter_and_merge
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
    load_training_data,
    make_accelerator,
    make_objective,
    prepare_cm,
    prepare_training,
)
from capman_peft.tuner import merge_group_and_unload

logger = logging.getLogger("capman_peft")

# CM is opt-in here: measured by the study's rule, no CM form has yet passed on every testbed (docs/study.md).
FULL_CM_HELP = (
    "Train with the CM loss and a reserved expert in the up path. Off by default: on the study's 16-px MNIST "
    "testbed the shipped form (--cm_form relative, theta^g on a quarter of the batch) made the rare classes worse "
    "than plain training (docs/study.md), and no form has passed the study's rule on every testbed yet. "
    "Without it: the plain base objective, one UNet call per step."
)


def parse_args(argv: Sequence[str] | None = None) -> TrainingSettings:
    """The run's typed settings from the command line (and ``--config``), checked before any work."""
    parser = script_parser(
        __doc__, dataset="imb-cifar10", resolution=32, objective="oc", validation_epochs=0, guidance_scale=1.5,
        capacity_manipulation=False, capacity_manipulation_help=FULL_CM_HELP,
    )  # fmt: skip
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
    group.add_argument(
        "--group_experts",
        action="store_true",
        help="The paper's Group-Expert LoRA baseline (sec. E.4; with --no_capacity_manipulation): the expert of every "
        "up-path layer is split into one block per Many/Medium/Few group, each sample trains its class's block, "
        "with CM's rank budget (--expert_rank_ratio). The output holds one merged UNet per group (unet, unet_medium, "
        "unet_few); the pipeline samples each class with its group's.",
    )
    group.add_argument(
        "--ada_probability",
        type=fraction,
        default=0.0,
        help="The paper's +ADA baseline: augment each training image (x-flip, and with this probability each of "
        "y-flip, scale, rotation, anisotropy, translation) and condition the UNet on the augmentation, sampling "
        "without it (capman_peft/data/augment.py). 0.12 is the value of the CBDM authors' code; 0 (default): off. "
        "Combines with every --objective and CM.",
    )
    # shared_prefix: the experts sit in the up path only, so the down path and mid block run once for theta and
    # theta^g (fastest and leanest mode, see docs/benchmarks.md); custom expert targets elsewhere need "fused".
    # theta^g on a quarter of each batch: a CM step costs 1.26x plain training on the paper UNet instead of 1.84x,
    # with the same CM loss in expectation (the study: the partial pass within noise of the full one).
    parser.set_defaults(
        learning_rate=2e-4,
        lr_warmup_steps=5000,
        max_train_steps=300_000,
        use_ema=True,
        cm_forward="shared_prefix",
        cm_general_fraction=0.25,
    )
    args, settings = parse_settings(parser, argv)
    model = UNetSettings(
        model_config_name_or_path=args.model_config_name_or_path,
        expert_rank_ratio=args.expert_rank_ratio,
        expert_target_modules=args.expert_target_modules,
        ada_probability=args.ada_probability,
        group_experts=args.group_experts,
        unet_config=unet_config(args.model_config_name_or_path, settings.data.resolution),
    )
    settings = dataclasses.replace(settings, model=model)
    check_expert_placement(settings)
    if args.group_experts and settings.objective.capacity_manipulation:
        raise ConfigError(
            "--group_experts: is a baseline without the CM loss (one expert block per class group, no theta^g "
            "pass); allowed: --group_experts --no_capacity_manipulation"
        )
    if args.ada_probability and settings.data.random_flip:
        raise ConfigError(
            f"--random_flip with --ada_probability {args.ada_probability}: ADA flips the images itself and tells the "
            "model which ones it flipped; allowed: one of the two"
        )
    if settings.objective.objective == CONSISTENCY:
        check_consistency_flags(settings)
    check_every_flag_placed(args, settings)
    return settings


def main(argv: Sequence[str] | None = None, callbacks: TrainingCallbacks | None = None) -> None:
    settings = parse_args(argv)
    data, model_settings, output = settings.data, settings.model, settings.output
    accelerator = make_accelerator(settings)
    dataset = load_training_data(data, center_crop=data.center_crop, random_flip=data.random_flip)
    cm = prepare_cm(settings.objective, dataset, accelerator.device)

    # Model: plain UNet (baseline), or the UNet with reserved experts in the up path (CM, full mode), or with those
    # experts split into one block per class group (Group-Expert LoRA).
    unet = build_unet(model_settings.unet_config, data.resolution, dataset.num_classes)
    if model_settings.ada_probability:
        add_augment_embedding(unet)
    if settings.optimization.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model: torch.nn.Module = unet
    group_experts = model_settings.group_experts
    if cm is not None or group_experts:
        targets, groups = model_settings.expert_target_modules, len(SPLITS) if group_experts else 1
        ratio = model_settings.expert_rank_ratio
        config = CapManConfig(mode="full", expert_rank_ratio=ratio, target_modules=targets, expert_groups=groups)
        try:
            model = get_peft_model(unet, config)
        except ValueError as err:
            raise ConfigError(f"--expert_target_modules {targets}: {err}") from None
    consistency = settings.objective.objective == CONSISTENCY
    noise_scheduler = training_scheduler(consistency)
    steps = settings.optimization.max_train_steps
    objective = make_objective(settings.objective, noise_scheduler, dataset.class_counts, total_steps=steps)
    class_groups = split_of_class(dataset.splits) if group_experts else None
    if group_experts:
        sizes = ", ".join(f"{name} {len(dataset.splits[name])} classes" for name in SPLITS)
        logger.info("Group experts: one expert block per group (%s), no CM loss", sizes)
    family = GroupExpertFamily(class_groups) if group_experts else ClassConditionalFamily()
    run = prepare_training(
        accelerator, settings, model, cm=cm, objective=objective, optimizer_cls=torch.optim.Adam, train_set=dataset,
        labels=dataset.labels, sample_shape=(unet.config.in_channels, data.resolution, data.resolution),
        project="capman-unet", family=family, augment_probability=model_settings.ada_probability,
    )  # fmt: skip
    step_loss = family_step_loss(
        family, run.denoiser, objective, num_classes=dataset.num_classes, cm=cm, coral=run.coral
    )

    def samplers(trained: torch.nn.Module) -> torch.nn.Module | list[torch.nn.Module]:
        """What samples: the (unmerged) UNet, or one merged UNet per class group."""
        if group_experts:
            return [merge_group_and_unload(trained, group).eval() for group in range(len(SPLITS))]
        return trained.get_base_model() if cm is not None else trained

    def grid_of(unets: torch.nn.Module | list[torch.nn.Module]):
        return class_grid(
            unets, noise_scheduler, dataset.class_names, dataset.class_counts, settings, accelerator.device,
            class_groups=class_groups,
        )  # fmt: skip

    def validate(trained: torch.nn.Module, epoch: int, step: int) -> None:
        grid = grid_of(samplers(trained))
        publish_image(accelerator, grid, Path(output.output_dir) / "validation" / f"step-{step:07d}.png", step)

    trained = train(accelerator, settings, run, step_loss=step_loss, validate=validate, callbacks=callbacks)

    # Export: merged (EMA) weights as a plain pipeline, the unmerged adapter beside it, moved into place whole.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model, report = drop_augment_embedding(final_model(accelerator, run)), None
        if cm is not None:
            report = summarize_expert_use(model, noise_scheduler, dataset, family)
        with staged_export(output.output_dir) as out:
            if group_experts:
                save_adapter(model, out, run.run_id)
                model = samplers(model)
            elif cm is not None:
                model = save_adapter_and_merge(model, out, run.run_id)
            save_trained_pipeline(model, noise_scheduler, dataset.class_names, out, class_groups)
            samples = grid_of(model)
            cm_settings = cm_card_settings(
                settings.objective, mode="full", expert_rank_ratio=model_settings.expert_rank_ratio
            )
            note = (CONSISTENCY_PIPELINE_NOTE if consistency else PIPELINE_NOTE) + (CM_QUALITY_NOTE if cm else "")
            card = dict(base_model=None, cm_settings=cm_settings, pipeline_note=note)
            finish_export(
                accelerator, settings, out, run_id=run.run_id, dataset=dataset, trained=trained,
                expert_report=report, samples=samples, card=card,
            )  # fmt: skip
        publish_export(settings, trained)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
