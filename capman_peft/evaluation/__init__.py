"""Sample generation and torch-fidelity metrics for trained pipelines: overall, per Many/Medium/Few split, per class.

``capman-eval --pipeline out/ --dataset imb-cifar100`` generates the same number of images for every class from a
training run's output folder (a class-conditional UNet2DModel pipeline or a merged Stable Diffusion pipeline) and
compares them with the dataset's balanced real reference split (paper sec. 4.1):

* overall: all generated images vs the whole reference: FID, KID, IS, precision/recall;
* per split (Many / Medium / Few = thirds of the classes by training-set size): that split's generated vs that
  split's real images, FID and KID (KID subset size ``min(#generated, #real, 1000)``);
* optionally per class: FID of each class's generated vs real images.

``--expert off`` evaluates θ^g alone (paper Tab. 7 "CM (θ^g)"): the unmerged adapter in ``out/adapter`` is loaded and
merged without its expert (:func:`capman_peft.tuner.merge_general_and_unload`). A from-scratch (full-mode) run carries
every trained weight in the adapter, so only ``out/unet/config.json`` is needed besides it; a LoRA run on Stable
Diffusion needs the pretrained base UNet named by ``base_model_name_or_path`` in ``out/adapter/adapter_config.json``
(a local folder or a Hub id already in the local cache when offline).

Feature extractors. The default is torch-fidelity's ``inception-v3-compat`` for every metric, precision/recall
included (torch-fidelity's own default for it is VGG-16). Its weights download on first use, are read once with
torch's restricted loader and kept as safetensors (:func:`.fidelity.safe_weights_file`); offline, pass
``--feature_extractor_weights_path``. For ``--dataset imb-digits`` the default is ``digits-classifier``: a small CNN
trained deterministically on scikit-learn's digits (seconds on a CPU, cached as safetensors), whose penultimate layer
feeds FID/KID/precision/recall and whose logits feed IS; its predictions also give the per-class accuracy of the
generated digits. FIDs from different extractors are not comparable.

Reference features are extracted once per dataset (and source), resolution, image count per class and extractor
(with its weights) and cached as ONE safetensors file, ``<cache_dir>/fidelity/capman-<dataset>-<hash>-<res>px-
<n>perclass-<extractor>.safetensors``; the splits and classes are measured by indexing those features (and the
generated set's), never by extracting again. A cache file that cannot be read is named in a warning and recomputed.

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
      "caveats": ["FID split few rests on 16 generated and 40 real images (< 100): ..."],  # small sets
      "classifier_accuracy": {"classifier": "digits-classifier", "overall": 0.93,
                              "per_class": [one per class id], "splits": {"many": ..., "medium": ..., "few": ...}}
                                                                               # only for imb-digits
    }

Only the requested metrics appear; a split with no classes (fewer than 3 classes in all) is left out; KID is ``null``
where a subset of 2 images cannot be drawn and precision/recall where a set has fewer than 4 images.

Modules: :mod:`.evaluate` (:func:`evaluate_pipeline`, :class:`EvalSettings`), :mod:`.batch`
(:func:`evaluate_pipelines`), :mod:`.sampling` (balanced seeded generation), :mod:`.fidelity` (torch-fidelity inputs,
Inception weights, the feature cache, metrics), :mod:`.digits` (the digits classifier and its extractor),
:mod:`.report` (files, chart, model card, summary line), :mod:`.cli` (``capman-eval``); the run folder is read by
:mod:`capman_peft.run_folder`.
"""

from ..families import pipeline_resolution
from ..run_folder import (
    PipelineFolder,
    load_capman_unet,
    load_pipeline,
    read_pipeline_folder,
    require_adapter,
)
from .batch import evaluate_pipelines
from .digits import (
    DIGITS_CLASSIFIER,
    DigitsClassifier,
    classifier_accuracy,
    digits_classifier_file,
    digits_training_images,
    load_digits_classifier,
    train_digits_classifier,
)
from .evaluate import EvalSettings, evaluate_pipeline
from .fidelity import INCEPTION, METRIC_NAMES, default_cache_dir, measure_fidelity, to_uint8, uint8_images
from .report import write_json
from .sampling import generate_balanced

__all__ = [
    "DIGITS_CLASSIFIER",
    "INCEPTION",
    "METRIC_NAMES",
    "DigitsClassifier",
    "EvalSettings",
    "PipelineFolder",
    "classifier_accuracy",
    "default_cache_dir",
    "digits_classifier_file",
    "digits_training_images",
    "evaluate_pipeline",
    "evaluate_pipelines",
    "generate_balanced",
    "load_capman_unet",
    "load_digits_classifier",
    "load_pipeline",
    "measure_fidelity",
    "pipeline_resolution",
    "read_pipeline_folder",
    "require_adapter",
    "to_uint8",
    "uint8_images",
    "train_digits_classifier",
    "write_json",
]
