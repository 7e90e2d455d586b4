"""What CM does to θ on images it never trained on, and where the push's gradient goes.

* :func:`heldout_loss`: per class, the denoising loss of θ (and θ^g) on held-out real images, on a fixed grid of
  timesteps with fixed noise. Far less noisy than FID at small scale, and it measures generalisation, which is what
  the minority classes lack.
* :func:`push_gradient`: for a CM run, the gradient of the push term alone, split by the prediction it flows through
  (θ or θ^g) and the weights it reaches (the general part W^g or the expert E), and the first-order change of θ's
  held-out loss per class along it (positive: a step of the push makes θ worse on that class).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import load_heldout_dataset
from ..errors import ConfigError
from ..evaluation.report import write_json
from ..expert_use import LossSetup
from ..families import Condition, take_rows
from ..objective import (
    DEFAULT_MARGIN,
    DEFAULT_RELATIVE_MARGIN,
    LOWER_MARGIN_FORMS,
    RELATIVE_FORMS,
    CMWeights,
    cm_loss,
    cm_weights,
)
from ..randomness import derived_seed
from ..run_folder import load_capman_unet, read_pipeline_folder, require_adapter
from ..tuner import expert_disabled
from .probes import AnalysisSetup, make_loss_setup, prepare_analysis, split_means


def timestep_grid(num_train_timesteps: int, points: int) -> torch.Tensor:
    """``points`` timesteps at the centres of equal bins of [0, T): the same grid for every image and run."""
    return ((torch.arange(points, dtype=torch.float64) + 0.5) * num_train_timesteps / points).long()


def _heldout_rows(setup: AnalysisSetup, images_per_class: int) -> tuple[Any, list[np.ndarray]]:
    args = setup.folder.args
    heldout = load_heldout_dataset(
        setup.dataset,
        setup.imbalance_ratio,
        setup.resolution,
        dataset_name=args.get("dataset_name"),
        train_data_dir=args.get("train_data_dir"),
        class_order=setup.class_names,
        **setup.folder.data_columns,
    )
    labels = np.asarray(heldout.labels)
    return heldout, [np.flatnonzero(labels == c)[:images_per_class] for c in range(len(setup.class_names))]


def _class_inputs(
    loss_setup: LossSetup, heldout: Any, *, rows: np.ndarray, class_id: int, grid: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, Condition, torch.Tensor]:
    """Every held-out image of one class at every grid timestep, with noise fixed by (seed, class)."""
    device = loss_setup.device
    x0 = loss_setup.encode(torch.stack([heldout[int(i)]["pixel_values"] for i in rows]).to(device))
    x0 = x0.repeat_interleave(len(grid), dim=0)
    t = grid.repeat(len(rows)).to(device)
    generator = torch.Generator().manual_seed(derived_seed(seed, class_id))
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    y = torch.full((len(t),), class_id, dtype=torch.long, device=device)
    schedule = loss_setup.schedule
    return schedule.add_noise(x0, noise, t), t, loss_setup.condition(y), schedule.target(x0, noise, t)


@torch.no_grad()
def heldout_loss(
    pipeline: str | os.PathLike,
    dataset: str | None = None,
    *,
    images_per_class: int = 64,
    timesteps: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    **data_kwargs: Any,
) -> dict[str, Any]:
    """Per-class mean denoising MSE of θ (``loss_full``) and, when the run has an adapter, θ^g (``loss_general``)
    on up to ``images_per_class`` held-out images × ``timesteps`` grid points (fixed noise). Classes without
    held-out images get NaN. Writes ``heldout.json`` to ``output_dir`` when given."""
    for name, value in (("images_per_class", images_per_class), ("timesteps", timesteps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{name}: must be an integer >= 1, got {value!r}")
    setup = prepare_analysis(pipeline, dataset, **data_kwargs)
    models = {"loss_full": setup.denoiser}
    if (setup.folder.adapter_dir / "adapter_config.json").is_file():
        models = {"loss_full": load_capman_unet(setup.folder).to(setup.denoiser.device)}
        models["loss_general"] = models["loss_full"]
    loss_setup = make_loss_setup(setup.pipe, setup.folder, setup.class_names, setup.dataset)
    heldout, per_class_rows = _heldout_rows(setup, images_per_class)
    grid = timestep_grid(loss_setup.schedule.num_train_timesteps, timesteps)
    num_classes = len(setup.class_names)
    values = {key: [math.nan] * num_classes for key in models}
    for c, rows in enumerate(per_class_rows):
        if len(rows) == 0:
            continue
        noisy, t, condition, target = _class_inputs(loss_setup, heldout, rows=rows, class_id=c, grid=grid, seed=seed)
        for key, model in models.items():
            model.eval()
            total = 0.0
            for start in range(0, len(t), batch_size):
                part = torch.arange(start, min(start + batch_size, len(t)))
                inputs = (model, noisy[part], t[part], take_rows(condition, part))
                if key == "loss_general":
                    with expert_disabled(model):
                        pred = loss_setup.predict(*inputs)
                else:
                    pred = loss_setup.predict(*inputs)
                total += (pred.float() - target[part].float()).pow(2).flatten(1).mean(1).sum().item()
            values[key][c] = total / len(t)
    result = {
        "analysis": "heldout",
        "pipeline": str(setup.folder.path),
        "dataset": setup.dataset,
        "class_names": setup.class_names,
        "class_counts": setup.data.class_counts,
        "heldout_images": [len(r) for r in per_class_rows],
        "timesteps": grid.tolist(),
        "seed": seed,
        **values,
        "splits": split_means(values, setup.data.splits),
    }
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json(result, Path(output_dir) / "heldout.json")
    return result


def _flat(grads: tuple[torch.Tensor | None, ...], params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params, strict=True)])


def _push_routes(
    capman: nn.Module,
    params: Sequence[torch.Tensor],
    loss_setup: LossSetup,
    setup: AnalysisSetup,
    form: str,
    margins: tuple[float, float],
    push: torch.Tensor,
    pushed: list[int],
    grid: torch.Tensor,
    images_per_class: int,
    seed: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """The push term's gradient on every parameter through ε_θ and through ε_θg (``cm_loss``'s push alone, each side
    in turn held constant, summed over the pushed classes), and how many rows sit inside the margin (`margins`: the
    fixed and the relative one). The θ^g route is what `form` applies; the θ route is the hinge's chain rule through
    θ at the form's margin (only ``hinge`` applies it)."""
    margin, relative_margin = margins
    labels = np.asarray(setup.data.labels)
    push_only = CMWeights(torch.zeros_like(push), push, torch.zeros(len(push), dtype=torch.long), ())
    through: dict[str, torch.Tensor] = {}
    active = 0
    for c in pushed:
        rows = np.flatnonzero(labels == c)[:images_per_class]
        noisy, t, condition, target = _class_inputs(
            loss_setup, setup.data, rows=rows, class_id=c, grid=grid, seed=seed + 1
        )
        full = loss_setup.predict(capman, noisy, t, condition).float()
        with expert_disabled(capman):
            general = loss_setup.predict(capman, noisy, t, condition).float()
        class_ids = torch.full((len(t),), c, device=full.device)
        if form in RELATIVE_FORMS:
            m = relative_margin * (full.detach() - target.float()).pow(2).flatten(1).mean(1).sqrt()
        else:
            m = torch.full((len(t),), margin, device=full.device)
        active += int(((full - general).detach().pow(2).flatten(1).mean(1).sqrt() < m).sum())
        routes = {
            "theta": cm_loss(full, general.detach(), class_ids, push_only, form="hinge", margin=m)[0],
            "theta_g": cm_loss(
                full.detach(), general, class_ids, push_only, form=form, margin=margin,
                relative_margin=relative_margin, target=target.float(),
            )[0],
        }  # fmt: skip
        for key, loss in routes.items():
            grads = torch.autograd.grad(loss / len(pushed), params, retain_graph=key == "theta", allow_unused=True)
            flat = _flat(grads, list(params))
            through[key] = through[key] + flat if key in through else flat
    return through, active


