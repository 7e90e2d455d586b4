"""The named datasets: where each lives, its class order and names, resolution, reference split, prompt template and
Many/Medium/Few thresholds."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

_ARTBENCH_STYLES = """art_nouveau baroque expressionism impressionism post_impressionism realism renaissance
romanticism surrealism ukiyo_e""".split()
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Order and spelling of the uoft-cs/cifar100 ClassLabel, including its "cra" typo for "crab" (fixed by
# DatasetSpec.renames so prompts and reports say "crab").
_CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach
couch cra crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives and how to read it."""

    hub_id: str | None
    image_column: str = "image"
    label_column: str = "label"
    class_names: tuple[str, ...] = ()
    """Canonical class order (index 0 = largest after subsampling); also the fallback when the label
    column carries no names. Sources whose names match as a set are remapped to this order by name."""
    order_by_name: bool = False
    """Refuse a source whose class names differ from ``class_names`` (the remap is the point)."""
    resolution: int = 32
    reference_split: str | None = "test"
    """Balanced split to measure FID against; ``None``: a balanced subset of the training data."""
    prompt_template: str = "a {}"
    renames: tuple[tuple[str, str], ...] = ()
    split_thresholds: tuple[int, int] | None = None
    """(many_above, few_below) image counts of the Many/Medium/Few splits; None: thirds of the classes by size."""
    list_files: tuple[tuple[str, str], ...] = ()
    """(split, file): a dataset read from a local copy (``--train_data_dir``) and its official list files, which are
    already long-tailed; classes are ordered by their training count (ties by the list's id), class 0 largest."""
    text_layout: str | None = None
    """A text-to-image set read from a local copy in its released layout with per-image descriptions
    (``text_sets.py``): ``"cub-200-2011"`` or ``"oxford-102"``."""

    @property
    def local_copy(self) -> bool:
        """Read from ``--train_data_dir`` in the set's own layout, with its own splits."""
        return bool(self.list_files or self.text_layout)


DATASETS: dict[str, DatasetSpec] = {
    # The zguo0525/ArtBench mirror numbers its styles in a shuffled order (0 = expressionism,
    # 8 = baroque); the paper's class order is the alphabetical one of the official release.
    "imb-artbench10": DatasetSpec(
        "zguo0525/ArtBench",
        "image",
        "label",
        tuple(_ARTBENCH_STYLES),
        order_by_name=True,
        resolution=256,
        prompt_template="a {} painting",
    ),
    "imb-cifar10": DatasetSpec(
        "uoft-cs/cifar10", "img", "label", tuple(_CIFAR10_CLASSES), prompt_template="a photo of a {}"
    ),
    "imb-cifar100": DatasetSpec(
        "uoft-cs/cifar100",
        "img",
        "fine_label",
        tuple(_CIFAR100_CLASSES),
        prompt_template="a photo of a {}",
        renames=(("cra", "crab"),),
    ),
    # 28k train / 2k validation, no test split; female (0) is the majority class as in the paper.
    "imb-celebahq": DatasetSpec(
        "mattymchen/celeba-hq",
        "image",
        "label",
        ("female", "male"),
        resolution=64,
        reference_split="validation",
        prompt_template="a photo of a {} face",
    ),
    # Liu et al. 2019 (OLTR): the ImageNet-LT lists over a local ImageNet copy, "train/n01440764/x.JPEG 0" per line;
    # 1,000 classes, 1,280 ... 5 training images (IR 256), 20 per class in the validation list; splits > 100 / 20-100 /
    # < 20 images as Liu et al. define them. Class names are the WordNet ids of the image folders.
    "imb-imagenet-lt": DatasetSpec(
        None,
        resolution=32,
        reference_split="val",
        prompt_template="a photo of a {}",
        split_thresholds=(100, 20),
        list_files=(("train", "ImageNet_LT_train.txt"), ("val", "ImageNet_LT_val.txt")),
    ),
    # iNaturalist 2018 (Van Horn et al. 2018): the official COCO-style train2018.json / val2018.json over the
    # extracted images; 8,142 classes, 1,000 ... 2 training images (IR 500), 3 per class in validation; the same
    # > 100 / 20-100 / < 20 splits as ImageNet-LT in the long-tail literature (Kang et al. 2020).
    "imb-inaturalist": DatasetSpec(
        None,
        resolution=32,
        reference_split="val",
        prompt_template="a photo of {}",
        split_thresholds=(100, 20),
        list_files=(("train", "train2018.json"), ("val", "val2018.json")),
    ),
    # The fine-grained text-to-image sets of the paper's Tab. G.11, with Reed et al.'s ten descriptions per image;
    # every class has 30-60 (CUB, 200 birds) or 40-258 (Oxford-102 flowers) images before the long-tail subsampling.
    "imb-cub200": DatasetSpec(
        None, resolution=256, prompt_template="a photo of a {}, a type of bird", text_layout="cub-200-2011"
    ),
    "imb-oxford102": DatasetSpec(
        None,
        resolution=256,
        reference_split="val",
        prompt_template="a photo of a {}, a type of flower",
        text_layout="oxford-102",
    ),
    # scikit-learn's bundled 8x8 digits: the offline CPU demo.
    "imb-digits": DatasetSpec(
        None,
        class_names=tuple(str(d) for d in range(10)),
        resolution=16,
        reference_split=None,
        prompt_template="a handwritten digit {}",
    ),
}

_GENERIC = DatasetSpec(None, resolution=256, reference_split=None, prompt_template="a {} painting")


def get_dataset_spec(name: str | None) -> DatasetSpec:
    """Registry entry for ``name`` (``"imb-cifar10"``; the ``imb-`` prefix may be left out); None: the generic
    entry of data named only by a folder or Hub id."""
    if name is None:
        return _GENERIC
    key = name.lower()
    key = key if key in DATASETS else f"imb-{key}"
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[key]
