"""Sample generation and torch-fidelity metrics for trained pipelines: overall, per Many/Medium/Few split, per class.

``capman-eval --pipeline out/ --dataset imb-cifar100`` generates the same number of images for every class from a
training run's output folder (a class-conditional UNet2DModel pipeline or a merged Stable Diffusion pipeline) and
compares them with the dataset's balanced real reference split (paper sec. 4.1):

* overall: all generated images vs the whole reference: FID, KID, IS, precision/recall;
* per split (Many / Medium / Few = class-index thirds): that split's generated vs that split's real images, FID and
  KID (KID subset size ``min(#generated, #real, 1000)``);
* optionally per class: FID of each class's generated vs real images.

``--expert off`` evaluates θ^g alone (paper Tab. 7 "CM (θ^g)"): the unmerged adapter in ``out/adapter`` is loaded and
merged without its expert (:func:`capman_peft.tuner.merge_general_and_unload`). A from-scratch (full-mode) run carries
every trained weight in the adapter, so only ``out/unet/config.json`` is needed besides it; a LoRA run on Stable
Diffusion needs the pretrained base UNet named by ``base_model_name_or_path`` in ``out/adapter/adapter_config.json``
(a local folder or a Hub id already in the local cache when offline).

Feature extractors. The default is torch-fidelity's ``inception-v3-compat`` for every metric, precision/recall
included (computed in a separate ``calculate_metrics`` call, since torch-fidelity's own default for it is VGG-16 and it
passes one weights path to both). Its weights download on first use; offline, pass
``--feature_extractor_weights_path``. For ``--dataset imb-digits`` the default is ``digits-classifier``: a small CNN
trained deterministically on scikit-learn's digits (seconds on a CPU, cached as safetensors), whose penultimate layer
feeds FID/KID/precision/recall and whose logits feed IS; its predictions also give the per-class accuracy of the
generated digits. FIDs from different extractors are not comparable.

Reference features are cached by torch-fidelity under a name that encodes dataset and source, split (``all``,
``many``, ``medium``, ``few``, ``class<k>``), resolution, image count and the extractor's weights.

``metrics.json`` (one per evaluated model; floats that are not finite are written as ``null``)::

    {
      "pipeline": "out", "label": "out", "kind": "class-conditional" | "text-to-image",
      "expert": "on" | "off",
      "dataset": "imb-cifar100", "dataset_name": null, "train_data_dir": null,
      "class_names": [...], "num_classes": 100, "splits_classes": {"many": [0, ...], "medium": [...], "few": [...]},
      "num_images_per_class": 500, "reference_images_per_class": 100, "resolution": 32,
      "scheduler": "ddim", "steps": 50, "guidance_scale": 1.5, "seed": 0,
      "feature_extractor": "inception-v3-compat", "feature_extractor_weights_path": null,
      "metrics": ["fid", "kid", "isc", "prc"], "torch_fidelity_version": "0.4.0",
      "overall": {"num_generated", "num_real", "fid", "kid_mean", "kid_std", "kid_subset_size",
                  "isc_mean", "isc_std", "precision", "recall", "f_score"},
      "splits": {"many": {"num_generated", "num_real", "fid", "kid_mean", "kid_std", "kid_subset_size"},
                 "medium": {...}, "few": {...}},
      "per_class": {"fid": [one per class id]},                               # only with --per_class_fid
      "classifier_accuracy": {"classifier": "digits-classifier", "overall": 0.93,
                              "per_class": [one per class id], "splits": {"many": ..., "medium": ..., "few": ...}}
                                                                               # only for imb-digits
    }

Only the requested metrics appear; a split with no classes (fewer than 3 classes in all) is left out; KID is ``null``
where a subset of 2 images cannot be drawn and precision/recall where a set has fewer than 4 images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import class_prompts, class_splits, get_dataset_spec, load_reference_dataset
from .errors import ConfigError, run_cli
from .pipelines import image_grid

METRIC_NAMES = ("fid", "kid", "isc", "prc")
SCHEDULERS = ("ddim", "dpm", "pipeline")
EXPERT_SETTINGS = ("on", "off", "both")
INCEPTION = "inception-v3-compat"
DIGITS_CLASSIFIER = "digits-classifier"
KID_MAX_SUBSET = 1000
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k for the k-NN manifolds of precision/recall

# torch-fidelity result keys -> ours
_FIDELITY_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/capman_peft`` (``~/.cache/capman_peft``): digits classifier and reference features."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capman_peft"


def to_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (the data module's ``pixel_values``) -> uint8, the rounding diffusers uses for its outputs."""
    return ((pixel_values.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# The digits classifier: an offline feature extractor and "does class c look like class c" for imb-digits
# ----------------------------------------------------------------------------------------------------------


class DigitsClassifier(nn.Module):
    """Small CNN on 16x16 grey digits; ``forward(uint8 B x 3 x H x W) -> (features[B, 64], logits[B, 10])``."""

    input_size = 16
    feature_dim = 64

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
        self.head = nn.Linear(self.feature_dim, 10)
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
    images = torch.stack([to_uint8(reference[i]["pixel_values"]) for i in range(len(reference))])
    return images, torch.tensor(reference.labels)


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


def _feature_extractor_base() -> type:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    return FeatureExtractorBase


class DigitsFeatureExtractor(_feature_extractor_base()):
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


@torch.no_grad()
def classifier_accuracy(
    classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int = 256
) -> dict[str, Any]:
    """Fraction of images the classifier assigns to their own class: overall, per class and per split."""
    batches = range(0, len(images), batch_size)
    predictions = torch.cat([classifier(images[i : i + batch_size])[1].argmax(1) for i in batches])
    correct = (predictions == labels).float()
    per_class = [correct[labels == c].mean().item() if (labels == c).any() else None for c in range(num_classes)]
    splits = {
        name: correct[torch.isin(labels, torch.tensor(ids))].mean().item()
        for name, ids in class_splits(num_classes).items()
        if ids
    }
    return {"classifier": DIGITS_CLASSIFIER, "overall": correct.mean().item(), "per_class": per_class, "splits": splits}


# ----------------------------------------------------------------------------------------------------------
# Images as torch-fidelity inputs
# ----------------------------------------------------------------------------------------------------------


class UInt8Images(torch.utils.data.Dataset):
    """uint8 ``3 x H x W`` tensors, as torch-fidelity wants them: from a stacked tensor or a data-module dataset.

    A data-module dataset (items with ``pixel_values`` in [-1, 1]) is read lazily, so a large reference split is
    decoded only when its features are not cached yet.
    """

    def __init__(self, images: torch.Tensor | torch.utils.data.Dataset, indices: Sequence[int] | None = None):
        self.images = images
        self.indices = list(range(len(images))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.images[self.indices[i]]
        return item if isinstance(self.images, torch.Tensor) else to_uint8(item["pixel_values"])

    def subset(self, indices: Sequence[int]) -> UInt8Images:
        return UInt8Images(self.images, [self.indices[int(i)] for i in indices])


# ----------------------------------------------------------------------------------------------------------
# torch-fidelity metrics: overall, per split, per class
# ----------------------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


# The Inception weights torch-fidelity uses (its own release); read once and kept as safetensors, see below.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def inception_safetensors(weights_path: str | None, cache_dir: Path) -> Path:
    """The Inception-v3 weights as a safetensors file, the only form this project reads.

    A ``.safetensors`` file is used as is. torch-fidelity ships (and would itself load with ``torch.load(...,
    weights_only=False)``, i.e. unrestricted unpickling) a ``.pth``: that file — the download when no path is
    given — is read once with ``torch.load(weights_only=True)``, torch's restricted loader that cannot run code, and
    written to ``cache_dir`` as safetensors; later runs read only the safetensors copy.
    """
    from safetensors.torch import save_file

    if weights_path is not None and str(weights_path).endswith(".safetensors"):
        return Path(weights_path)
    source = Path(weights_path) if weights_path is not None else cache_dir / Path(INCEPTION_URL).name
    tag = (
        hashlib.sha1(f"{source.resolve()}:{source.stat().st_size}".encode()).hexdigest()[:10]
        if source.exists()
        else "release"
    )
    target = cache_dir / f"inception-v3-compat-{tag}.safetensors"
    if target.is_file():
        return target
    if not source.exists():
        if weights_path is not None:
            raise ConfigError(f"--feature_extractor_weights_path {weights_path}: no such file")
        from .hub import hub_reachable

        try:
            source.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(source), progress=False)
        except Exception as err:
            raise ConfigError(
                f"--feature_extractor inception-v3-compat: cannot download its weights from {INCEPTION_URL} ({err}; "
                f"{'offline?' if not hub_reachable() else 'network error'}); allowed: "
                "--feature_extractor_weights_path with a local copy (.pth or .safetensors)"
            ) from None
        return inception_safetensors(str(source), cache_dir)
    state = torch.load(source, map_location="cpu", weights_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


def build_feature_extractor(name: str, layers: Sequence[str], weights_path: str | None, cache_dir: Path, device: str):
    """A torch-fidelity feature extractor on `device`; Inception's weights come from safetensors only."""
    from torch_fidelity.utils import create_feature_extractor

    if name != INCEPTION:
        extractor = create_feature_extractor(
            name, list(layers), cuda=False, feature_extractor_weights_path=weights_path, verbose=False
        )
        return extractor.to(device)
    from safetensors.torch import load_file
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    state = load_file(str(inception_safetensors(weights_path, cache_dir)))
    # The constructor loads its weights itself; with no path it calls this download helper, which we answer with
    # the safetensors tensors (so its unrestricted torch.load never runs).
    download = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        extractor = inception.FeatureExtractorInceptionV3(name, list(layers), verbose=False)
    finally:
        inception.load_state_dict_from_url = download
    return extractor.to(device)


def extract_features(images: UInt8Images, extractor: Any, batch_size: int, device: str) -> dict[str, torch.Tensor]:
    """torch-fidelity's features of every image, per layer (rows in the order of `images`)."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    # No DataLoader workers (save_cpu_ram): the generated set is in memory, and workers cost seconds to start.
    return get_featuresdict_from_dataset(images, extractor, batch_size, device.startswith("cuda"), True, False)


def cached_reference_features(
    images: UInt8Images, layers: Sequence[str], extract: Any, cache_file: Path | None
) -> dict[str, torch.Tensor]:
    """The reference set's features, read from / written to `cache_file` (safetensors; None: no cache).

    A cache file that cannot be read (truncated, corrupt) or does not hold these features is named in a warning,
    recomputed and replaced; the new file is written under a temporary name first.
    """
    from safetensors.torch import load_file, save_file

    if cache_file is not None and cache_file.is_file():
        try:
            cached = load_file(str(cache_file))
            if set(layers) <= set(cached) and all(len(cached[k]) == len(images) for k in layers):
                return cached
            reason = "it holds other features"
        except Exception as err:  # safetensors reports truncation and corruption with its own error types
            reason = " ".join(str(err).split()) or type(err).__name__
        print(f"capman-eval: warning: {cache_file}: cannot be used ({reason}); recomputing it", file=sys.stderr)
    features = extract(images)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".incomplete")
        save_file({k: v.contiguous() for k, v in features.items()}, str(tmp))
        tmp.replace(cache_file)
    return features


def fidelity_metrics(
    generated: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    layers: dict[str, str],
) -> dict[str, Any]:
    """torch-fidelity's metrics from two sets of features (`layers`: metric -> feature layer), as calculate_metrics
    would give them for the images; FID/KID/PRC compare the sets, IS uses the generated one only."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    n_gen = len(next(iter(generated.values())))
    n_real = len(next(iter(reference.values())))
    out: dict[str, Any] = {"num_generated": n_gen, "num_real": n_real}
    results: dict[str, Any] = {}
    if "fid" in layers:
        stats = [fid_featuresdict_to_statistics(f, layers["fid"]) for f in (generated, reference)]
        results.update(fid_statistics_to_metric(*stats, False))
    if "kid" in layers:
        subset = min(n_gen, n_real, KID_MAX_SUBSET)
        out["kid_subset_size"] = subset
        if subset < 2:  # the unbiased MMD estimate divides by m (m - 1)
            out.update(kid_mean=None, kid_std=None)
        else:
            results.update(
                kid_featuresdict_to_metric(generated, reference, layers["kid"], kid_subset_size=subset, verbose=False)
            )
    if "isc" in layers:
        results.update(isc_featuresdict_to_metric(generated, layers["isc"], isc_splits=min(10, n_gen), verbose=False))
    if "prc" in layers:
        if min(n_gen, n_real) <= PRC_NEIGHBORHOOD:
            out.update(precision=None, recall=None, f_score=None)
        else:
            results.update(prc_featuresdict_to_metric(generated, reference, layers["prc"], verbose=False))
    out.update({_FIDELITY_KEYS[k]: _finite_or_none(float(v)) for k, v in results.items() if k in _FIDELITY_KEYS})
    return out


def measure_fidelity(
    generated: torch.Tensor,
    generated_labels: torch.Tensor | Sequence[int],
    reference: torch.Tensor | torch.utils.data.Dataset,
    reference_labels: torch.Tensor | Sequence[int],
    num_classes: int,
    *,
    metrics: Sequence[str] = METRIC_NAMES,
    feature_extractor: str = INCEPTION,
    feature_extractor_weights_path: str | None = None,
    per_class_fid: bool = False,
    cache_prefix: str | None = None,
    cache_root: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Overall, per-split and (optionally) per-class metrics of generated vs real images.

    Features are extracted once per set and subsets are compared by indexing them, so a split costs no extra
    extraction.

    Args:
        generated: uint8 ``N x 3 x H x W``.
        reference: uint8 tensor or a data-module dataset (items with ``pixel_values`` in [-1, 1]).
        metrics: any of ``fid``, ``kid``, ``isc``, ``prc``; splits and classes get only FID and KID.
        cache_prefix: caches the reference features as ``<cache_root>/<prefix>-<extractor>.safetensors``; ``None``
            caches nothing.
    """
    from torch_fidelity.utils import resolve_feature_layer_for_metric

    metrics = _check_metrics(metrics)
    gen_labels = torch.as_tensor(generated_labels).long()
    ref_labels = torch.as_tensor(reference_labels).long()
    layers = {m: resolve_feature_layer_for_metric(m, feature_extractor=feature_extractor) for m in metrics}
    cache_root = Path(cache_root) if cache_root is not None else default_cache_dir() / "fidelity"
    extractor = build_feature_extractor(
        feature_extractor, sorted(set(layers.values())), feature_extractor_weights_path, cache_root.parent, device
    )

    def extract(images: UInt8Images) -> dict[str, torch.Tensor]:
        return extract_features(images, extractor, batch_size, device)

    cache_file = None if cache_prefix is None else cache_root / f"{cache_prefix}-{feature_extractor}.safetensors"
    gen = extract(UInt8Images(generated))
    ref = cached_reference_features(UInt8Images(reference), sorted(set(layers.values())), extract, cache_file)

    def restricted(classes: list[int], keep: set[str]) -> tuple[dict, dict, dict]:
        pick = torch.tensor(classes)
        gen_rows, ref_rows = torch.isin(gen_labels, pick), torch.isin(ref_labels, pick)
        sub = {m: layer for m, layer in layers.items() if m in keep}
        return {k: v[gen_rows] for k, v in gen.items()}, {k: v[ref_rows] for k, v in ref.items()}, sub

    result: dict[str, Any] = {"overall": fidelity_metrics(gen, ref, layers)}
    result["splits"] = {}
    if set(metrics) & {"fid", "kid"}:
        for name, classes in class_splits(num_classes).items():
            if classes:
                result["splits"][name] = fidelity_metrics(*restricted(classes, {"fid", "kid"}))
    if per_class_fid:
        result["per_class"] = {"fid": [fidelity_metrics(*restricted([c], {"fid"}))["fid"] for c in range(num_classes)]}
    return result


# ----------------------------------------------------------------------------------------------------------
# Reading a training run's output folder and loading the model to evaluate
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PipelineFolder:
    """What ``capman-eval`` / ``capman-analyze`` read from a training run's ``output_dir``."""

    path: Path
    model_index: dict[str, Any]
    summary: dict[str, Any]
    """``training_summary.json`` (empty when absent)."""

    @property
    def kind(self) -> str:
        """``class-conditional`` (UNet2DModel + class ids) or ``text-to-image`` (Stable Diffusion + prompts)."""
        is_class_conditional = self.model_index.get("_class_name") == "ClassConditionalPipeline"
        return "class-conditional" if is_class_conditional else "text-to-image"

    @property
    def args(self) -> dict[str, Any]:
        return self.summary.get("args") or {}

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"


def read_pipeline_folder(path: str | os.PathLike) -> PipelineFolder:
    """Check that ``path`` is a diffusers pipeline folder and read its index and training summary."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            f"{str(path)!r} is not a pipeline folder (no model_index.json); pass a training run's output_dir"
        )
    model_index = json.loads((path / "model_index.json").read_text())
    summary_file = path / "training_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    folder = PipelineFolder(path, model_index, summary)
    if folder.kind == "text-to-image" and "unet" not in model_index:
        raise ConfigError(
            f"{str(path)!r} holds a {model_index.get('_class_name')} without a unet; capman-eval evaluates "
            "ClassConditionalPipeline and Stable Diffusion pipelines"
        )
    return folder


def require_adapter(folder: PipelineFolder) -> Path:
    """``output_dir/adapter/adapter_config.json`` of the run that wrote the pipeline, or a ValueError: θ^g needs it,
    and an adapter left over from another run in the same folder must not be taken for it."""
    from .pipelines import RUN_FILE

    config_file = folder.adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{str(folder.path)!r} has no adapter/adapter_config.json: the expert-off model θ^g needs the unmerged "
            "CapMan adapter that training saves next to the merged pipeline"
        )
    run_file = folder.adapter_dir / RUN_FILE
    adapter_run = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
    pipeline_run = folder.summary.get("run_id")
    if adapter_run != pipeline_run:
        raise ConfigError(
            f"{str(folder.adapter_dir)!r} does not belong to the pipeline next to it (adapter of run {adapter_run}, "
            f"pipeline of run {pipeline_run}): it is left over from an earlier run in this folder; retrain, or "
            "evaluate the expert-on model only"
        )
    return config_file


def load_capman_unet(folder: PipelineFolder) -> nn.Module:
    """The unmerged CapMan UNet (a ``PeftModel``, eval mode) from ``output_dir/adapter``.

    Full mode: the adapter holds every trained weight, so the base is built from ``output_dir/unet``'s config.
    LoRA mode: the base is the pretrained UNet named by ``base_model_name_or_path`` in the adapter config (falling
    back to the summary's ``pretrained_model_name_or_path``); it must be available locally when offline.
    """
    from diffusers import UNet2DConditionModel, UNet2DModel
    from peft import PeftModel

    from . import tuner  # noqa: F401  (registers the CapMan tuner with PEFT)

    config_file = require_adapter(folder)
    adapter_config = json.loads(config_file.read_text())
    unet_cls = UNet2DModel if folder.kind == "class-conditional" else UNet2DConditionModel
    if adapter_config.get("mode") == "full":
        base = unet_cls.from_config(unet_cls.load_config(folder.path / "unet"))
    else:
        name = adapter_config.get("base_model_name_or_path") or folder.args.get("pretrained_model_name_or_path")
        if not name:
            raise ConfigError(
                f"{str(config_file)!r} names no base_model_name_or_path; θ^g of a LoRA run needs the pretrained base"
            )
        from .hub import hub_source

        name = hub_source(name, f"base model of {config_file}", "model")
        try:
            as_pipeline = not Path(name).exists() or (Path(name) / "unet").is_dir()
            where = {"subfolder": "unet"} if as_pipeline else {}
            base = unet_cls.from_pretrained(name, use_safetensors=True, **where)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"θ^g of a LoRA run needs the base model {name!r} (base_model_name_or_path in {str(config_file)!r}) "
                f"available locally or from the Hub: {str(err).splitlines()[0]}"
            ) from err
    return PeftModel.from_pretrained(base, str(folder.adapter_dir)).eval()


def load_pipeline(
    path: str | os.PathLike | PipelineFolder,
    expert: str = "on",
    scheduler: str = "pipeline",
    device: str | torch.device = "cpu",
) -> Any:
    """Load a training run's pipeline for sampling, with the expert merged in (θ) or dropped (θ^g).

    Args:
        expert: ``"on"``: the merged pipeline as saved; ``"off"``: its UNet replaced by θ^g built from
            ``output_dir/adapter`` (:func:`load_capman_unet` + ``merge_general_and_unload``).
        scheduler: ``"ddim"``, ``"dpm"`` (DPM-Solver++ multistep) or ``"pipeline"`` (keep the saved one).
    """
    from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler

    from .pipelines import ClassConditionalPipeline
    from .tuner import merge_general_and_unload

    folder = path if isinstance(path, PipelineFolder) else read_pipeline_folder(path)
    if expert not in ("on", "off"):
        raise ConfigError(f"expert must be 'on' or 'off', got {expert!r}")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    loader = ClassConditionalPipeline if folder.kind == "class-conditional" else DiffusionPipeline
    pipe = loader.from_pretrained(str(folder.path), use_safetensors=True)
    if expert == "off":
        pipe.unet = merge_general_and_unload(load_capman_unet(folder)).eval()
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_resolution(pipe: Any) -> int:
    """Side length of the images a pipeline generates by default (UNet sample size, times the VAE factor for SD)."""
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return int(size * getattr(pipe, "vae_scale_factor", 1)) if hasattr(pipe, "vae") else int(size)


def image_seed(seed: int, class_id: int, index: int) -> int:
    """Seed of the ``index``-th image of a class: independent of batch size and of the other classes generated."""
    return int(np.random.SeedSequence([seed, class_id, index]).generate_state(1)[0])


@torch.no_grad()
def generate_balanced(
    pipe: Any,
    num_images_per_class: int,
    num_classes: int,
    *,
    prompts: Sequence[str] | None = None,
    steps: int = 50,
    guidance_scale: float = 1.5,
    seed: int = 0,
    batch_size: int = 64,
    resolution: int | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images_per_class`` images of every class as uint8 ``N x 3 x H x W`` (class-major order) and labels.

    Image k of class c starts from its own seeded noise (:func:`image_seed`), so a set is reproducible whatever the
    batch size. ``prompts`` (one per class) switches to a text-to-image call; ``resolution`` is the SD height/width,
    and class-conditional images of another size are resized (bilinear, antialiased) to it.
    """
    from tqdm.auto import tqdm

    jobs = [(c, k) for c in range(num_classes) for k in range(num_images_per_class)]
    chunks = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="Generating", unit="batch", disable=not progress):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(image_seed(seed, c, k)) for c, k in batch]
        labels = [c for c, _ in batch]
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators, output_type="pt")
        if prompts is None:
            images = pipe(class_labels=labels, **kwargs).images
        else:
            size = resolution or pipeline_resolution(pipe)
            images = pipe(prompt=[prompts[c] for c in labels], height=size, width=size, **kwargs).images
        images = images.float().cpu()
        if resolution is not None and images.shape[-1] != resolution:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
        chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8))
    labels = torch.tensor([c for c, _ in jobs])
    return torch.cat(chunks), labels


