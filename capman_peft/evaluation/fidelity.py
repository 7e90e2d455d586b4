"""torch-fidelity metrics: images as its inputs, the Inception weights as safetensors, the reference feature cache.

Features are extracted once per set; splits and classes are compared by indexing the feature rows, so they cost no
extra extraction, and the reference set's features are cached as one safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import class_splits
from ..errors import ConfigError

METRIC_NAMES = ("fid", "kid", "isc", "prc")
INCEPTION = "inception-v3-compat"
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


def _check_metrics(metrics: Sequence[str] | str) -> list[str]:
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ConfigError(f"unknown metric {', '.join(unknown) or '(none given)'}; allowed: {', '.join(METRIC_NAMES)}")
    return list(dict.fromkeys(names))


def _finite_or_none(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------------
# Images as torch-fidelity inputs
# ----------------------------------------------------------------------------------------------------------


def to_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (the data module's ``pixel_values``) -> uint8, the rounding diffusers uses for its outputs."""
    return ((pixel_values.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


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
# Feature extraction: Inception from safetensors only, the reference features cached once
# ----------------------------------------------------------------------------------------------------------


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
        from ..hub import hub_reachable

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


def _reference_cache_prefix(
    dataset: str, source: dict[str, Any], resolution: int, count: int, extractor: str, weights: str | None
) -> str:
    """``capman-<dataset>-<hash of source and weights>-<res>px-<n>perclass``; measure_fidelity appends the extractor."""
    if weights is not None and Path(weights).is_file():
        weights = f"{Path(weights).resolve()}:{Path(weights).stat().st_size}"
    key = json.dumps({**source, "extractor": extractor, "weights": weights}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"capman-{dataset}-{digest}-{resolution}px-{count}perclass"


def cached_reference_features(
    images: UInt8Images, layers: Sequence[str], extract: Any, cache_file: Path | None
) -> dict[str, torch.Tensor]:
    """The reference set's features, read from / written to `cache_file` (safetensors; None: no cache).

    A cache file that cannot be read (truncated, corrupt) is named in a warning, recomputed and replaced; one that
    lacks some of `layers` (another metric set) is recomputed and extended, keeping its other layers. The file is
    written under a temporary name first.
    """
    from safetensors.torch import load_file, save_file

    cached: dict[str, torch.Tensor] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = {k: v for k, v in load_file(str(cache_file)).items() if len(v) == len(images)}
        except Exception as err:  # safetensors reports truncation and corruption with its own error types
            reason = " ".join(str(err).split()) or type(err).__name__
            print(f"capman-eval: warning: {cache_file}: cannot be used ({reason}); recomputing it", file=sys.stderr)
        if set(layers) <= set(cached):
            return cached
    features = {**cached, **extract(images)}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".incomplete")
        save_file({k: v.contiguous() for k, v in features.items()}, str(tmp))
        tmp.replace(cache_file)
    return features


# ----------------------------------------------------------------------------------------------------------
# Metrics: overall, per split, per class
# ----------------------------------------------------------------------------------------------------------


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
