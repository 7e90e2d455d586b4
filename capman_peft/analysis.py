"""Where a trained model spends its capacity, per class: pruning sensitivity and expert usage.

``capman-analyze prune --pipeline out/ --fraction 0.1`` (paper Fig. 1b, Eq. G.1): zero the ``fraction`` of UNet
weights with the smallest magnitude and report, per class c, the relative loss change
``(L_pruned^c - L_raw^c) / L_raw^c``. Pruned are the weights of every ``nn.Linear`` and ``nn.Conv*`` layer of the UNet
(attention projections, convolutions, time-embedding MLP, ...), ranked globally by |w|; biases, norm parameters and
embedding tables are kept. Exactly ``round(fraction * #weights)`` weights are zeroed (ties at the threshold in
parameter order). The pipeline on disk is never written: the pruned model is an in-memory copy.

``capman-analyze capacity --pipeline out/`` (a CM run, needs ``out/adapter``): per class the mean
``d = mean((ε_θ - ε_θg)^2)`` (the per-sample d of the CM loss, Eq. 2), i.e. how much the expert changes the prediction
for that class, together with the base loss of θ and of θ^g.

``L^c`` is the training objective's MSE (target ε, or v / x0 when the scheduler says so) on the long-tailed training
images of class c, with noise and timesteps fixed by the seed: every class gets ``num_batches * batch_size`` samples
(its images cycled), and noise/timesteps for batch b of class c come from a generator seeded by ``(seed, c, b)``, so
the numbers are deterministic and both models see exactly the same inputs. Stable Diffusion images are encoded with
the VAE's posterior mean (not a sample) for the same reason.

JSON (``prune.json`` / ``capacity.json``) holds lists aligned with ``class_names`` (class ids 0..C-1, 0 the largest
class), per-split means and the settings; the plots put classes on the x axis sorted by training-set size.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import ImbalancedImageDataset, class_prompts, class_splits, get_dataset_spec, load_imbalanced_dataset
from .errors import ConfigError, run_cli
from .evaluation import (
    PipelineFolder,
    load_capman_unet,
    load_pipeline,
    pipeline_resolution,
    read_pipeline_folder,
    require_adapter,
    write_json,
)

PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
PRUNED_PARAMETERS = (
    "weights of every nn.Linear and nn.Conv layer of the UNet, ranked globally by |w|; "
    "biases, normalisation parameters and embedding tables are kept"
)


# ----------------------------------------------------------------------------------------------------------
# Magnitude pruning
# ----------------------------------------------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every Linear / Conv layer, in module order (the order ties are broken in)."""
    return [(f"{name}.weight", m.weight) for name, m in model.named_modules() if isinstance(m, PRUNABLE_LAYERS)]


@torch.no_grad()
def magnitude_prune_(model: nn.Module, fraction: float) -> dict[str, Any]:
    """Zero exactly ``round(fraction * N)`` of the model's N prunable weights, those with the smallest |w| (in place).

    Returns ``num_weights``, ``num_pruned`` and the magnitude ``threshold`` (the largest |w| pruned).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction must be in [0, 1], got {fraction!r}")
    weights = [w for _, w in prunable_weights(model)]
    if not weights:
        raise ConfigError("the model has no Linear or Conv layers to prune")
    magnitude = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights])
    total = magnitude.numel()
    k = round(fraction * total)
    if k == 0:
        return {"num_weights": total, "num_pruned": 0, "threshold": None}
    threshold = torch.kthvalue(magnitude, k).values
    mask = magnitude < threshold
    ties = magnitude == threshold
    # Several weights may share the threshold value: take just enough of them, in parameter order.
    mask |= ties & (torch.cumsum(ties, 0) <= k - int(mask.sum()))
    for w, keep in zip(weights, torch.split(~mask, [w.numel() for w in weights]), strict=True):
        w.mul_(keep.view_as(w).to(device=w.device, dtype=w.dtype))
    return {"num_weights": total, "num_pruned": int(mask.sum()), "threshold": float(threshold)}


# ----------------------------------------------------------------------------------------------------------
# The training loss per class on fixed noise and timesteps
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Denoiser:
    """What the per-class loss needs from a pipeline: noising, the image encoder and the class condition."""

    unet: nn.Module
    noise_scheduler: Any
    encode: Callable[[torch.Tensor], torch.Tensor]
    """pixels in [-1, 1] -> the UNet's sample space (identity, or VAE latents for Stable Diffusion)."""
    condition: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    """class ids -> the UNet's conditioning kwargs (``class_labels`` or ``encoder_hidden_states``)."""
    device: torch.device

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        if prediction_type == "sample":
            return x0
        raise ConfigError(f"unsupported prediction_type {prediction_type!r}")


