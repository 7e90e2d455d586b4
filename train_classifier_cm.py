#!/usr/bin/env python
"""Train an image classifier on class-imbalanced data with CE, LDAM-DRW or logit adjustment, with or without
Capacity Manipulation (paper sec. G.11, Tab. G.13).

    python train_classifier_cm.py --train_data_dir D/source --test_data_dir D/held_out --loss logit_adjustment \\
        --capacity_manipulation --output_dir la_cm
    python train_classifier_cm.py --config configs/cifar100_ir100_classifier_la_cm.yaml   # the paper's ResNet-18

With --capacity_manipulation every convolution (or the last stage's, --expert_layers last) gets a reserved low-rank
expert (full mode: W = W^g + BA), and L_CM of Eq. 2-3 compares the class probabilities of θ and θ^g (the network
without its experts) with the diffusion scripts' ω weights and forms. The output folder holds the merged classifier as
a plain torch / torchvision module (model.safetensors and config.json: build_classifier + load_state_dict, or
capman_peft.classification.load_classifier), and metrics.json: θ's and θ^g's accuracy per Many / Medium / Few split
on the held-out set.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from capman_peft.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from capman_peft.classification import (
    CM_DISTANCES,
    EXPERT_LAYERS,
    LOSSES,
    ClassifierCM,
    ClassifierTraining,
    check_cm,
    make_optimizer,
    new_classifier,
    plain_classifier,
    score_classifier,
    train_classifier,
)
from capman_peft.errors import ConfigError, run_cli
from capman_peft.evaluation.downstream_cli import (
    DATA_FLAGS,
    add_classifier_args,
    check_held_out,
    classifier_training,
    load_real_and_test,
)
from capman_peft.evaluation.report import write_json
from capman_peft.flags import ArgumentParser, device_value, nonnegative_float, positive_int, seed_value
from capman_peft.flags.values import add_underscore_negation, fraction, margin_value, ratio
from capman_peft.objective.cm import CM_FORMS, DEFAULT_MARGIN, DEFAULT_RELATIVE_MARGIN
from capman_peft.recipes import parse_with_recipe
from capman_peft.tuner import expert_disabled

logger = logging.getLogger("capman_peft")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="train_classifier_cm.py", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None, help="Named dataset (e.g. imb-cifar100); or --train_data_dir.")
    data.add_argument("--dataset_name", default=None, help="Hub id or local copy overriding the dataset's source.")
    data.add_argument("--train_data_dir", default=None, help="Local folder with one sub-folder of images per class.")
    data.add_argument("--imbalance_ratio", type=ratio, default=100, help="Largest / smallest class size (paper: 100).")
    data.add_argument("--data_seed", type=seed_value, default=0, help="Seed of the long-tail subsampling.")
    data.add_argument("--class_order", default=None, help="Comma-separated class names, largest class first.")
    data.add_argument("--resolution", type=positive_int, default=None, help="Image side; default: the images'.")
    data.add_argument(
        "--test_data_dir",
        default=None,
        help="Balanced held-out images, one sub-folder per class; default: the dataset's test split.",
    )
    model = add_classifier_args(parser)
    model.add_argument(
        "--loss",
        choices=LOSSES,
        default="ce",
        help="ce; ldam_drw (LDAM with a cosine head and deferred re-weighting, Cao et al. 2019, the authors' "
        "settings); logit_adjustment (the logit-adjusted loss, tau 1, Menon et al. 2021).",
    )
    model.add_argument("--seed", type=seed_value, default=0, help="Seed of the initialisation and batches.")
    cm = parser.add_argument_group("capacity manipulation")
    cm.add_argument(
        "--capacity_manipulation",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Reserve a low-rank expert in the convolutions and add lambda L_CM (off: the plain loss).",
    )
    add_underscore_negation(cm, "capacity_manipulation")
    cm.add_argument("--cm_lambda", type=nonnegative_float, default=1.0, help="Weight lambda of L_CM (Eq. 4).")
    cm.add_argument("--cm_form", choices=CM_FORMS, default="relative", help="L_CM's form, as in train_unet_cm.py.")
    cm.add_argument(
        "--cm_relative_margin",
        type=margin_value,
        default=DEFAULT_RELATIVE_MARGIN,
        help="The relative forms' margin, a fraction of θ's RMS distance to the one-hot label.",
    )
    cm.add_argument("--cm_margin", type=margin_value, default=DEFAULT_MARGIN, help="The fixed-margin forms' margin.")
    cm.add_argument(
        "--cm_distance",
        choices=CM_DISTANCES,
        default="probabilities",
        help="What θ and θ^g are compared on: class probabilities, or logits (fixed-margin forms only).",
    )
    cm.add_argument("--expert_rank_ratio", type=fraction, default=0.1, help="Expert rank / min(d, k) (paper: 0.1).")
    cm.add_argument(
        "--expert_layers",
        choices=EXPERT_LAYERS,
        default="all",
        help="all: every convolution (the paper's); last: the last stage's only.",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="capman-classifier", help="The classifier and metrics.json go here.")
    output.add_argument(
        "--checkpointing_epochs", type=positive_int, default=None, help="Save a checkpoint every N epochs."
    )
    output.add_argument(
        "--checkpoints_total_limit", type=positive_int, default=2, help="Checkpoints kept (oldest removed)."
    )
    output.add_argument(
        "--resume_from_checkpoint", default=None, help="A checkpoint-<epoch> folder in --output_dir, or latest."
    )
    output.add_argument("--device", type=device_value, default=None, help="cuda or cpu; default: cuda when available.")
    return parse_with_recipe(parser, argv)


def _settings(args: argparse.Namespace, resolution: int) -> ClassifierTraining:
    cm = None
    if args.capacity_manipulation:
        cm = ClassifierCM(
            form=args.cm_form, weight=args.cm_lambda, relative_margin=args.cm_relative_margin, margin=args.cm_margin,
            expert_rank_ratio=args.expert_rank_ratio, expert_layers=args.expert_layers, distance=args.cm_distance,
        )  # fmt: skip
    return classifier_training(args, resolution, loss=args.loss, cm=cm)


def _check(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """Everything refused before any work."""
    if not (data["dataset"] or data["train_data_dir"] or data["dataset_name"]):
        raise ConfigError("--dataset / --train_data_dir: name the training set")
    check_held_out(data, args.test_data_dir)
    if args.capacity_manipulation:
        try:
            check_cm(ClassifierCM(form=args.cm_form, distance=args.cm_distance))
        except ValueError as err:
            raise ConfigError(f"--cm_distance {args.cm_distance} with --cm_form {args.cm_form}: {err}") from None
        if args.cm_form == "paper":
            raise ConfigError("--cm_form paper: unbounded below (docs/method.md); allowed: the bounded forms")
    output_dir = Path(args.output_dir)
    if (output_dir / "metrics.json").exists() and not args.resume_from_checkpoint:
        raise ConfigError(f"--output_dir {output_dir}: already holds a trained classifier; allowed: a new folder")


def _identity(args: argparse.Namespace) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every flag that changes the run."""
    skip = {
        "config",
        "output_dir",
        "checkpointing_epochs",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "device",
    }
    return {key: value for key, value in sorted(vars(args).items()) if key not in skip}


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point (errors: one line on stderr, exit status 1)."""
    run_cli(_train, argv)


def _train(argv: Sequence[str] | None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    data = {key: getattr(args, key) for key in DATA_FLAGS}
    _check(args, data)
    real_set, (images, labels), test = load_real_and_test(data, args.test_data_dir)
    num_classes, resolution = len(real_set.class_names), images.shape[-1]
    settings = _settings(args, resolution)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    logger.info("%d training images in %d classes (%s ... %s per class), %s", len(labels), num_classes, max(counts),
                min(counts), asdict(settings))  # fmt: skip

    model = new_classifier(settings, num_classes, args.seed)
    optimizer, schedule = make_optimizer(model, settings, len(labels))
    start_epoch, identity = 0, _identity(args)
    if args.resume_from_checkpoint:
        found = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        if found:
            state = load_checkpoint(found[0], model, identity)
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["lr_scheduler"])
            for name, buffer in model.named_buffers():
                buffer.copy_(state["buffers"][name])
            start_epoch = state["step"]
            logger.info("Resumed from %s at epoch %d", found[0], start_epoch)

    def checkpoint(epochs_done: int, trained: torch.nn.Module, optimizer: Any, schedule: Any) -> None:
        if args.checkpointing_epochs and epochs_done % args.checkpointing_epochs == 0 and epochs_done < args.epochs:
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
                     "buffers": _buffers(trained), "run": {"config": identity}}  # fmt: skip
            save_checkpoint(output_dir, epochs_done, trained, state, args.checkpoints_total_limit)

    model = train_classifier(
        images, labels, num_classes, settings, args.seed, model=model, optimizer=optimizer, schedule=schedule,
        start_epoch=start_epoch, on_epoch_end=checkpoint,
    )  # fmt: skip
    splits = real_set.splits
    metrics: dict[str, Any] = {"theta": score_classifier(model, test, splits, settings.device)}
    if settings.cm is not None:
        with expert_disabled(model):
            metrics["theta_g"] = score_classifier(model, test, splits, settings.device)
        model = model.merge_and_unload()
    model = plain_classifier(model).cpu()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, output_dir / "model.safetensors")
    config = {"classifier": settings.classifier, "num_classes": num_classes, "resolution": resolution,
              "class_names": real_set.class_names}  # fmt: skip
    (output_dir / "config.json").write_text(json.dumps(config, indent=1))
    record = {**metrics, "settings": asdict(settings), "flags": identity, "splits": splits,
              "training_images": len(labels), "test_images": len(test[1])}  # fmt: skip
    write_json(record, output_dir / "metrics.json")
    for name, scores in metrics.items():
        logger.info("%s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    logger.info("Wrote %s", output_dir)


if __name__ == "__main__":
    main()
