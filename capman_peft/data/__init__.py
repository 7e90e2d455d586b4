"""Class-imbalanced image data, one role per module:

* ``longtail.py``: long-tail subsampling (Cao et al. 2019 / CBDM), Many/Medium/Few splits, the balanced sampler;
* ``images.py``: class names, prompts and their text embeddings, RGB conversion, transforms, the labelled training
  dataset;
* ``registry.py``: the named datasets (where each lives, class order, resolution, reference split, prompts);
* ``readers.py``: reading a source in its format (Hub, image folder, class folders, list files, digits);
* ``selection.py``: the long-tailed training set, the balanced reference set and the held-out images.
"""

from .images import (
    IMAGE_EXTENSIONS,
    ImageTransform,
    LabelledImageDataset,
    chosen_captions,
    class_prompts,
    encode_prompts,
    readable_class_name,
    to_rgb,
)
from .longtail import (
    GRID_CLASSES,
    LISTED_CLASSES,
    LISTED_ENDS,
    SPLITS,
    class_balanced_sampler,
    class_splits,
    grid_classes,
    listed_classes,
    long_tail_counts,
    long_tail_indices,
    split_of_class,
)
from .registry import DATASETS, DatasetSpec, get_dataset_spec
from .selection import (
    load_heldout_dataset,
    load_imbalanced_dataset,
    load_reference_dataset,
)

__all__ = [
    "DATASETS",
    "GRID_CLASSES",
    "LISTED_CLASSES",
    "LISTED_ENDS",
    "IMAGE_EXTENSIONS",
    "DatasetSpec",
    "LabelledImageDataset",
    "class_balanced_sampler",
    "chosen_captions",
    "class_prompts",
    "encode_prompts",
    "class_splits",
    "split_of_class",
    "SPLITS",
    "get_dataset_spec",
    "grid_classes",
    "listed_classes",
    "ImageTransform",
    "load_heldout_dataset",
    "load_imbalanced_dataset",
    "load_reference_dataset",
    "long_tail_counts",
    "long_tail_indices",
    "readable_class_name",
    "to_rgb",
]
