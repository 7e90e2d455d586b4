"""``capman-downstream``: the command line of :func:`capman_peft.evaluation.downstream.downstream_utility` (paper
Tab. G.8): the real long-tailed training set with and without each pipeline's images, one classifier per seed."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..classification import CLASSIFIERS, METRICS, ClassifierTraining, Images
from ..data import LabelledImageDataset, get_dataset_spec, load_imbalanced_dataset, load_reference_dataset
from ..errors import ConfigError, run_cli
from ..flags import ArgumentParser, device_value, nonnegative_float, positive_float, positive_int, seed_value
from ..flags.values import ratio
from ..run_folder import PipelineFolder, load_pipeline, read_pipeline_folder
from .downstream import downstream_utility
from .fidelity import uint8_images
from .report import write_json
from .sampling import _check_settings, generate_balanced

logger = logging.getLogger("capman_peft")
# What the real training set is read with, taken from the first pipeline's training_summary.json when not given.
DATA_FLAGS = ("dataset", "dataset_name", "train_data_dir", "imbalance_ratio", "data_seed", "class_order", "resolution")
GENERATION_FLAGS = ("num_images_per_class", "steps", "guidance_scale", "expert", "sampling_seed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="capman-downstream",
        description="Downstream utility (paper Tab. G.8): train a classifier on the real long-tailed training set "
        "alone and with N generated images per class from each pipeline, judge each on a balanced held-out set "
        "(macro precision / recall, Many / Medium / Few accuracy), mean ± std over seeds.",
    )
    data = parser.add_argument_group("models and data")
    data.add_argument(
        "--pipeline",
        action="append",
        default=[],
        help="A train_unet_cm.py output_dir whose images are added; repeat for several (none: the real set alone).",
    )
    data.add_argument("--dataset", default=None, help="Named dataset; default: the first pipeline's.")
    data.add_argument("--dataset_name", default=None, help="Hub id or local copy overriding the dataset's source.")
    data.add_argument("--train_data_dir", default=None, help="Local folder with one sub-folder of images per class.")
    data.add_argument("--imbalance_ratio", type=ratio, default=None, help="Default: the first pipeline's (else 100).")
    data.add_argument("--data_seed", type=seed_value, default=None, help="Default: the first pipeline's (else 0).")
    data.add_argument("--class_order", default=None, help="Comma-separated class names, largest class first.")
    data.add_argument("--resolution", type=positive_int, default=None, help="Image side; default: the pipeline's.")
    data.add_argument(
        "--test_data_dir",
        default=None,
        help="Balanced held-out images, one sub-folder per class; default: the dataset's test split (needed for "
        "datasets without one, such as imb-digits or a --train_data_dir folder).",
    )
    generation = parser.add_argument_group("generated images")
    generation.add_argument(
        "--num_images_per_class",
        type=positive_int,
        default=500,
        help="Images added per class from each pipeline (500: the paper's 50k for CIFAR-100).",
    )
    generation.add_argument("--steps", type=positive_int, default=50, help="DDIM sampling steps.")
    generation.add_argument(
        "--guidance_scale", type=nonnegative_float, default=1.5, help="w in eps_u + w (eps_c - eps_u)."
    )
    generation.add_argument("--expert", choices=["on", "off"], default="on", help="θ (on) or θ^g alone (off).")
    generation.add_argument("--sampling_batch_size", type=positive_int, default=64, help="Images per sampling call.")
    generation.add_argument("--sampling_seed", type=seed_value, default=0, help="Seed of the generated sets.")
    classifier = add_classifier_args(parser)
    classifier.add_argument("--seeds", type=seed_value, nargs="+", default=[0, 1, 2, 3, 4], help="One run each.")
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="capman_downstream", help="metrics.json and downstream.png go here.")
    output.add_argument("--device", type=device_value, default=None, help="cuda or cpu; default: cuda when available.")
    return parser.parse_args(argv)


def add_classifier_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The classifier and its training (capman-downstream's and train_classifier_cm.py's); returns the group."""
    classifier = parser.add_argument_group("classifier")
    classifier.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default=None,
        help="resnet18 (torchvision's, CIFAR stem) or small_cnn; default resnet18 from 32 px, small_cnn below.",
    )
    classifier.add_argument("--epochs", type=positive_int, default=200, help="Training epochs per classifier.")
    classifier.add_argument("--train_batch_size", type=positive_int, default=128, help="Classifier batch size.")
    classifier.add_argument("--learning_rate", type=positive_float, default=0.1, help="SGD's initial rate (cosine).")
    classifier.add_argument("--weight_decay", type=nonnegative_float, default=5e-4, help="SGD's weight decay.")
    classifier.add_argument("--random_crop", action="store_true", help="Random crops of the padded images.")
    classifier.add_argument("--random_flip", action="store_true", help="Horizontal flips (not for digits).")
    return classifier


def classifier_training(args: argparse.Namespace, resolution: int, **more: Any) -> ClassifierTraining:
    """The flags of ``add_classifier_args`` as training settings (the device: cuda when available), plus `more`."""
    return ClassifierTraining(
        classifier=args.classifier or ("resnet18" if resolution >= 32 else "small_cnn"), epochs=args.epochs,
        batch_size=args.train_batch_size, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        random_crop=args.random_crop, random_flip=args.random_flip,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), **more,
    )  # fmt: skip


def _data_settings(args: argparse.Namespace, folders: Sequence[PipelineFolder]) -> dict[str, Any]:
    """The real set's flags: as given, else the first pipeline's, else the training scripts' defaults."""
    trained = folders[0].args if folders else {}
    values = {key: getattr(args, key) if getattr(args, key) is not None else trained.get(key) for key in DATA_FLAGS}
    values["data_seed"] = values["data_seed"] or 0
    if values["dataset"] is None and not (values["train_data_dir"] or values["dataset_name"]):
        raise ConfigError("--dataset: not given and no --pipeline records one; name the training set")
    if values["dataset"] is not None and values["imbalance_ratio"] is None:
        values["imbalance_ratio"] = 100
    return values


