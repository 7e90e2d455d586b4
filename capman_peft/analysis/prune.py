"""Magnitude pruning and the per-class pruning sensitivity (paper Fig. 1b, Eq. G.1)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..evaluation.report import write_json
from ..expert_use import fixed_batches, per_sample_mse
from .plot import plot_per_class
from .probes import (
    _check_sampling,
    _common_record,
    make_loss_setup,
    prepare_analysis,
    split_means,
)

PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
PRUNED_PARAMETERS = (
    "weights of every nn.Linear and nn.Conv layer of the UNet, ranked globally by |w|; "
    "biases, normalisation parameters and embedding tables are kept"
)


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
    loss_setup = make_loss_setup(setup.pipe, setup.folder, setup.class_names, setup.dataset)
    raw = loss_setup.unet.eval()
    pruned = copy.deepcopy(raw)  # the loaded model stays intact; nothing is ever written back to disk
    stats = magnitude_prune_(pruned, fraction)

    num_classes = len(setup.class_names)
    sums = {
        "raw": torch.zeros(num_classes, dtype=torch.float64),
        "pruned": torch.zeros(num_classes, dtype=torch.float64),
    }
    counts = torch.zeros(num_classes)
    batches = fixed_batches(
        loss_setup, setup.data, num_classes, num_batches=num_batches, batch_size=batch_size, seed=seed
    )
    for batch in tqdm(batches, total=num_classes * num_batches, desc="Per-class loss", disable=not progress):
        for name, model in (("raw", raw), ("pruned", pruned)):
            prediction = loss_setup.predict(model, batch.noisy, batch.timesteps, batch.condition)
            sums[name][batch.class_id] += per_sample_mse(prediction, batch.target).sum().item()
        counts[batch.class_id] += len(batch.timesteps)
    loss_raw = (sums["raw"] / counts).tolist()
    loss_pruned = (sums["pruned"] / counts).tolist()
    change = [p - r for p, r in zip(loss_pruned, loss_raw, strict=True)]
    relative = [d / r if r > 0 else float("nan") for d, r in zip(change, loss_raw, strict=True)]
    values = {"relative_loss_change": relative, "loss_raw": loss_raw, "loss_pruned": loss_pruned}
    result = {
        "analysis": "prune",
        **_common_record(setup, loss_setup, num_batches, batch_size, seed),
        "fraction": fraction,
        "pruned_parameters": PRUNED_PARAMETERS,
        **stats,
        **values,
        "loss_change": change,
        "splits": split_means(values, setup.data.splits),
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
