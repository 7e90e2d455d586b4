"""Where a CM run's expert is used: per class, how much it changes the prediction, and the loss of θ and θ^g."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..evaluation.report import write_json
from ..expert_use import measure_expert_use
from ..objective.schedule import PREDICTED
from ..run_folder import load_capman_unet, read_pipeline_folder, require_adapter
from .plot import plot_per_class
from .probes import (
    _check_sampling,
    _common_record,
    make_loss_setup,
    prepare_analysis,
    split_means,
)


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
    capman = load_capman_unet(setup.folder).to(setup.denoiser.device)
    loss_setup = make_loss_setup(setup.pipe, setup.folder, setup.class_names, setup.dataset)
    values = measure_expert_use(
        capman,
        loss_setup,
        setup.data,
        num_classes=len(setup.class_names),
        num_batches=num_batches,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    result = {
        "analysis": "capacity",
        **_common_record(setup, loss_setup, num_batches, batch_size, seed),
        **values,
        "splits": split_means(values, setup.data.splits),
    }
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(result, output_dir / "capacity.json")
        p = PREDICTED[loss_setup.schedule.prediction_type]
        title = f"Expert usage per class: mean ({p}_θ − {p}_θg)²"
        plot_per_class(result, "expert_usage", title, output_dir / "capacity.png")
    return result