# ----------------------------------------------------------------------------------------------------------
# Evaluating one model
# ----------------------------------------------------------------------------------------------------------


def _check_metrics(metrics: Sequence[str] | str) -> list[str]:
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ConfigError(f"unknown metric {', '.join(unknown) or '(none given)'}; allowed: {', '.join(METRIC_NAMES)}")
    return list(dict.fromkeys(names))


def _check_settings(num_images_per_class: int, steps: int, guidance_scale: float, batch_size: int, seed: int) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1

    if not positive_int(num_images_per_class):
        raise ConfigError(f"num_images_per_class must be an integer >= 1, got {num_images_per_class!r}")
    if not positive_int(steps):
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not positive_int(batch_size):
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {guidance_scale!r}")


def resolve_feature_extractor(dataset: str, feature_extractor: str | None) -> str:
    """The extractor to use: the given one (must be registered), else digits-classifier for digits, else Inception."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if feature_extractor is None:
        return DIGITS_CLASSIFIER if get_dataset_spec(dataset) is get_dataset_spec("imb-digits") else INCEPTION
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigError(
            f"unknown feature extractor {feature_extractor!r}; registered: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}"
        )
    return feature_extractor


def _reference_cache_prefix(
    dataset: str, source: dict[str, Any], resolution: int, count: int, extractor: str, weights: str | None
) -> str:
    """``capman-<dataset>-<hash of source and weights>-<res>px-<n>perclass``; torch-fidelity appends the extractor."""
    if weights is not None and Path(weights).is_file():
        weights = f"{Path(weights).resolve()}:{Path(weights).stat().st_size}"
    key = json.dumps({**source, "extractor": extractor, "weights": weights}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"capman-{dataset}-{digest}-{resolution}px-{count}perclass"


def _align_reference_labels(
    reference_labels: Sequence[int], reference_names: list[str], class_names: list[str] | None, num_classes: int
) -> torch.Tensor:
    """Reference labels in the pipeline's class ids: by name when both name the same classes, else by id."""
    labels = torch.as_tensor(list(reference_labels))
    if num_classes != len(reference_names):
        raise ConfigError(
            f"the pipeline has {num_classes} classes but the reference data has {len(reference_names)} "
            f"({', '.join(reference_names[:5])}, ...); pass the dataset the model was trained on"
        )
    if class_names is not None and list(class_names) != list(reference_names):
        if sorted(class_names) == sorted(reference_names):
            return torch.tensor([list(class_names).index(n) for n in reference_names])[labels]
        print(
            f"capman-eval: warning: pipeline classes {list(class_names)[:5]} and dataset classes "
            f"{reference_names[:5]} differ; matching them by class id",
            file=sys.stderr,
        )
    return labels


