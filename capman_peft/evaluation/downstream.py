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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

CLASSIFIERS = ("resnet18", "small_cnn")
REAL_ONLY = "real images only"
METRICS = ("precision", "recall", "accuracy", "many_accuracy", "medium_accuracy", "few_accuracy")

Images = tuple[torch.Tensor, torch.Tensor]
"""uint8 images N x 3 x H x W and their class ids N."""


def build_classifier(name: str, num_classes: int) -> nn.Module:
    """``resnet18``: torchvision's ResNet-18 with the CIFAR stem (a 3 x 3 stride-1 first convolution, no max-pool),
    for 32 px and larger; ``small_cnn``: three conv layers and a linear head, for the small testbeds."""
    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if name == "small_cnn":
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(*layers[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))
    raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {name!r}")


@dataclass(frozen=True)
class ClassifierTraining:
    """How each classifier is trained: SGD with momentum 0.9 and a cosine learning rate (the usual CIFAR ResNet
    recipe), optionally with random crops (padding of 1/8 of the side) and horizontal flips."""

    classifier: str = "resnet18"
    epochs: int = 200
    batch_size: int = 128
    learning_rate: float = 0.1
    weight_decay: float = 5e-4
    random_crop: bool = False
    random_flip: bool = False
    device: str = "cpu"


def _augment(x: torch.Tensor, settings: ClassifierTraining, generator: torch.Generator) -> torch.Tensor:
    """A random crop of the zero-padded batch and a horizontal flip per image, as the settings ask."""
    n, side = x.shape[0], x.shape[-1]
    if settings.random_crop:
        pad = max(1, side // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy : dy + side, dx : dx + side] for i, (dy, dx) in enumerate(offsets)])
    if settings.random_flip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    return x


def _inputs(images: torch.Tensor, device: str) -> torch.Tensor:
    return images.to(device).float() / 127.5 - 1


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: ClassifierTraining, seed: int
) -> nn.Module:
    """A classifier trained from a seeded initialisation with seeded batches and augmentation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(settings.classifier, num_classes).to(settings.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.learning_rate, momentum=0.9, weight_decay=settings.weight_decay
    )
    steps_per_epoch = -(-len(labels) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * steps_per_epoch)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            x = _augment(_inputs(images[rows], settings.device), settings, generator)
            loss = F.cross_entropy(model(x), labels[rows].to(settings.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def score_classifier(
    model: nn.Module, test: Images, splits: Mapping[str, Sequence[int]], device: str, batch_size: int = 256
) -> dict[str, float]:
    """Macro precision and recall, accuracy, and the accuracy on the held-out images of each split's classes."""
    images, labels = test
    batches = range(0, len(labels), batch_size)
    predicted = torch.cat([model(_inputs(images[i : i + batch_size], device)).argmax(1).cpu() for i in batches])
    precision, recall, _, _ = precision_recall_fscore_support(
        labels.numpy(), predicted.numpy(), labels=list(range(int(labels.max()) + 1)), average="macro", zero_division=0
    )
    correct = (predicted == labels).float()
    scores = {"precision": float(precision), "recall": float(recall), "accuracy": correct.mean().item()}
    for split, classes in splits.items():
        in_split = torch.isin(labels, torch.tensor(list(classes), dtype=labels.dtype))
        scores[f"{split}_accuracy"] = correct[in_split].mean().item() if in_split.any() else float("nan")
    return scores


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