def make_denoiser(pipe: Any, folder: PipelineFolder, class_names: list[str], dataset: str) -> Denoiser:
    """A :class:`Denoiser` for a loaded pipeline (class-conditional, or Stable Diffusion with class prompts)."""
    from diffusers import DDPMScheduler

    device = pipe.unet.device
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if folder.kind == "class-conditional":
        return Denoiser(pipe.unet, noise_scheduler, lambda x: x, lambda y: {"class_labels": y}, device)

    template = folder.args.get("prompt_template") or get_dataset_spec(dataset).prompt_template
    tokens = pipe.tokenizer(
        class_prompts(class_names, template),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    with torch.no_grad():
        embeddings = pipe.text_encoder(tokens)[0]

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor

    return Denoiser(pipe.unet, noise_scheduler, encode, lambda y: {"encoder_hidden_states": embeddings[y]}, device)


@dataclass
class FixedBatch:
    class_id: int
    noisy: torch.Tensor
    timesteps: torch.Tensor
    condition: dict[str, torch.Tensor]
    target: torch.Tensor


@torch.no_grad()
def fixed_batches(
    denoiser: Denoiser,
    data: ImbalancedImageDataset,
    num_classes: int,
    num_batches: int = 4,
    batch_size: int = 32,
    seed: int = 0,
) -> Iterator[FixedBatch]:
    """``num_batches`` noised batches of ``batch_size`` training images per class, the same on every call."""
    labels = np.asarray(data.labels)
    num_train_timesteps = denoiser.noise_scheduler.config.num_train_timesteps
    needed = num_batches * batch_size
    for c in range(num_classes):
        indices = np.flatnonzero(labels == c)
        if len(indices) == 0:
            raise ConfigError(f"class {c} ({data.class_names[c]!r}) has no training images")
        pixels = torch.stack([data[int(i)]["pixel_values"] for i in indices[:needed]])
        for b in range(num_batches):
            rows = torch.arange(b * batch_size, (b + 1) * batch_size) % len(pixels)  # cycle through small classes
            x0 = denoiser.encode(pixels[rows].to(denoiser.device))
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, c, b]).generate_state(1)[0]))
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator).to(denoiser.device)
            y = torch.full((batch_size,), c, dtype=torch.long, device=denoiser.device)
            yield FixedBatch(
                c,
                denoiser.noise_scheduler.add_noise(x0, noise, t),
                t,
                denoiser.condition(y),
                denoiser.target(x0, noise, t),
            )


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------------
# Shared setup: pipeline, training data aligned with the pipeline's class ids
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AnalysisSetup:
    folder: PipelineFolder
    pipe: Any
    data: ImbalancedImageDataset
    class_names: list[str]
    dataset: str
    imbalance_ratio: float | None
    resolution: int


def prepare_analysis(
    pipeline: str | os.PathLike,
    dataset: str | None = None,
    *,
    imbalance_ratio: float | None = None,
    resolution: int | None = None,
    dataset_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    device: str | None = None,
) -> AnalysisSetup:
    """Load the merged pipeline and the long-tailed training set, labels in the pipeline's class ids.

    Defaults come from ``training_summary.json`` (dataset, imbalance_ratio, resolution, sources); the subsampling
    seed is the legacy 0, and the pipeline's class names (its id order) are passed as ``class_order`` so that class
    ids and sizes match training.
    """
    folder = read_pipeline_folder(pipeline)
    args = folder.args
    dataset = dataset or args.get("dataset")
    if dataset is None:
        raise ConfigError(f"no dataset given and {str(folder.path)!r} has no training_summary.json naming one")
    get_dataset_spec(dataset)
    if imbalance_ratio is None:
        imbalance_ratio = args.get("imbalance_ratio", 100)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(folder, expert="on", scheduler="pipeline", device=device)
    resolution = resolution or args.get("resolution") or pipeline_resolution(pipe)
    names = pipe.class_names if folder.kind == "class-conditional" else folder.summary.get("class_names")
    data_kwargs = dict(
        name=dataset,
        imbalance_ratio=imbalance_ratio,
        resolution=resolution,
        dataset_name=dataset_name or args.get("dataset_name"),
        train_data_dir=train_data_dir or args.get("train_data_dir"),
        center_crop=True,
    )
    try:
        data = load_imbalanced_dataset(**data_kwargs, class_order=names)
    except ValueError:
        if names is None:
            raise
        data = load_imbalanced_dataset(**data_kwargs)  # names differ from the dataset's: match by class id
    num_classes = pipe.num_classes if folder.kind == "class-conditional" else len(names or data.class_names)
    if num_classes != data.num_classes:
        raise ConfigError(
            f"the pipeline has {num_classes} classes but {dataset!r} has {data.num_classes}; "
            "pass the dataset the model was trained on"
        )
    counts = folder.summary.get("class_counts")
    if counts is not None and list(counts) != data.class_counts:
        print(
            f"capman-analyze: warning: training class counts {list(counts)[:5]}... differ from the reloaded data "
            f"{data.class_counts[:5]}...; check --imbalance_ratio / --dataset",
            file=sys.stderr,
        )
    return AnalysisSetup(folder, pipe, data, list(names or data.class_names), dataset, imbalance_ratio, resolution)


