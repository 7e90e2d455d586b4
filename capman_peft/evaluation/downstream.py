"""Downstream utility (paper sec. G.5, Tab. G.8): does adding generated images to the real long-tailed training set
train a better classifier?

For every seed, one classifier on the real images alone and one per generator on the real images plus its generated
ones; every classifier is judged on the same balanced held-out set: macro precision and recall, accuracy overall and
per Many / Medium / Few split (the real set's), reported as mean ± std over the seeds. ``capman-downstream`` is the
command line (:mod:`capman_peft.evaluation.downstream_cli`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..classification import ClassifierTraining, Images, score_classifier, train_classifier

REAL_ONLY = "real images only"


def downstream_utility(
    real: Images,
    test: Images,
    generated: Mapping[str, Images],
    *,
    num_classes: int,
    splits: Mapping[str, Sequence[int]],
    settings: ClassifierTraining,
    seeds: Sequence[int],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per training set (the real images alone, then real + each generator's images): the scores of every
    seed's classifier and their mean and std (sample std; 0 for one seed)."""
    from tqdm.auto import tqdm

    sources: dict[str, Images | None] = {REAL_ONLY: None, **generated}
    jobs = [(name, seed) for name in sources for seed in seeds]
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
    for name, seed in tqdm(jobs, desc="Classifiers", unit="run", disable=not progress):
        extra = sources[name]
        images, labels = real if extra is None else (torch.cat([real[0], extra[0]]), torch.cat([real[1], extra[1]]))
        model = train_classifier(images, labels, num_classes, settings, seed)
        scores[name].append(score_classifier(model, test, splits, settings.device))
    rows = []
    for name, per_seed in scores.items():
        added = 0 if sources[name] is None else len(sources[name][1])
        summary = {
            key: {
                "mean": statistics.mean(s[key] for s in per_seed),
                "std": statistics.stdev(s[key] for s in per_seed) if len(per_seed) > 1 else 0.0,
            }
            for key in per_seed[0]
        }
        rows.append({"source": name, "generated_images": added, "seeds": list(seeds), "per_seed": per_seed, **summary})
    return rows
