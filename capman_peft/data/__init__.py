"""Class-imbalanced image data, one role per module:

* ``longtail.py``: long-tail subsampling (Cao et al. 2019 / CBDM), Many/Medium/Few splits, the balanced sampler;
* ``images.py``: class names, prompts and their text embeddings, RGB conversion, transforms, the labelled training
  dataset;
* ``sources.py``: the named datasets and their sources, the long-tailed training set and the balanced reference set.
"""

from .images import (
    IMAGE_EXTENSIONS,
    LabelledImageDataset,
    class_prompts,
    encode_prompts,
    image_transform,
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
from .sources import (
    DATASETS,
    DatasetSpec,
    get_dataset_spec,
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
    "class_prompts",
    "encode_prompts",
    "class_splits",
    "split_of_class",
    "SPLITS",
    "get_dataset_spec",
    "grid_classes",
    "listed_classes",
    "image_transform",
    "load_heldout_dataset",
    "load_imbalanced_dataset",
    "load_reference_dataset",
    "long_tail_counts",
    "long_tail_indices",
    "readable_class_name",
    "to_rgb",
]