def _per_split_means(values: dict[str, list[float]], num_classes: int) -> dict[str, dict[str, float]]:
    return {
        split: {key: float(np.mean([v[c] for c in ids])) for key, v in values.items()}
        for split, ids in class_splits(num_classes).items()
        if ids
    }


def _common_record(setup: AnalysisSetup, num_batches: int, batch_size: int, seed: int) -> dict[str, Any]:
    return {
        "pipeline": str(setup.folder.path),
        "dataset": setup.dataset,
        "imbalance_ratio": setup.imbalance_ratio,
        "resolution": setup.resolution,
        "num_batches": num_batches,
        "batch_size": batch_size,
        "samples_per_class": num_batches * batch_size,
        "seed": seed,
        "prediction_type": setup.pipe.scheduler.config.get("prediction_type", "epsilon"),
        "class_names": setup.class_names,
        "class_counts": setup.data.class_counts,
        "order_by_size": sorted(range(len(setup.class_names)), key=lambda c: -setup.data.class_counts[c]),
    }


def _check_sampling(num_batches: int, batch_size: int, seed: int) -> None:
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")


# ----------------------------------------------------------------------------------------------------------
# The two analyses
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def pruning_sensitivity(
    pipeline: str | os.PathLike,
    dataset: str | None = None,
    *,
    fraction: float = 0.1,
    num_batches: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **data_kwargs: Any,
) -> dict[str, Any]:
    """Per-class relative loss change after magnitude pruning (paper Eq. G.1, Fig. 1b).

    ``data_kwargs`` (imbalance_ratio, resolution, dataset_name, train_data_dir, device) go to
    :func:`prepare_analysis`. With ``output_dir``, writes ``prune.json`` and ``prune.png`` there.
    """
    from tqdm.auto import tqdm

    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction must be in [0, 1], got {fraction!r}")
    _check_sampling(num_batches, batch_size, seed)
    setup = prepare_analysis(pipeline, dataset, **data_kwargs)
    denoiser = make_denoiser(setup.pipe, setup.folder, setup.class_names, setup.dataset)
    raw = denoiser.unet.eval()
    pruned = copy.deepcopy(raw)  # the loaded model stays intact; nothing is ever written back to disk
    stats = magnitude_prune_(pruned, fraction)

    num_classes = len(setup.class_names)
    sums = {
        "raw": torch.zeros(num_classes, dtype=torch.float64),
        "pruned": torch.zeros(num_classes, dtype=torch.float64),
    }
    counts = torch.zeros(num_classes)
    batches = fixed_batches(denoiser, setup.data, num_classes, num_batches, batch_size, seed)
    for batch in tqdm(batches, total=num_classes * num_batches, desc="Per-class loss", disable=not progress):
        for name, model in (("raw", raw), ("pruned", pruned)):
            prediction = model(batch.noisy, batch.timesteps, **batch.condition).sample
            sums[name][batch.class_id] += _per_sample_mse(prediction, batch.target).sum().item()
        counts[batch.class_id] += len(batch.timesteps)
    loss_raw = (sums["raw"] / counts).tolist()
    loss_pruned = (sums["pruned"] / counts).tolist()
    change = [p - r for p, r in zip(loss_pruned, loss_raw, strict=True)]
    relative = [d / r if r > 0 else float("nan") for d, r in zip(change, loss_raw, strict=True)]
    values = {"relative_loss_change": relative, "loss_raw": loss_raw, "loss_pruned": loss_pruned}
    result = {
        "analysis": "prune",
        **_common_record(setup, num_batches, batch_size, seed),
        "fraction": fraction,
        "pruned_parameters": PRUNED_PARAMETERS,
        **stats,
        **values,
        "loss_change": change,
        "splits": _per_split_means(values, num_classes),
    }
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(result, output_dir / "prune.json")
        plot_per_class(
            result,
            "relative_loss_change",
            f"Relative loss change after pruning {fraction:.0%} of weights",
            output_dir / "prune.png",
        )
    return result


