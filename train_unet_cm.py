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

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from peft import get_peft_model
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from capman_peft import CapManConfig, ClassConditionalPipeline, CMDenoiser
from capman_peft.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from capman_peft.data import class_balanced_sampler, load_imbalanced_dataset
from capman_peft.hub import push_to_hub, write_model_card
from capman_peft.pipelines import save_adapter_and_merge, save_class_conditional_pipeline
from capman_peft.training import (
    ConfigError,
    add_data_args,
    add_objective_args,
    add_training_args,
    check_common_args,
    diffusion_loss,
    guard_finite,
    log_values,
    make_objective,
    parse_args_with_config,
    prepare_cm,
    run_cli,
    setup_logging,
    step_seed,
    total_steps,
    write_training_summary,
)

logger = logging.getLogger("capman_peft")

# The paper's expert placement: convs and attention projections of the up path (G.1).
UP_PATH_TARGETS = r"up_blocks\..*\.(conv1|conv2|conv_shortcut|to_q|to_k|to_v|to_out\.0)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, default_dataset="imb-cifar10", default_resolution=32)
    add_objective_args(parser, default_objective="oc")
    add_training_args(parser)
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_config_name_or_path",
        default=None,
        help="UNet2DModel config (a JSON file or folder); default: the paper's preset (ch 128, "
        "mult [1,2,2,2], 2 res blocks, attention at 16x16, dropout 0.1).",
    )
    group.add_argument("--expert_rank_ratio", type=float, default=0.1, help="Expert rank / min(d, k) (paper: 0.1).")
    group.add_argument("--expert_target_modules", default=UP_PATH_TARGETS, help="Regex of layers with an expert.")
    group = parser.add_argument_group("validation")
    group.add_argument("--validation_steps", type=int, default=None, help="Sample a per-class grid every N steps.")
    group.add_argument("--validation_images_per_class", type=int, default=4, help="Columns of the grid.")
    group.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for validation.")
    group.add_argument("--guidance_scale", type=float, default=1.5, help="Classifier-free guidance scale.")
    parser.set_defaults(learning_rate=2e-4, lr_warmup_steps=5000, max_train_steps=300_000, use_ema=True)
    args = parse_args_with_config(parser, argv)
    check_common_args(args)
    return args


