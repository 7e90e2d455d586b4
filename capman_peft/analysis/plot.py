"""The per-class bar chart of an analysis result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import class_splits

_SPLIT_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def plot_per_class(result: dict[str, Any], key: str, title: str, path: str | Path) -> Path:
    """One bar per class, x = class index sorted by training-set size (largest first), coloured by split."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    order = result["order_by_size"]
    splits = result.get("class_splits") or class_splits(result["class_counts"])
    split_of = {c: s for s, ids in splits.items() for c in ids}
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