def _heldout_rates(
    capman: nn.Module,
    params: Sequence[torch.Tensor],
    loss_setup: LossSetup,
    setup: AnalysisSetup,
    directions: dict[str, torch.Tensor],
    grid: torch.Tensor,
    images_per_class: int,
    seed: int,
) -> dict[str, list[float]]:
    """Per class with held-out images: the first-order change of θ's held-out loss per unit step along each negative
    direction (NaN for a class without held-out images)."""
    heldout, per_class_rows = _heldout_rows(setup, images_per_class)
    rates: dict[str, list[float]] = {key: [math.nan] * len(setup.class_names) for key in directions}
    for c, rows in enumerate(per_class_rows):
        if len(rows) == 0:
            continue
        noisy, t, condition, target = _class_inputs(loss_setup, heldout, rows=rows, class_id=c, grid=grid, seed=seed)
        loss = (loss_setup.predict(capman, noisy, t, condition).float() - target.float()).pow(2).mean()
        grad = _flat(torch.autograd.grad(loss, params, allow_unused=True), list(params))
        for key, direction in directions.items():
            norm = float(direction.norm())
            rates[key][c] = float(grad @ -direction / norm) if norm > 0 else 0.0
    return rates


def push_gradient(
    pipeline: str | os.PathLike,
    dataset: str | None = None,
    *,
    form: str | None = None,
    images_per_class: int = 16,
    timesteps: int = 10,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    **data_kwargs: Any,
) -> dict[str, Any]:
    """Where the push term of L_CM sends its gradient, at the run's final weights (dropout off).

    The push term (weights and margin as the run trained them; ``form`` overrides the run's hinge form) is evaluated
    on up to ``images_per_class`` training images of every pushed class × the timestep grid. Its gradient is split
    into the part through ε_θ and the part through ε_θg, each on the general weights W^g and on the expert E (the
    θ part is what the chain rule gives; ``hinge_general`` and ``relative`` do not apply it). ``norm_push_general_
    weights`` is the norm on W^g of what the form applies. For each class with held-out images, ``theta_heldout_rate``
    is the first-order change of θ's held-out loss per unit step along the negative applied push (``push``) and
    along its θ^g part alone (> 0: the push makes θ worse there).
    """
    folder = read_pipeline_folder(pipeline)
    require_adapter(folder)
    setup = prepare_analysis(pipeline, dataset, **data_kwargs)
    args = folder.args
    form = form or args.get("cm_form", "hinge")
    if form not in LOWER_MARGIN_FORMS:
        raise ConfigError(f"--form {form}: the push gradient is measured for {', '.join(LOWER_MARGIN_FORMS)}")
    capman = load_capman_unet(folder).to(setup.denoiser.device)
    capman.eval()
    names, params = zip(*[(n, p) for n, p in capman.named_parameters() if p.is_floating_point()], strict=True)
    for p in params:
        p.requires_grad_(True)
    is_expert = torch.cat([torch.full((p.numel(),), "capman_expert_" in n) for n, p in zip(names, params, strict=True)])
    loss_setup = make_loss_setup(setup.pipe, setup.folder, setup.class_names, setup.dataset)
    weights = cm_weights(
        setup.data.class_counts,
        "hinge",
        consistency_weight=0.0 if args.get("no_consistency") else args.get("cm_consistency_weight", 1.0),
        diversity_weight=0.0 if args.get("no_diversity") else args.get("cm_diversity_weight", 1.0),
        splits=setup.data.splits,
    )
    grid = timestep_grid(loss_setup.schedule.num_train_timesteps, timesteps)
    pushed = [c for c in range(len(setup.class_names)) if weights.push[c] > 0]
    margins = (args.get("cm_margin", DEFAULT_MARGIN), args.get("cm_relative_margin", DEFAULT_RELATIVE_MARGIN))
    through, active = _push_routes(
        capman, params, loss_setup, setup, form, margins, weights.push, pushed, grid, images_per_class, seed
    )
    record: dict[str, Any] = {"form": form, "pushed_classes": pushed, "active_rows": active}
    for key, flat in through.items():
        record[f"norm_through_{key}_general_weights"] = float(flat[~is_expert].norm())
        record[f"norm_through_{key}_expert"] = float(flat[is_expert].norm())
    # What training applies: both routes for "hinge"; the θ^g route alone where ε_θ is held constant.
    applied = through["theta"] + through["theta_g"] if form == "hinge" else through["theta_g"]
    directions = {"push": applied, "push_theta_g_part": through["theta_g"]}
    record["norm_push_general_weights"] = float(applied[~is_expert].norm())

    rates = _heldout_rates(capman, params, loss_setup, setup, directions, grid, images_per_class, seed)
    result = {
        "analysis": "push",
        "pipeline": str(folder.path),
        "class_names": setup.class_names,
        "class_counts": setup.data.class_counts,
        **record,
        "theta_heldout_rate": rates,
        "splits": split_means(rates, setup.data.splits),
    }
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json(result, Path(output_dir) / "push.json")
    return result
