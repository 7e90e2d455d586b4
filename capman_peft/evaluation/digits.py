"""The digits classifier: an offline feature extractor and "does class c look like class c" for imb-digits.

A small CNN trained deterministically on scikit-learn's digits (seconds on a CPU, cached as safetensors). Its
penultimate layer feeds FID/KID/precision/recall and its logits feed IS, through the torch-fidelity feature extractor
``digits-classifier`` registered on import; its predictions give the per-class accuracy of generated digits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from ..data import class_splits, get_dataset_spec, load_reference_dataset
from ..errors import ConfigError
from .fidelity import DIGITS_CLASSIFIER, INCEPTION, check_safe_extractor, default_cache_dir, uint8_images


class DigitsClassifier(nn.Module):
    """Small CNN on 16x16 grey digits; ``forward(uint8 B x 3 x H x W) -> (features[B, 64], logits[B, 10])``."""

    input_size = 16
    feature_dim = 64
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        # Features are divided by their RMS on the training digits (set after training). Unscaled ReLU features
        # reach ~50, and KID's cubic kernel (x.y / d + 1)^3 then loses all precision in float32 (measured: KID of
        # two identical sets came out as -400).
        self.register_buffer("feature_scale", torch.ones(()))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mean(dim=1, keepdim=True) / 255.0
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        return x

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.fc(self.conv(self.preprocess(images)).flatten(1)))
        return hidden / self.feature_scale, self.head(hidden)


def digits_training_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All balanced scikit-learn digits (174 per class) as uint8 images at ``resolution``, with labels."""
    reference = load_reference_dataset("imb-digits", resolution)
    return uint8_images(reference), torch.tensor(reference.labels)


def train_digits_classifier(
    images: torch.Tensor, labels: torch.Tensor, seed: int = 0, epochs: int = 30, lr: float = 3e-3
) -> DigitsClassifier:
    """Train a :class:`DigitsClassifier` deterministically (seeded init and shuffling; a few seconds on a CPU)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(images[idx])[1], labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        model.feature_scale.copy_(model(images)[0].pow(2).mean().sqrt())
    return model


def digits_classifier_file(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Path of the cached digits classifier, trained on all balanced digits and saved (safetensors) if missing."""
    from safetensors.torch import save_file

    path = Path(cache_dir or default_cache_dir()) / f"digits_classifier_v1_seed{seed}.safetensors"
    if not path.exists():
        images, labels = digits_training_images()
        model = train_digits_classifier(images, labels, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(model.state_dict(), str(tmp), metadata={"seed": str(seed), "data": "sklearn digits, balanced"})
        os.replace(tmp, path)  # atomic: a concurrent run never reads a half-written file
    return path


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The digits classifier from ``path`` (default: the cached one, trained on first use)."""
    from safetensors.torch import load_file

    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path or digits_classifier_file())))
    return model.eval().requires_grad_(False)


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor ``digits-classifier``: "features" (FID/KID/PRC) and "logits" (IS).

    ``feature_extractor_weights_path`` is the classifier's safetensors file; default: the cached one.
    """

    def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = load_digits_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, logits = self.model(images)
        provided = {"features": features, "logits": logits}
        return tuple(provided[name] for name in self.features_list)


def register_digits_feature_extractor() -> None:
    """Make ``feature_extractor="digits-classifier"`` known to torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DIGITS_CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_CLASSIFIER, DigitsFeatureExtractor)


register_digits_feature_extractor()


def resolve_feature_extractor(dataset: str, feature_extractor: str | None) -> str:
    """The extractor to use: the given one (registered, and one whose weights load without running code), else
    digits-classifier for digits, else Inception."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if feature_extractor is None:
        return DIGITS_CLASSIFIER if get_dataset_spec(dataset) is get_dataset_spec("imb-digits") else INCEPTION
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigError(
            f"unknown feature extractor {feature_extractor!r}; registered: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}"
        )
    check_safe_extractor(feature_extractor)
    return feature_extractor


@torch.no_grad()
def classifier_accuracy(
    classifier: DigitsClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    splits: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Fraction of images the classifier assigns to their own class: overall, per class and per split (`splits`:
    as in ``measure_fidelity``)."""
    batches = range(0, len(images), batch_size)
    predictions = torch.cat([classifier(images[i : i + batch_size])[1].argmax(1) for i in batches])
    correct = (predictions == labels).float()
    per_class = [correct[labels == c].mean().item() if (labels == c).any() else None for c in range(num_classes)]
    splits = {
        name: correct[torch.isin(labels, torch.tensor(ids))].mean().item()
        for name, ids in (splits or class_splits(num_classes)).items()
        if ids
    }
    return {"classifier": DIGITS_CLASSIFIER, "overall": correct.mean().item(), "per_class": per_class, "splits": splits}