def evaluate_pipeline(
    pipeline: str | os.PathLike,
    dataset: str | None = None,
    *,
    num_images_per_class: int = 500,
    metrics: Sequence[str] | str = METRIC_NAMES,
    scheduler: str = "ddim",
    steps: int = 50,
    guidance_scale: float = 1.5,
    expert: str = "on",
    feature_extractor: str | None = None,
    feature_extractor_weights_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    seed: int = 0,
    per_class_fid: bool = False,
    resolution: int | None = None,
    reference_images_per_class: int | None = None,
    dataset_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    prompt_template: str | None = None,
    output_dir: str | os.PathLike | None = None,
    label: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate a balanced set from one pipeline folder and return its metrics (the ``metrics.json`` dict).

    Args:
        pipeline: a training run's ``output_dir`` (must hold ``model_index.json``).
        dataset: a :data:`capman_peft.data.DATASETS` name; default: the one in ``training_summary.json``.
        expert: ``"on"`` (θ, the merged model) or ``"off"`` (θ^g, from ``output_dir/adapter``).
        feature_extractor: a torch-fidelity extractor name; default ``inception-v3-compat``, or
            ``digits-classifier`` for ``imb-digits``.
        feature_extractor_weights_path: local weights for the extractor (offline machines).
        resolution: image side for generation (SD) and the reference; default: the pipeline's sample size.
        reference_images_per_class: real images per class; default: as many as the smallest class has.
        dataset_name, train_data_dir: passed to the data module (Hub id / local copy, class-folder tree).
        prompt_template: SD prompt template; default: the training summary's, else the dataset's.
        output_dir: where ``metrics.json`` and ``samples.png`` go; ``None`` writes nothing.
        cache_dir: digits classifier and reference-feature cache; default ``~/.cache/capman_peft``.
        device: default ``cuda`` when available, else ``cpu``.
    """
    metric_list = _check_metrics(metrics)
    _check_settings(num_images_per_class, steps, guidance_scale, batch_size, seed)
    if expert not in ("on", "off"):
        raise ConfigError(f"expert must be 'on' or 'off', got {expert!r}")
    folder = read_pipeline_folder(pipeline)
    args = folder.args
    dataset = dataset or args.get("dataset")
    if dataset is None:
        raise ConfigError(
            f"no dataset given and {str(folder.path / 'training_summary.json')!r} names none; "
            f"pass --dataset (one of {', '.join(_known_datasets())})"
        )
    spec = get_dataset_spec(dataset)
    dataset_name = dataset_name or args.get("dataset_name")
    train_data_dir = train_data_dir or args.get("train_data_dir")
    extractor = resolve_feature_extractor(dataset, feature_extractor)
    cache_dir = Path(cache_dir or default_cache_dir())
    weights = None if feature_extractor_weights_path is None else str(feature_extractor_weights_path)
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"feature_extractor_weights_path {weights!r} is not a file")
    if extractor == DIGITS_CLASSIFIER and weights is None:
        weights = str(digits_classifier_file(cache_dir))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    pipe = load_pipeline(folder, expert=expert, scheduler=scheduler, device=device)
    resolution = resolution or pipeline_resolution(pipe)
    reference = load_reference_dataset(
        dataset,
        resolution,
        reference_images_per_class,
        dataset_name=dataset_name,
        train_data_dir=train_data_dir,
    )
    if folder.kind == "class-conditional":
        class_names, num_classes, prompts = pipe.class_names, pipe.num_classes, None
    else:
        class_names = folder.summary.get("class_names") or reference.class_names
        num_classes = len(class_names)
        template = prompt_template or args.get("prompt_template") or spec.prompt_template
        prompts = class_prompts(class_names, template)
    reference_labels = _align_reference_labels(reference.labels, reference.class_names, class_names, num_classes)
    class_names = list(class_names or reference.class_names)
    ref_per_class = len(reference) // num_classes

    images, labels = generate_balanced(
        pipe,
        num_images_per_class,
        num_classes,
        prompts=prompts,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
        resolution=resolution,
        progress=progress,
    )
    del pipe
    source = {"dataset_name": dataset_name, "train_data_dir": train_data_dir, "class_names": class_names}
    prefix = _reference_cache_prefix(dataset, source, resolution, ref_per_class, extractor, weights)
    measured = measure_fidelity(
        images,
        labels,
        reference,
        reference_labels,
        num_classes,
        metrics=metric_list,
        feature_extractor=extractor,
        feature_extractor_weights_path=weights,
        per_class_fid=per_class_fid,
        cache_prefix=prefix if cache else None,
        cache_root=cache_dir / "fidelity",
        batch_size=batch_size,
        device=device,
    )
    import torch_fidelity

    result: dict[str, Any] = {
        "pipeline": str(folder.path),
        "label": label or folder.path.resolve().name,
        "kind": folder.kind,
        "expert": expert,
        "dataset": dataset,
        "dataset_name": dataset_name,
        "train_data_dir": None if train_data_dir is None else str(train_data_dir),
        "class_names": class_names,
        "num_classes": num_classes,
        "splits_classes": {k: v for k, v in class_splits(num_classes).items() if v},
        "num_images_per_class": num_images_per_class,
        "reference_images_per_class": ref_per_class,
        "resolution": resolution,
        "scheduler": scheduler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "feature_extractor": extractor,
        "feature_extractor_weights_path": weights,
        "metrics": metric_list,
        "torch_fidelity_version": torch_fidelity.__version__,
        **measured,
    }
    if spec is get_dataset_spec("imb-digits") and class_names == [str(d) for d in range(10)]:
        classifier = load_digits_classifier(
            weights if extractor == DIGITS_CLASSIFIER else digits_classifier_file(cache_dir)
        )
        result["classifier_accuracy"] = classifier_accuracy(classifier, images, labels, num_classes)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(result, output_dir / "metrics.json")
        save_sample_grid(images, labels, num_classes, output_dir / "samples.png")
    return result


def _known_datasets() -> list[str]:
    from .data import DATASETS

    return list(DATASETS)


# ----------------------------------------------------------------------------------------------------------
# Outputs: metrics.json, sample grid, per-split FID chart, model card section
# ----------------------------------------------------------------------------------------------------------


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
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, path: str | Path, per_row: int = 8
) -> Path:
    """PNG with one row per class (its first ``per_row`` images; white where a class has fewer)."""
    from PIL import Image

    blank = Image.new("RGB", (images.shape[-1], images.shape[-2]), "white")
    cells = []
    for c in range(num_classes):
        row = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images[labels == c][:per_row]]
        cells += row + [blank] * (per_row - len(row))
    image_grid(cells, rows=num_classes, cols=per_row).save(path)
    return Path(path)


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
    lines = [
        f"`capman-eval` on `{first['dataset']}`: {first['num_images_per_class']} generated images per class vs "
        f"{first['reference_images_per_class']} real images per class at {first['resolution']} px, "
        f"{first['scheduler']} sampler, {first['steps']} steps, guidance scale {first['guidance_scale']}, "
        f"seed {first['seed']}; features from `{first['feature_extractor']}`"
        + (" (not comparable to Inception FIDs)." if first["feature_extractor"] != INCEPTION else "."),
        "",
        "| model | FID | KID | IS | precision | recall | Many FID | Medium FID | Few FID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        o, s = r["overall"], r.get("splits", {})
        name = "θ (expert on, merged)" if r["expert"] == "on" else "θ^g (expert off)"
        cells = [o.get("fid"), o.get("kid_mean"), o.get("isc_mean"), o.get("precision"), o.get("recall")]
        cells += [s.get(k, {}).get("fid") for k in ("many", "medium", "few")]
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in cells) + " |")
    accuracy = [r for r in results if "classifier_accuracy" in r]
    if accuracy:
        lines += ["", "Digits-classifier accuracy of the generated images (does class c look like class c):", ""]
        for r in accuracy:
            a = r["classifier_accuracy"]
            splits = ", ".join(f"{k} {_fmt(v)}" for k, v in a["splits"].items())
            lines.append(f"* expert {r['expert']}: overall {_fmt(a['overall'])} ({splits})")
    return "\n".join(lines)


def evaluate_pipelines(
    pipelines: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    expert: str = "on",
    update_model_cards: bool = True,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """What ``capman-eval`` does: evaluate each pipeline (and expert setting), then write files and charts.

    One model: ``output_dir/{metrics.json,samples.png,fid_splits.png}``. Several (more than one ``pipelines`` or
    ``expert="both"``): ``output_dir/<label>/{metrics.json,samples.png}`` per model, plus ``output_dir/summary.json``
    (the list of all results) and ``output_dir/fid_splits.png``. Default ``output_dir``: ``<pipeline>/eval`` for a
    single pipeline folder, else ``./capman_eval``. With ``update_model_cards``, each pipeline's README.md gets its
    results in the section between the ``capman-metrics`` markers (replaced, or appended when the card has none).
    ``kwargs`` go to :func:`evaluate_pipeline`.
    """
    from .hub import update_model_card_metrics

    if expert not in EXPERT_SETTINGS:
        raise ConfigError(f"expert must be one of {', '.join(EXPERT_SETTINGS)}, got {expert!r}")
    if not pipelines:
        raise ConfigError("no pipeline given")
    folders = [read_pipeline_folder(p) for p in pipelines]  # fail fast on a bad folder before any sampling
    experts = ["on", "off"] if expert == "both" else [expert]
    jobs = [(f, e) for f in folders for e in experts]
    if output_dir is None:
        output_dir = folders[0].path / "eval" if len(folders) == 1 else Path("capman_eval")
    output_dir = Path(output_dir)
    labels = _unique_labels([f.path.resolve().name for f, _ in jobs], [e for _, e in jobs])
    results = []
    for (folder, setting), label in zip(jobs, labels, strict=True):
        target = output_dir if len(jobs) == 1 else output_dir / label
        result = evaluate_pipeline(folder.path, expert=setting, output_dir=target, label=label, **kwargs)
        results.append(result)
        _print_summary(result)
    output_dir.mkdir(parents=True, exist_ok=True)
    if len(jobs) > 1:
        write_json(results, output_dir / "summary.json")
    plot_split_fid(results, output_dir / "fid_splits.png")
    if update_model_cards:
        for folder in folders:
            own = [r for r in results if r["pipeline"] == str(folder.path)]
            update_model_card_metrics(folder.path, metrics_markdown(own))
    return results


def _unique_labels(names: list[str], experts: list[str]) -> list[str]:
    labels = [n + ("-general" if e == "off" else "") for n, e in zip(names, experts, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label}-{seen[label]}")
    return out


def _print_summary(result: dict[str, Any]) -> None:
    o = result["overall"]
    parts = [f"{k}={_fmt(o[k])}" for k in ("fid", "kid_mean", "isc_mean", "precision", "recall") if k in o]
    parts += [f"{k}_fid={_fmt(v.get('fid'))}" for k, v in result.get("splits", {}).items()]
    if "classifier_accuracy" in result:
        parts.append(f"classifier_accuracy={_fmt(result['classifier_accuracy']['overall'])}")
    print(f"[{display_label(result)}] ({result['feature_extractor']} features) " + " ".join(parts))


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from .flags import ArgumentParser

    parser = ArgumentParser(
        prog="capman-eval",
        description="Generate a class-balanced sample set from trained pipelines and compute FID/KID/IS/precision/"
        "recall overall and per Many/Medium/Few split (torch-fidelity).",
    )
    parser.add_argument(
        "--pipeline",
        action="append",
        required=True,
        help="A training run's output_dir (a diffusers pipeline folder). Repeat to compare models in one chart.",
    )
    parser.add_argument(
        "--dataset", default=None, help="Named dataset (imb-cifar10, ...); default: the one in training_summary.json."
    )
    parser.add_argument("--dataset_name", default=None, help="Hub id or local copy overriding the dataset's source.")
    parser.add_argument("--train_data_dir", default=None, help="Local folder with one sub-folder of images per class.")
    parser.add_argument(
        "--resolution", type=int, default=None, help="Image side for the reference (and SD sampling); default: model's."
    )
    parser.add_argument("--num_images_per_class", type=int, default=500, help="Generated images per class.")
    parser.add_argument(
        "--reference_images_per_class",
        type=int,
        default=None,
        help="Real reference images per class; default: all the balanced reference split has.",
    )
    parser.add_argument(
        "--scheduler", default="ddim", help="Sampler: ddim, dpm (DPM-Solver++ multistep) or pipeline (keep saved one)."
    )
    parser.add_argument("--steps", type=int, default=50, help="Number of sampling steps.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.5,
        help="Classifier-free guidance w in eps_u + w (eps_c - eps_u); 1 disables guidance.",
    )
    parser.add_argument(
        "--expert",
        default="on",
        help="on: the merged model θ; off: θ^g alone, built from output_dir/adapter (paper Tab. 7); both: each.",
    )
    parser.add_argument(
        "--metrics",
        default="fid,kid,isc,prc",
        help="Comma-separated subset of fid,kid,isc,prc (prc: precision, recall).",
    )
    parser.add_argument(
        "--feature_extractor",
        default=None,
        help="torch-fidelity feature extractor; default inception-v3-compat, or digits-classifier for imb-digits.",
    )
    parser.add_argument(
        "--feature_extractor_weights_path",
        default=None,
        help="Local weights file for the feature extractor (offline machines: no download).",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Batch size for sampling and feature extraction.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated set (per image).")
    parser.add_argument("--per_class_fid", action="store_true", help="Also compute the FID of every class.")
    parser.add_argument("--prompt_template", default=None, help="SD prompt template, e.g. 'a {} painting'.")
    parser.add_argument(
        "--output_dir", default=None, help="Where results go; default <pipeline>/eval (one pipeline) or ./capman_eval."
    )
    parser.add_argument(
        "--cache_dir", default=None, help="Digits-classifier and reference-feature cache (~/.cache/capman_peft)."
    )
    parser.add_argument("--no_cache", action="store_true", help="Do not cache reference features.")
    parser.add_argument(
        "--no_model_card", action="store_true", help="Do not write the metrics section into <pipeline>/README.md."
    )
    parser.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``capman-eval`` (errors: one line on stderr, exit status 1)."""
    run_cli(_evaluate_from_command_line, argv)


def _evaluate_from_command_line(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    kwargs = dict(
        dataset=args.dataset,
        num_images_per_class=args.num_images_per_class,
        metrics=_check_metrics(args.metrics),
        scheduler=args.scheduler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        feature_extractor=args.feature_extractor,
        feature_extractor_weights_path=args.feature_extractor_weights_path,
        batch_size=args.batch_size,
        seed=args.seed,
        per_class_fid=args.per_class_fid,
        resolution=args.resolution,
        reference_images_per_class=args.reference_images_per_class,
        dataset_name=args.dataset_name,
        train_data_dir=args.train_data_dir,
        prompt_template=args.prompt_template,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        device=args.device,
    )
    _check_cli(args)
    extractor = resolve_feature_extractor(_cli_dataset(args), args.feature_extractor)
    print(
        f"capman-eval: feature extractor {extractor}"
        + ("" if extractor == INCEPTION else " (its FIDs are NOT comparable to Inception FIDs)"),
        file=sys.stderr,
    )
    evaluate_pipelines(
        args.pipeline,
        output_dir=args.output_dir,
        expert=args.expert,
        update_model_cards=not args.no_model_card,
        **kwargs,
    )


def _check_cli(args: argparse.Namespace) -> None:
    """Every cheap check before any model is loaded, so a typo fails in a second rather than after sampling."""
    _check_settings(args.num_images_per_class, args.steps, args.guidance_scale, args.batch_size, args.seed)
    if args.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {args.scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    if args.expert not in EXPERT_SETTINGS:
        raise ConfigError(f"--expert must be one of {', '.join(EXPERT_SETTINGS)}, got {args.expert!r}")
    for path in args.pipeline:
        folder = read_pipeline_folder(path)
        if args.expert in ("off", "both"):
            require_adapter(folder)
    get_dataset_spec(_cli_dataset(args))


def _cli_dataset(args: argparse.Namespace) -> str:
    if args.dataset is not None:
        return args.dataset
    dataset = read_pipeline_folder(args.pipeline[0]).args.get("dataset")
    if dataset is None:
        raise ConfigError(
            f"no --dataset given and {args.pipeline[0]!r} has no training_summary.json naming one; "
            f"known datasets: {', '.join(_known_datasets())}"
        )
    return dataset


if __name__ == "__main__":
    main()