@torch.no_grad()
@torch.no_grad()
def measure_expert_use(
    capman: nn.Module,
    denoiser: Denoiser,
    data: ImbalancedImageDataset,
    num_classes: int,
    num_batches: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Per class: ``expert_usage`` = mean (ε_θ − ε_θg)², and the loss of θ (``loss_full``) and θ^g
    (``loss_general``), on the fixed batches of ``fixed_batches`` (a CapMan model with its experts, in eval mode)."""
    from tqdm.auto import tqdm

    from .tuner import expert_disabled

    was_training = capman.training
    capman.eval()
    sums = {k: torch.zeros(num_classes, dtype=torch.float64) for k in ("expert_usage", "loss_full", "loss_general")}
    counts = torch.zeros(num_classes)
    batches = fixed_batches(denoiser, data, num_classes, num_batches, batch_size, seed)
    for batch in tqdm(batches, total=num_classes * num_batches, desc="Per-class expert usage", disable=not progress):
        full = capman(batch.noisy, batch.timesteps, **batch.condition).sample
        with expert_disabled(capman):
            general = capman(batch.noisy, batch.timesteps, **batch.condition).sample
        for key, (a, b) in {
            "expert_usage": (full, general),
            "loss_full": (full, batch.target),
            "loss_general": (general, batch.target),
        }.items():
            sums[key][batch.class_id] += _per_sample_mse(a, b).sum().item()
        counts[batch.class_id] += len(batch.timesteps)
    capman.train(was_training)
    return {k: (v / counts).tolist() for k, v in sums.items()}


def expert_capacity(
    pipeline: str | os.PathLike,
    dataset: str | None = None,
    *,
    num_batches: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **data_kwargs: Any,
) -> dict[str, Any]:
    """Per-class ``mean((ε_θ - ε_θg)^2)`` of a CM run, and the base loss of θ and θ^g, on the same fixed inputs.

    Needs ``output_dir/adapter`` (the unmerged CapMan adapter). With ``output_dir``, writes ``capacity.json`` and
    ``capacity.png``.
    """
    _check_sampling(num_batches, batch_size, seed)
    require_adapter(read_pipeline_folder(pipeline))  # fail before loading anything
    setup = prepare_analysis(pipeline, dataset, **data_kwargs)
    capman = load_capman_unet(setup.folder).to(setup.pipe.unet.device)
    denoiser = make_denoiser(setup.pipe, setup.folder, setup.class_names, setup.dataset)
    values = measure_expert_use(
        capman, denoiser, setup.data, len(setup.class_names), num_batches, batch_size, seed, progress
    )
    result = {
        "analysis": "capacity",
        **_common_record(setup, num_batches, batch_size, seed),
        **values,
        "splits": _per_split_means(values, len(setup.class_names)),
    }
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(result, output_dir / "capacity.json")
        plot_per_class(
            result, "expert_usage", "Expert usage per class: mean (ε_θ − ε_θg)²", output_dir / "capacity.png"
        )
    return result


# ----------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------

_SPLIT_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def plot_per_class(result: dict[str, Any], key: str, title: str, path: str | Path) -> Path:
    """One bar per class, x = class index sorted by training-set size (largest first), coloured by split."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    order = result["order_by_size"]
    split_of = {c: s for s, ids in class_splits(len(order)).items() for c in ids}
    values = [result[key][c] for c in order]
    fig = Figure(figsize=(max(5.0, 0.12 * len(order) + 3), 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(order)), values, color=[_SPLIT_COLOURS[split_of[c]] for c in order])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("class index (sorted by training-set size, largest first)")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{title}\n{result['dataset']}, IR {result['imbalance_ratio']}", fontsize="medium")
    present = [s for s in _SPLIT_COLOURS if s in set(split_of.values())]
    ax.legend(handles=[Patch(color=_SPLIT_COLOURS[s], label=s.capitalize()) for s in present], fontsize="small")
    fig.savefig(path, dpi=120)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


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
    parser.add_argument("--resolution", type=int, default=None, help="Image side; default: training summary's.")
    parser.add_argument("--num_batches", type=int, default=4, help="Fixed batches per class.")
    parser.add_argument("--batch_size", type=int, default=32, help="Samples per batch.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the fixed noise and timesteps.")
    parser.add_argument("--output_dir", default="capman_analysis", help="Where the JSON and the plot go.")
    parser.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from .flags import ArgumentParser

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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``capman-analyze`` (errors: one line on stderr, exit status 1)."""
    run_cli(_analyze_from_command_line, argv)


def _analyze_from_command_line(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
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
    if args.command == "prune":
        result = pruning_sensitivity(args.pipeline, fraction=args.fraction, **common)
        key = "relative_loss_change"
    else:
        result = expert_capacity(args.pipeline, **common)
        key = "expert_usage"
    means = ", ".join(f"{split} {v[key]:.4g}" for split, v in result["splits"].items())
    print(f"capman-analyze {args.command}: mean {key.replace('_', ' ')} per split: {means}; wrote {args.output_dir}")


if __name__ == "__main__":
    main()
