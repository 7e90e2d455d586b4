"""``capman-analyze``: the command line of :func:`pruning_sensitivity`, :func:`expert_capacity`, :func:`heldout_loss`
and :func:`push_gradient`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..errors import run_cli
from ..evaluation.batch import check_writable_output
from ..flags import ArgumentParser, device_value, positive_int, seed_value
from ..objective import LOWER_MARGIN_FORMS
from .capacity import expert_capacity
from .heldout import heldout_loss, push_gradient
from .prune import pruning_sensitivity


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="A training run's output_dir (never modified).")
    parser.add_argument(
        "--dataset", default=None, help="Named dataset (imb-digits, ...); default: the one in training_summary.json."
    )
    parser.add_argument("--dataset_name", default=None, help="Hub id or local copy overriding the dataset's source.")
    parser.add_argument("--train_data_dir", default=None, help="Local folder with one sub-folder of images per class.")
    parser.add_argument(
        "--imbalance_ratio", type=float, default=None, help="Training imbalance ratio; default: training summary's."
    )
    parser.add_argument(
        "--resolution", type=positive_int, default=None, help="Image side; default: training summary's."
    )
    parser.add_argument("--num_batches", type=int, default=4, help="Fixed batches per class.")
    parser.add_argument("--batch_size", type=int, default=32, help="Samples per batch.")
    parser.add_argument("--seed", type=seed_value, default=0, help="Seed of the fixed noise and timesteps.")
    parser.add_argument("--output_dir", default="capman_analysis", help="Where the JSON and the plot go.")
    parser.add_argument("--device", type=device_value, default=None, help="cuda or cpu; default: cuda when available.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:

    parser = ArgumentParser(
        prog="capman-analyze", description="Per-class capacity analyses of a trained (CM) diffusion model."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser(
        "prune", help="Relative per-class loss change after magnitude pruning (paper Fig. 1b, Eq. G.1)."
    )
    _add_common(prune)
    prune.add_argument("--fraction", type=float, default=0.1, help="Fraction of weights to zero (smallest |w|).")
    capacity = commands.add_parser(
        "capacity", help="Per-class mean (ε_θ − ε_θg)² of a CM run: where the expert is used (needs out/adapter)."
    )
    _add_common(capacity)
    heldout = commands.add_parser(
        "heldout",
        help="Per-class denoising loss of θ (and θ^g) on held-out real images, fixed timestep grid and noise.",
    )
    _add_common(heldout)
    push = commands.add_parser(
        "push",
        help="Where the CM push's gradient goes (through θ or θ^g, into W^g or the expert) and what a step of it "
        "does to θ's held-out loss per class (needs out/adapter).",
    )
    _add_common(push)
    push.add_argument(
        "--form",
        choices=LOWER_MARGIN_FORMS,
        default=None,
        help="The hinge form whose push is measured; default: the run's.",
    )
    for command in (heldout, push):
        command.add_argument(
            "--images_per_class", type=positive_int, default=None, help="Images per class (heldout 64, push 16)."
        )
        command.add_argument("--timesteps", type=positive_int, default=10, help="Points of the fixed timestep grid.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``capman-analyze`` (errors: one line on stderr, exit status 1)."""
    run_cli(_analyze_from_command_line, argv)


def _analyze_from_command_line(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    check_writable_output(Path(args.output_dir), [Path(args.pipeline)])
    common = dict(
        dataset=args.dataset,
        num_batches=args.num_batches,
        batch_size=args.batch_size,
        seed=args.seed,
        output_dir=args.output_dir,
        imbalance_ratio=args.imbalance_ratio,
        resolution=args.resolution,
        dataset_name=args.dataset_name,
        train_data_dir=args.train_data_dir,
        device=args.device,
    )
    if args.command in ("heldout", "push"):
        data = {k: common[k] for k in ("dataset", "imbalance_ratio", "resolution", "dataset_name", "train_data_dir")}
        sampling = dict(timesteps=args.timesteps, seed=args.seed, output_dir=args.output_dir, device=args.device)
        if args.images_per_class is not None:
            sampling["images_per_class"] = args.images_per_class
        if args.command == "heldout":
            result = heldout_loss(args.pipeline, **data, **sampling)
            key = "loss_full"
        else:
            result = push_gradient(args.pipeline, form=args.form, **data, **sampling)
            key = "push"
    elif args.command == "prune":
        result = pruning_sensitivity(args.pipeline, fraction=args.fraction, **common)
        key = "relative_loss_change"
    else:
        result = expert_capacity(args.pipeline, **common)
        key = "expert_usage"
    means = ", ".join(f"{split} {v[key]:.4g}" for split, v in result["splits"].items())
    print(f"capman-analyze {args.command}: mean {key.replace('_', ' ')} per split: {means}; wrote {args.output_dir}")


if __name__ == "__main__":
    main()
