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
import warnings
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


def uint8_images(dataset: Any, indices: Sequence[int] | None = None) -> torch.Tensor:
    """The items of a data-module dataset (``pixel_values`` in [-1, 1]), or those at `indices`, stacked as uint8."""
    return torch.stack(list(UInt8Images(dataset, indices)))


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


# Weights are read without unpickling anything: Inception (torch-fidelity's release) and VGG-16 (torchvision's) are
# converted once to safetensors; every other extractor (our digits classifier, one a user registers) gets a
# .safetensors file or none. torch-fidelity's CLIP and DINOv2 extractors are refused: they load TorchScript archives
# or run code from torch.hub.
VGG16 = "vgg16"
DIGITS_CLASSIFIER = "digits-classifier"
# Where the converted extractors' default weights come from.
WEIGHT_URLS = {
    INCEPTION: "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    VGG16: "https://download.pytorch.org/models/vgg16-397923af.pth",
}


def check_safe_extractor(name: str) -> None:
    """Refuse an extractor whose weights could only be read by running code."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if FEATURE_EXTRACTORS_REGISTRY.get(name).__name__ in ("FeatureExtractorCLIP", "FeatureExtractorDinoV2"):
        raise ConfigError(
            f"--feature_extractor {name}: its weights load as a TorchScript archive or through torch.hub code, which "
            f"this project never runs; allowed: {INCEPTION}, {VGG16}, {DIGITS_CLASSIFIER}, or one you register"
        )


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:
        raise ConfigError(
            f"--feature_extractor_weights_path {path}: cannot be read as safetensors ({type(err).__name__}); "
            "allowed: a .safetensors file"
        ) from None


def safe_weights_file(extractor: str, weights_path: str | os.PathLike | None, cache_dir: Path) -> Path | None:
    """The extractor's weights as a safetensors file, the only form this project loads weights from.

    A ``.safetensors`` file is checked and used as is. Inception and VGG-16 also take the ``.pth`` their libraries
    ship (torch-fidelity and torchvision would read it with unrestricted unpickling): it is read once with
    ``torch.load(weights_only=True)``, torch's restricted loader that cannot run code, must hold only tensors, and
    is written to ``cache_dir`` as safetensors; later runs read the copy. With no path, their release file is
    downloaded and converted the same way; other extractors get None (their own default). Every failure is a
    ConfigError naming the file.
    """
    from safetensors.torch import save_file

    check_safe_extractor(extractor)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise ConfigError(f"--feature_extractor_weights_path {weights_path}: no such file")
        if path.suffix == ".safetensors":
            _check_safetensors(path)
            return path
        if extractor not in WEIGHT_URLS:
            raise ConfigError(
                f"--feature_extractor_weights_path {weights_path}: {extractor} weights are read from safetensors "
                "only; allowed: a .safetensors file"
            )
        source = path
    elif extractor in WEIGHT_URLS:
        source = cache_dir / Path(WEIGHT_URLS[extractor]).name
    else:
        return None
    tag = (
        hashlib.sha1(f"{source.resolve()}:{source.stat().st_size}".encode()).hexdigest()[:10] if source.exists() else ""
    )
    target = cache_dir / f"{extractor}-{tag or 'release'}.safetensors"
    if target.is_file():
        return target
    if not source.exists():
        from ..hub import hub_reachable

        try:
            source.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHT_URLS[extractor], str(source), progress=False)
        except Exception as err:
            raise ConfigError(
                f"--feature_extractor {extractor}: cannot download its weights from {WEIGHT_URLS[extractor]} ({err}; "
                f"{'offline?' if not hub_reachable() else 'network error'}); allowed: "
                "--feature_extractor_weights_path with a local copy (.pth or .safetensors)"
            ) from None
        return safe_weights_file(extractor, None, cache_dir)
    try:
        with warnings.catch_warnings():  # torch's note on a file's pickle protocol would come before our one line
            warnings.simplefilter("ignore")
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"--feature_extractor_weights_path {source}: torch's restricted loader refused it ({type(err).__name__}); "
            "this project never unpickles code; allowed: a .safetensors file or a PyTorch state dict of tensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--feature_extractor_weights_path {source}: not a state dict of tensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, target)
    return target


def build_feature_extractor(name: str, layers: Sequence[str], weights_path: str | None, cache_dir: Path, device: str):
    """A torch-fidelity feature extractor on `device`, its weights read from safetensors only.

    Inception and VGG-16 load their weights themselves, by unrestricted ``torch.load`` or a download helper; the
    helper is answered with the safetensors tensors, so that loader never runs. A weights file that does not fit the
    network is a ConfigError naming it.
    """
    from safetensors.torch import load_file
    from torch_fidelity import feature_extractor_inceptionv3 as inception
    from torch_fidelity import feature_extractor_vgg16 as vgg16
    from torch_fidelity.utils import create_feature_extractor

    weights = safe_weights_file(name, weights_path, cache_dir)
    state = load_file(str(weights)) if name in WEIGHT_URLS else None
    if name == INCEPTION:
        module, helper, answer = inception, "load_state_dict_from_url", lambda *args, **kwargs: state
    elif name == VGG16:
        import torchvision

        def answer(*args: Any, **kwargs: Any) -> torch.nn.Module:
            model = torchvision.models.vgg16()
            model.load_state_dict(state)
            return model

        module, helper = vgg16, "torchvision_load_pretrained_vgg16"
    else:
        module = helper = answer = None
    original = getattr(module, helper) if module is not None else None
    try:
        if module is not None:
            setattr(module, helper, answer)
        extractor = create_feature_extractor(
            name,
            list(layers),
            cuda=False,
            verbose=False,
            **({} if module is not None else {"feature_extractor_weights_path": str(weights)}),
        )
    except (RuntimeError, KeyError) as err:  # load_state_dict: missing / unexpected keys or shapes
        raise ConfigError(
            f"--feature_extractor_weights_path {weights_path or weights}: not {name} weights ({str(err)[:200]})"
        ) from None
    finally:
        if module is not None:
            setattr(module, helper, original)
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
    splits: dict[str, list[int]] | None = None,
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
        splits: Many / Medium / Few class ids (``class_splits`` of the training counts); default: class 0 the
            largest, the ids the ranking.
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
        for name, classes in (splits or class_splits(num_classes)).items():
            if classes:
                result["splits"][name] = fidelity_metrics(*restricted(classes, {"fid", "kid"}))
    if per_class_fid:
        result["per_class"] = {"fid": [fidelity_metrics(*restricted([c], {"fid"}))["fid"] for c in range(num_classes)]}
    return result
