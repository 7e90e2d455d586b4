"""``capman-eval``: the command line of :func:`capman_peft.evaluation.evaluate_pipelines`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..data import get_dataset_spec
from ..errors import ConfigError, run_cli
from ..flags import ArgumentParser, device_value, nonnegative_float, positive_int, prompt_template_value, seed_value
from ..run_folder import SCHEDULERS, read_pipeline_folder, require_adapter
from .batch import evaluate_pipelines
from .digits import resolve_feature_extractor
from .evaluate import EXPERT_SETTINGS, EvalSettings, _known_datasets
from .fidelity import INCEPTION, _check_metrics
from .sampling import _check_settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="capman-eval",
        description="Generate a class-balanced sample set from trained pipelines and compute FID/KID/IS/precision/"
        "recall overall and per Many/Medium/Few split (torch-fidelity).",
    )
    for add_group in (_add_data_args, _add_sampling_args, _add_metrics_args, _add_output_args):
        add_group(parser)
    return parser.parse_args(argv)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models and data")
    group.add_argument(
        "--pipeline",
        action="append",
        required=True,
        help="A training run's output_dir (a diffusers pipeline folder). Repeat to compare models in one chart.",
    )
    group.add_argument(
        "--dataset", default=None, help="Named dataset (imb-cifar10, ...); default: the one in training_summary.json."
    )
    group.add_argument("--dataset_name", default=None, help="Hub id or local copy overriding the dataset's source.")
    group.add_argument("--train_data_dir", default=None, help="Local folder with one sub-folder of images per class.")
    group.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="Image side for the reference (and SD sampling); default: model's.",
    )
    group.add_argument(
        "--reference_images_per_class",
        type=positive_int,
        default=None,
        help="Real reference images per class; default: all the balanced reference split has.",
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--num_images_per_class", type=positive_int, default=500, help="Generated images per class.")
    group.add_argument(
        "--num_images",
        type=positive_int,
        default=None,
        help="A total budget of generated images spread evenly over the classes, replacing --num_images_per_class "
        "(e.g. 50000 for ImageNet-LT's 1,000 or iNaturalist's 8,142 classes).",
    )
    group.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default=None,
        help="Sampler: ddim, dpm (DPM-Solver++ multistep) or pipeline (keep the saved one); default ddim, or the saved "
        "one for a flow-matching model (SD3).",
    )
    group.add_argument("--steps", type=positive_int, default=50, help="Number of sampling steps.")
    group.add_argument(
        "--guidance_scale",
        type=nonnegative_float,
        nargs="+",
        default=[1.5],
        help="Classifier-free guidance w in eps_u + w (eps_c - eps_u); 1 disables guidance. Several values evaluate "
        "each model at each (e.g. 1.5 2.5). The OC and CBDM codes write eps_c + w' (eps_c - eps_u): their w' is w - 1 "
        "(OC's README: w' = 1.5, i.e. 2.5 here; CBDM's: 1.6, i.e. 2.6).",
    )
    group.add_argument(
        "--expert",
        default="on",
        help="on: the merged model θ; off: θ^g alone, built from output_dir/adapter (paper Tab. 7); both: each.",
    )
    group.add_argument(
        "--batch_size", type=positive_int, default=64, help="Batch size for sampling and feature extraction."
    )
    group.add_argument("--seed", type=seed_value, default=0, help="Seed of the generated set (per image).")
    group.add_argument(
        "--prompt_template", type=prompt_template_value, default=None, help="SD prompt template, e.g. 'a {} painting'."
    )


def _add_metrics_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics and features")
    group.add_argument(
        "--metrics",
        default="fid,kid,isc,prc",
        help="Comma-separated subset of fid,kid,isc,prc (prc: precision, recall).",
    )
    group.add_argument(
        "--feature_extractor",
        default=None,
        help="torch-fidelity feature extractor; default inception-v3-compat, or digits-classifier for imb-digits.",
    )
    group.add_argument(
        "--feature_extractor_weights_path",
        default=None,
        help="Local weights file for the feature extractor (offline machines: no download).",
    )
    group.add_argument("--per_class_fid", action="store_true", help="Also compute the FID of every class.")
    group.add_argument(
        "--cache_dir", default=None, help="Digits-classifier and reference-feature cache (~/.cache/capman_peft)."
    )
    group.add_argument("--no_cache", action="store_true", help="Do not cache reference features.")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output_dir", default=None, help="Where results go; default <pipeline>/eval (one pipeline) or ./capman_eval."
    )
    group.add_argument(
        "--no_model_card", action="store_true", help="Do not write the metrics section into <pipeline>/README.md."
    )
    group.add_argument("--device", type=device_value, default=None, help="cuda or cpu; default: cuda when available.")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``capman-eval`` (errors: one line on stderr, exit status 1)."""
    run_cli(_evaluate_from_command_line, argv)


def _evaluate_from_command_line(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    settings = EvalSettings(
        num_images_per_class=args.num_images_per_class,
        num_images=args.num_images,
        metrics=_check_metrics(args.metrics),
        scheduler=args.scheduler,
        steps=args.steps,
        guidance_scale=args.guidance_scale[0],
        feature_extractor=args.feature_extractor,
        feature_extractor_weights_path=args.feature_extractor_weights_path,
        batch_size=args.batch_size,
        seed=args.seed,
        per_class_fid=args.per_class_fid,
        resolution=args.resolution,
        reference_images_per_class=args.reference_images_per_class,
        dataset_name=args.dataset_name,
        train_data_dir=args.train_data_dir,
        prompt_template=args.prompt_template,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        device=args.device,
    )
    _check_cli(args)
    extractor = resolve_feature_extractor(_cli_dataset(args), args.feature_extractor)
    print(
        f"capman-eval: feature extractor {extractor}"
        + ("" if extractor == INCEPTION else " (its FIDs are NOT comparable to Inception FIDs)"),
        file=sys.stderr,
    )
    evaluate_pipelines(
        args.pipeline,
        output_dir=args.output_dir,
        expert=args.expert,
        update_model_cards=not args.no_model_card,
        dataset=args.dataset,
        settings=settings,
        guidance_scales=args.guidance_scale,
    )


def _check_cli(args: argparse.Namespace) -> None:
    """Every cheap check before any model is loaded, so a typo fails in a second rather than after sampling."""
    for scale in args.guidance_scale:
        _check_settings(args.num_images_per_class, args.steps, scale, args.batch_size, args.seed)
    if args.expert not in EXPERT_SETTINGS:
        raise ConfigError(f"--expert must be one of {', '.join(EXPERT_SETTINGS)}, got {args.expert!r}")
    for path in args.pipeline:
        folder = read_pipeline_folder(path)
        if args.expert in ("off", "both"):
            require_adapter(folder)
    get_dataset_spec(_cli_dataset(args))


def _cli_dataset(args: argparse.Namespace) -> str | None:
    """The named dataset; None for a run on its own image folder or Hub data (its own reference)."""
    if args.dataset is not None:
        return args.dataset
    run_args = read_pipeline_folder(args.pipeline[0]).args
    dataset = run_args.get("dataset")
    local = args.train_data_dir or args.dataset_name or run_args.get("train_data_dir") or run_args.get("dataset_name")
    if dataset is None and not local:
        raise ConfigError(
            f"no --dataset given and {args.pipeline[0]!r} has no training_summary.json naming one; "
            f"known datasets: {', '.join(_known_datasets())}"
        )
    return dataset


if __name__ == "__main__":
    main()