def load_real_and_test(data: dict[str, Any], test_data_dir: str | None) -> tuple[LabelledImageDataset, Images, Images]:
    """The real long-tailed training set (as a dataset and as images) and the balanced held-out images (`data`: the
    values of ``DATA_FLAGS``; the held-out set from `test_data_dir`, else the dataset's test split)."""
    order = data["class_order"].split(",") if isinstance(data["class_order"], str) else data["class_order"]
    real = load_imbalanced_dataset(
        data["dataset"], split="train", imbalance_ratio=data["imbalance_ratio"], resolution=data["resolution"],
        dataset_name=data["dataset_name"], train_data_dir=data["train_data_dir"], class_order=order,
        seed=data["data_seed"], center_crop=True,
    )  # fmt: skip
    resolution = real[0]["pixel_values"].shape[-1]
    if test_data_dir:
        test = load_reference_dataset(None, resolution, train_data_dir=test_data_dir, class_order=real.class_names)
    else:
        test = load_reference_dataset(data["dataset"], resolution, dataset_name=data["dataset_name"], class_order=order)
    if test.class_names != real.class_names:
        raise ConfigError(
            f"--test_data_dir {test_data_dir}: classes {test.class_names[:5]} differ from the training set's "
            f"{real.class_names[:5]}"
        )
    return real, (uint8_images(real), torch.tensor(real.labels)), (uint8_images(test), torch.tensor(test.labels))


def _generated(
    args: argparse.Namespace, folders: Sequence[PipelineFolder], num_classes: int, resolution: int, device: str
) -> dict[str, Images]:
    """Each pipeline's class-balanced images, named by its folder (with `` (θ^g)`` under ``--expert off``)."""
    sets = {}
    for folder in folders:
        pipe = load_pipeline(folder, expert=args.expert, scheduler="ddim", device=device)
        images, labels = generate_balanced(
            pipe, args.num_images_per_class, num_classes, steps=args.steps,
            guidance_scale=args.guidance_scale, seed=args.sampling_seed, batch_size=args.sampling_batch_size,
            resolution=resolution,
        )  # fmt: skip
        sets[folder.path.name + (" (θ^g)" if args.expert == "off" else "")] = (images, labels)
    return sets


def check_held_out(data: dict[str, Any], test_data_dir: str | None) -> None:
    """Refuse a training set without a held-out set to judge the classifiers on."""
    named = data["dataset"] is not None and not data["train_data_dir"]
    if not (test_data_dir or (named and get_dataset_spec(data["dataset"]).reference_split is not None)):
        source = data["train_data_dir"] or data["dataset"] or data["dataset_name"]
        raise ConfigError(
            f"--test_data_dir: required; {source} has no held-out split we know of (its "
            "reference images are the training images, which would score memorisation)"
        )


def _check(args: argparse.Namespace, folders: Sequence[PipelineFolder], data: dict[str, Any]) -> None:
    """Everything refused before any work: the sampling settings, the pipelines, a missing held-out set."""
    check_held_out(data, args.test_data_dir)
    _check_settings(args.num_images_per_class, args.steps, args.guidance_scale, args.sampling_batch_size, 0)
    for folder in folders:
        if folder.family.prompted:
            raise ConfigError(
                f"--pipeline {folder.path}: a text-to-image pipeline; capman-downstream samples class-conditional "
                "pipelines (train_unet_cm.py outputs)"
            )
    names = [folder.path.name for folder in folders]
    if len(set(names)) < len(names):
        raise ConfigError(f"--pipeline: two folders share a name ({names}); their rows would be indistinguishable")


def _plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars (mean ± std over the seeds) of each metric, one bar per training set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(rows)
    for k, row in enumerate(rows):
        x = [i + k * width for i in range(len(METRICS))]
        ax.bar(x, [row[m]["mean"] for m in METRICS], width, yerr=[row[m]["std"] for m in METRICS], label=row["source"])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(METRICS))], [m.replace("_", " ") for m in METRICS])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``capman-downstream`` (errors: one line on stderr, exit status 1)."""
    run_cli(_downstream_from_command_line, argv)


def _downstream_from_command_line(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    folders = [read_pipeline_folder(path) for path in args.pipeline]
    data = _data_settings(args, folders)
    _check(args, folders, data)
    output_dir = Path(args.output_dir)
    if (output_dir / "metrics.json").exists():
        raise ConfigError(f"--output_dir {output_dir}: already holds a metrics.json; allowed: a new or empty folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    real_set, real, test = load_real_and_test(data, args.test_data_dir)
    resolution = real[0].shape[-1]
    settings = classifier_training(args, resolution)
    generated = _generated(args, folders, len(real_set.class_names), resolution, device)
    rows = downstream_utility(
        real, test, generated, num_classes=len(real_set.class_names), splits=real_set.splits, settings=settings,
        seeds=args.seeds,
    )  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "data": {**data, "training_images": len(real[1]), "test_images": len(test[1]), "splits": real_set.splits},
        "generation": {key: getattr(args, key) for key in GENERATION_FLAGS},
        "classifier": asdict(settings),
        "rows": rows,
    }
    write_json(record, output_dir / "metrics.json")
    _plot(rows, output_dir / "downstream.png")
    print("| training set | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for row in rows:
        cells = " | ".join(f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in METRICS)
        print(f"| {row['source']} | {cells} |")
    logger.info("Wrote %s and %s", output_dir / "metrics.json", output_dir / "downstream.png")


if __name__ == "__main__":
    main()
