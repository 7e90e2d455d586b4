"""Writing results: ``metrics.json``, the sample grid, the per-split FID chart, the model card section, a summary line.

Floats that are not finite are written as JSON ``null``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import grid_classes
from ..pipelines import image_grid
from ..run_folder import PipelineFolder
from .fidelity import INCEPTION, _finite_or_none


def write_json(data: Any, path: str | Path) -> Path:
    """Pretty JSON; NaN/inf become null so the file is strict JSON."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return _finite_or_none(value)

    path = Path(path)
    path.write_text(json.dumps(clean(data), indent=2, allow_nan=False) + "\n")
    return path


def save_sample_grid(
    images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], path: str | Path, per_row: int = 8
) -> Path:
    """PNG with one row per class of `classes` (its first ``per_row`` images; white where a class has fewer)."""
    from PIL import Image

    blank = Image.new("RGB", (images.shape[-1], images.shape[-2]), "white")
    cells = []
    for c in classes:
        row = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images[labels == c][:per_row]]
        cells += row + [blank] * (per_row - len(row))
    image_grid(cells, rows=len(classes), cols=per_row).save(path)
    return Path(path)


def write_model_outputs(
    result: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    class_counts: int | Sequence[int],
    output_dir: str | Path,
) -> None:
    """One evaluated model's ``output_dir/metrics.json`` and ``output_dir/samples.png`` (the ``grid_classes`` of its
    training counts: every class of a small set, 10 spread over the sizes of a large one)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, output_dir / "metrics.json")
    save_sample_grid(images, labels, grid_classes(class_counts), output_dir / "samples.png")


def write_comparison(results: Sequence[dict[str, Any]], output_dir: Path) -> None:
    """``output_dir/fid_splits.png`` and, when more than one model was evaluated, ``output_dir/summary.json``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if len(results) > 1:
        write_json(results, output_dir / "summary.json")
    plot_split_fid(results, output_dir / "fid_splits.png")


def display_label(result: dict[str, Any]) -> str:
    return result["label"] + (" (θ^g)" if result.get("expert") == "off" else "")


def plot_split_fid(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Bar chart of Many/Medium/Few/overall FID, one bar group per evaluated model."""
    from matplotlib.figure import Figure

    groups = [s for s in ("many", "medium", "few") if any(s in r.get("splits", {}) for r in results)] + ["overall"]
    width = 0.8 / len(groups)
    fig = Figure(figsize=(max(4.0, 1.6 * len(results) + 1.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(results))
    for i, group in enumerate(groups):
        values = [
            (r["overall"] if group == "overall" else r.get("splits", {}).get(group, {})).get("fid") for r in results
        ]
        values = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, label=group.capitalize())
    ax.set_xticks(x, [display_label(r) for r in results])
    ax.set_ylabel(f"FID ({results[0].get('feature_extractor', INCEPTION)})")
    ax.set_title(f"FID per split, {results[0].get('dataset', '')}")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return Path(path)


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def metrics_markdown(results: Sequence[dict[str, Any]]) -> str:
    """Markdown for the model card's metrics section (:func:`capman_peft.hub.update_model_card_metrics`)."""
    first = results[0]
    scales = sorted({r["guidance_scale"] for r in results})
    lines = [
        f"`capman-eval` on `{first['dataset']}`: {first['num_images_per_class']} generated images per class vs "
        f"{first['reference_images_per_class']} real images per class at {first['resolution']} px, "
        f"{first['scheduler']} sampler, {first['steps']} steps, "
        + (
            "no guidance (a consistency model), "
            if scales == [None]
            else f"guidance scale {' and '.join(f'{w:g}' for w in scales)} (w in eps_u + w (eps_c - eps_u)), "
        )
        + f"seed {first['seed']}; features from `{first['feature_extractor']}`"
        + (" (not comparable to Inception FIDs)." if first["feature_extractor"] != INCEPTION else "."),
        "",
        "| model | FID | KID | IS | precision | recall | Many FID | Medium FID | Few FID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        o, s = r["overall"], r.get("splits", {})
        name = "θ (expert on, merged)" if r["expert"] == "on" else "θ^g (expert off)"
        name += f", w = {r['guidance_scale']:g}" if len(scales) > 1 else ""
        cells = [o.get("fid"), o.get("kid_mean"), o.get("isc_mean"), o.get("precision"), o.get("recall")]
        cells += [s.get(k, {}).get("fid") for k in ("many", "medium", "few")]
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in cells) + " |")
    accuracy = [r for r in results if "classifier_accuracy" in r]
    if accuracy:
        lines += ["", "Digits-classifier accuracy of the generated images (does class c look like class c):", ""]
        for r in accuracy:
            a = r["classifier_accuracy"]
            splits = ", ".join(f"{k} {_fmt(v)}" for k, v in a["splits"].items())
            scale = f", w = {r['guidance_scale']:g}" if len(scales) > 1 else ""
            lines.append(f"* expert {r['expert']}{scale}: overall {_fmt(a['overall'])} ({splits})")
    return "\n".join(lines)


def update_model_card_sections(folders: Sequence[PipelineFolder], results: Sequence[dict[str, Any]]) -> None:
    """Each pipeline's README.md gets its own results in the section between the ``capman-metrics`` markers."""
    from ..hub import update_model_card_metrics

    for folder in folders:
        own = [r for r in results if r["pipeline"] == str(folder.path)]
        update_model_card_metrics(folder.path, metrics_markdown(own))


def _print_summary(result: dict[str, Any]) -> None:
    o = result["overall"]
    parts = [f"{k}={_fmt(o[k])}" for k in ("fid", "kid_mean", "isc_mean", "precision", "recall") if k in o]
    parts += [f"{k}_fid={_fmt(v.get('fid'))}" for k, v in result.get("splits", {}).items()]
    if "classifier_accuracy" in result:
        parts.append(f"classifier_accuracy={_fmt(result['classifier_accuracy']['overall'])}")
    print(f"[{display_label(result)}] ({result['feature_extractor']} features) " + " ".join(parts))
    for caveat in result.get("caveats", []):
        print(f"capman-eval: caution: {caveat}", file=sys.stderr)