def build_unet(args: argparse.Namespace, num_classes: int) -> UNet2DModel:
    """The paper's UNet (or a user config), with one class embedding per class plus the null class."""
    if args.model_config_name_or_path:
        config = UNet2DModel.load_config(args.model_config_name_or_path)
    else:
        levels = 4
        attention = [args.resolution // 2**i == 16 for i in range(levels)]
        config = dict(
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            dropout=0.1,
            attention_head_dim=64,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        )
    config.update(sample_size=args.resolution, num_class_embeds=num_classes + 1)
    return UNet2DModel.from_config(config)


def save_validation_grid(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    class_names: list[str],
    args: argparse.Namespace,
    step: int,
) -> Path:
    """A per-class sample grid (rows = classes), saved as PNG and sent to the trackers."""
    pipeline = ClassConditionalPipeline(
        unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config), id2label=dict(enumerate(class_names))
    )
    pipeline.set_progress_bar_config(disable=True)
    labels = [c for c in range(len(class_names)) for _ in range(args.validation_images_per_class)]
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    was_training = unet.training
    unet.eval()
    with torch.no_grad():
        images = pipeline(
            class_labels=labels,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
        ).images
    unet.train(was_training)
    grid = make_image_grid(images, rows=len(class_names), cols=args.validation_images_per_class)
    path = Path(args.output_dir) / "validation" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid)}, step=step)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    setup_logging(accelerator.is_main_process)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)

    # Data: the long-tailed training set (Cao et al. subsampling), class 0 largest.
    dataset = load_imbalanced_dataset(
        args.dataset,
        split="train",
        imbalance_ratio=args.imbalance_ratio,
        resolution=args.resolution,
        dataset_name=args.dataset_name,
        train_data_dir=args.train_data_dir,
        class_order=args.class_order.split(",") if args.class_order else None,
        seed=args.data_seed,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
    )
    class_names, class_counts = list(dataset.class_names), list(dataset.class_counts)
    num_classes = len(class_names)
    logger.info("%s: %d images, %d classes, counts %s", args.dataset, len(dataset), num_classes, class_counts)
    cm = prepare_cm(args, class_counts, class_names, accelerator.device)

    # Model: plain UNet (baseline) or the UNet with reserved experts in the up path (CM, full mode).
    unet = build_unet(args, num_classes)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model: torch.nn.Module = unet
    if cm is not None:
        model = get_peft_model(
            unet,
            CapManConfig(
                mode="full", expert_rank_ratio=args.expert_rank_ratio, target_modules=args.expert_target_modules
            ),
        )
    denoiser = CMDenoiser(model, forward_mode=args.cm_forward, capacity_manipulation=cm is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=args.ema_decay) if args.use_ema else None
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    objective = make_objective(args, noise_scheduler, class_counts)

    # Data order depends only on (seed, epoch): resumed runs see the same batches.
    order = torch.Generator()
    sampler = (
        class_balanced_sampler(dataset.labels, generator=order)
        if args.sampler == "balanced"
        else RandomSampler(dataset, generator=order)
    )
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    if len(dataloader) == 0:
        raise ConfigError(f"--train_batch_size {args.train_batch_size} exceeds the {len(dataset)} training images")
    optimizer = torch.optim.Adam(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    max_steps, _ = total_steps(args, len(dataloader) // accelerator.num_processes)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    denoiser, optimizer, dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    steps_per_epoch = max(1, len(dataloader) // args.gradient_accumulation_steps)
    num_epochs = -(-max_steps // steps_per_epoch)

    global_step = 0
    if args.resume_from_checkpoint:
        path = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        if path is None:
            logger.info("No checkpoint in %s; starting from scratch", output_dir)
        else:
            state = load_checkpoint(path, accelerator.unwrap_model(denoiser).unet)
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            global_step = state["step"]
            logger.info("Resumed from %s at step %d", path, global_step)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "capman-unet", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    logger.info(
        "Training %d steps (%d epochs), batch %d x %d processes x %d accumulation",
        max_steps,
        num_epochs,
        args.train_batch_size,
        accelerator.num_processes,
        args.gradient_accumulation_steps,
    )
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process)
    logs: dict[str, float] = {}
    start = time.time()
    first_epoch, skip = divmod(global_step, steps_per_epoch)
    for epoch in range(first_epoch, num_epochs):
        order.manual_seed(args.seed * 100_003 + epoch)
        batches = dataloader
        if epoch == first_epoch and skip:
            batches = accelerator.skip_first_batches(dataloader, skip * args.gradient_accumulation_steps)
        for micro, batch in enumerate(batches):
            seed = step_seed(
                args.seed,
                global_step * args.gradient_accumulation_steps + micro % args.gradient_accumulation_steps,
                accelerator.process_index,
            )
            torch.manual_seed(seed)  # model dropout
            generator = torch.Generator(accelerator.device).manual_seed(seed)
            with accelerator.accumulate(denoiser):
                loss, step_logs = diffusion_loss(
                    denoiser,
                    objective,
                    noise_scheduler,
                    batch["pixel_values"],
                    batch["label"],
                    num_classes=num_classes,
                    label_dropout=args.label_dropout,
                    cm=cm,
                    generator=generator,
                )
                guard_finite(global_step + 1, step_logs)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(params)
            global_step += 1
            progress.update(1)
            logs = log_values(step_logs, lr_scheduler.get_last_lr()[0])
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
                if ema is not None:
                    state["ema"] = ema.state_dict()
                save_checkpoint(
                    output_dir,
                    global_step,
                    accelerator.unwrap_model(denoiser).unet,
                    state,
                    args.checkpoints_total_limit,
                )
            if accelerator.is_main_process and args.validation_steps and global_step % args.validation_steps == 0:
                if ema is not None:
                    ema.store(params)
                    ema.copy_to(params)
                base = accelerator.unwrap_model(denoiser).unet
                unet_for_sampling = base.get_base_model() if cm is not None else base
                save_validation_grid(accelerator, unet_for_sampling, noise_scheduler, class_names, args, global_step)
                if ema is not None:
                    ema.restore(params)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    progress.close()
    train_seconds = time.time() - start

    # Export: merged (EMA) weights as a plain pipeline, the unmerged adapter beside it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(denoiser).unet
        if ema is not None:
            ema.copy_to(params)
        inference_scheduler = DDIMScheduler.from_config(noise_scheduler.config)
        if cm is not None:
            grid_unet = save_adapter_and_merge(model, output_dir)
        else:
            grid_unet = model
        save_class_conditional_pipeline(grid_unet, inference_scheduler, class_names, output_dir)
        cm_settings = (
            None
            if cm is None
            else {
                "mode": "full",
                "expert_rank_ratio": args.expert_rank_ratio,
                "lambda": args.cm_lambda,
                "w_con": args.cm_consistency_weight,
                "w_div": args.cm_diversity_weight,
                "objective": args.objective,
            }
        )
        write_training_summary(
            output_dir / "training_summary.json",
            args,
            class_names,
            class_counts,
            logs,
            steps=global_step,
            train_seconds=round(train_seconds, 1),
        )
        write_model_card(
            output_dir,
            base_model=None,
            dataset=args.dataset,
            imbalance_ratio=args.imbalance_ratio,
            class_names=class_names,
            class_counts=class_counts,
            cm_settings=cm_settings,
            pipeline_note="Load with `capman_peft.ClassConditionalPipeline.from_pretrained(path)` or "
            '`DiffusionPipeline.from_pretrained(path, custom_pipeline="pipeline", '
            "trust_remote_code=True)`.",
        )
        grid = save_validation_grid(accelerator, grid_unet, noise_scheduler, class_names, args, global_step)
        (output_dir / "samples.png").write_bytes(grid.read_bytes())
        logger.info(
            "Saved the pipeline to %s (%.0f s of training); samples in %s",
            output_dir,
            train_seconds,
            output_dir / "samples.png",
        )
        logger.info("Final losses: %s", json.dumps({k: round(v, 5) for k, v in logs.items()}))
        if args.push_to_hub:
            repo = push_to_hub(output_dir, args.hub_model_id, args.hub_token)
            logger.info("Pushed to https://huggingface.co/%s", repo)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
