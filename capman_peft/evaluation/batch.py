"""What ``capman-eval`` does: :func:`evaluate_pipelines` evaluates every pipeline × expert setting × guidance scale
with :func:`capman_peft.evaluation.evaluate.evaluate_pipeline`, then writes the comparison and the model cards."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..run_folder import check_writable_folder, read_pipeline_folder
from .evaluate import EXPERT_SETTINGS, EvalSettings, _with_overrides, evaluate_pipeline
from .report import _print_summary, update_model_card_sections, write_comparison
from .sampling import _check_settings

logger = logging.getLogger(__name__)


def evaluate_pipelines(
    pipelines: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    expert: str | None = None,
    update_model_cards: bool = True,
    *,
    dataset: str | None = None,
    settings: EvalSettings | None = None,
    guidance_scales: Sequence[float] | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """What ``capman-eval`` does: evaluate each pipeline (and expert setting, and guidance scale), then write files
    and charts.

    One model: ``output_dir/{metrics.json,samples.png,fid_splits.png}``. Several (more than one ``pipelines`` or
    ``expert="both"``): ``output_dir/<label>/{metrics.json,samples.png}`` per model, plus ``output_dir/summary.json``
    (the list of all results) and ``output_dir/fid_splits.png``. Default ``output_dir``: ``<pipeline>/eval`` for a
    single pipeline folder, else ``./capman_eval``. ``expert``: ``on``, ``off`` or ``both``; default: the settings'
    (``on``). ``guidance_scales``: several scales, each a model of its own (label suffix ``-w<scale>``); default:
    the settings' one. With ``update_model_cards``, each pipeline's README.md gets its results in the section between
    the ``capman-metrics`` markers (replaced, or appended when the card has none). ``dataset``, ``settings`` and
    ``overrides`` go to :func:`evaluate_pipeline`.
    """
    settings = _with_overrides(settings, overrides)
    expert = settings.expert if expert is None else expert
    if expert not in EXPERT_SETTINGS:
        raise ConfigError(f"expert must be one of {', '.join(EXPERT_SETTINGS)}, got {expert!r}")
    if not pipelines:
        raise ConfigError("no pipeline given")
    folders = [read_pipeline_folder(p) for p in pipelines]  # fail fast on a bad folder before any sampling
    experts = ["on", "off"] if expert == "both" else [expert]
    scales = [settings.guidance_scale] if guidance_scales is None else list(guidance_scales)
    if not scales:
        raise ConfigError("no guidance scale given")
    for scale in scales:
        _check_settings(settings.num_images_per_class, settings.steps, scale, settings.batch_size, settings.seed)
    unguided = [f.path for f in folders if not f.family.guided]
    if unguided and len(scales) > 1:
        raise ConfigError(
            f"--guidance_scale {' '.join(f'{w:g}' for w in scales)}: {unguided[0]} samples without guidance (a "
            "consistency model); allowed: one scale, or none"
        )
    guided = [w for w in scales if w != 1]
    for folder in folders:
        if guided and folder.family.guided and not folder.learned_unconditional:
            logger.warning(
                "%s: trained from scratch without label (caption) dropout, so its unconditional prediction was never "
                "trained; guidance %g extrapolates from it (pass --guidance_scale 1 to sample as trained)",
                folder.path,
                guided[0],
            )
    jobs = [(f, e, w) for f in folders for e in experts for w in scales]
    if output_dir is None:
        output_dir = folders[0].path / "eval" if len(folders) == 1 else Path("capman_eval")
    output_dir = Path(output_dir)
    check_writable_output(output_dir, [f.path for f in folders])
    if update_model_cards:
        for folder in folders:
            try:
                check_writable_folder(folder.path, "--pipeline")
            except ConfigError as err:
                raise ConfigError(f"{err} (its README.md gets the metrics; or pass --no_model_card)") from None
    names = [f.path.resolve().name + (f"-w{w:g}" if len(scales) > 1 else "") for f, _, w in jobs]
    labels = _unique_labels(names, [e for _, e, _ in jobs])
    results = []
    for (folder, setting, scale), label in zip(jobs, labels, strict=True):
        target = output_dir if len(jobs) == 1 else output_dir / label
        result = evaluate_pipeline(
            folder.path, dataset, replace(settings, expert=setting, guidance_scale=scale), output_dir=target,
            label=label,
        )  # fmt: skip
        results.append(result)
        _print_summary(result)
    write_comparison(results, output_dir)
    if update_model_cards:
        update_model_card_sections(folders, results)
    return results


def check_writable_output(output_dir: Path, pipelines: Sequence[Path]) -> None:
    """Refuse, before any work, an output folder that is a pipeline being evaluated (its samples.png and card would
    be replaced), that cannot be written, or whose disk is full."""
    if any(output_dir.resolve() == Path(p).resolve() for p in pipelines):
        raise ConfigError(
            f"--output_dir {output_dir}: is the pipeline folder being evaluated (its samples.png would be replaced); "
            "allowed: another folder (default: <pipeline>/eval)"
        )
    check_writable_folder(output_dir)


def _unique_labels(names: list[str], experts: list[str]) -> list[str]:
    labels = [n + ("-general" if e == "off" else "") for n, e in zip(names, experts, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label}-{seen[label]}")
    return out
