"""Data module: long-tail counts and selection, named datasets from local files, folders, errors, sampler.

Every Hub dataset is rebuilt here in its mirror's format (column names, ClassLabel names in the mirror's
order) as tiny local parquet files; nothing touches the network. Images are solid colours that encode
their source class and row (R = source label, G + 256·B = row), so after loading we can tell exactly
which source image each item is.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capman_peft.data import (
    DATASETS,
    class_balanced_sampler,
    class_prompts,
    class_splits,
    get_dataset_spec,
    load_imbalanced_dataset,
    load_reference_dataset,
    long_tail_counts,
    long_tail_indices,
)
from capman_peft.errors import ConfigError
from capman_peft.testing import ARTBENCH_MIRROR_NAMES

# The mirror's label names in its own order (zguo0525/ArtBench is not alphabetical): ARTBENCH_MIRROR_NAMES.
ARTBENCH_CANONICAL = sorted(ARTBENCH_MIRROR_NAMES)  # the paper's order is alphabetical
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = list(DATASETS["imb-cifar100"].class_names)
CELEBA_NAMES = ["female", "male"]

IMAGE_SIZE = (12, 10)  # width x height: non-square, so the crop is exercised


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the Hub, even by accident."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    datasets.disable_progress_bars()


def legacy_long_tail(labels: np.ndarray, imbalance_ratio: float, seed: int = 0) -> np.ndarray:
    """The CBDM / LDAM IMBALANCECIFAR procedure, written out independently (img_max = class-0 size)."""
    num_classes = int(labels.max()) + 1
    img_max = int((labels == 0).sum())
    imb_factor = 1.0 / imbalance_ratio
    counts = [int(img_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    np.random.seed(seed)
    selected = []
    for the_class, the_img_num in zip(np.unique(labels), counts, strict=True):
        idx = np.where(labels == the_class)[0]
        np.random.shuffle(idx)
        selected.append(idx[:the_img_num])
    return np.concatenate(selected)


def encode(source_label: int, row: int) -> tuple[int, int, int]:
    return (source_label, row % 256, row // 256)


def decode(pixel_values: torch.Tensor) -> tuple[int, int]:
    """(source label, row) back from a solid image in [-1, 1]."""
    r, g, b = (round(((float(pixel_values[k].mean()) + 1) / 2) * 255) for k in range(3))
    return r, g + 256 * b


def write_hub_mirror(root: Path, image_col: str, label_col: str, names: list[str], splits: dict[str, int]):
    """A local copy of a Hub dataset in its mirror's format: data/<split>-00000-of-00001.parquet."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = {image_col: ImageFeature(), label_col: ClassLabel(names=names)}
    if label_col == "fine_label":  # uoft-cs/cifar100 also carries the superclass
        features["coarse_label"] = ClassLabel(names=[f"super_{i}" for i in range(20)])
    (root / "data").mkdir(parents=True)
    source_labels = {}
    for split, per_class in splits.items():
        labels = np.random.default_rng(len(split)).permutation(np.repeat(np.arange(len(names)), per_class))
        images = [Image.new("RGB", IMAGE_SIZE, encode(int(y), row)) for row, y in enumerate(labels)]
        columns = {image_col: images, label_col: labels.tolist()}
        if "coarse_label" in features:
            columns["coarse_label"] = (labels % 20).tolist()
        Dataset.from_dict(columns, features=Features(features)).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
        source_labels[split] = labels
    return source_labels


# name, image column, label column, mirror names, canonical names, split sizes per class, reference split
HUB_CASES = {
    "imb-artbench10": ("image", "label", ARTBENCH_MIRROR_NAMES, ARTBENCH_CANONICAL, {"train": 6, "test": 2}),
    "imb-cifar10": ("img", "label", CIFAR10_NAMES, CIFAR10_NAMES, {"train": 6, "test": 2}),
    "imb-cifar100": ("img", "fine_label", CIFAR100_NAMES, CIFAR100_NAMES, {"train": 5, "test": 1}),
    "imb-celebahq": ("image", "label", CELEBA_NAMES, CELEBA_NAMES, {"train": 6, "validation": 3}),
}
IMBALANCE = {"imb-artbench10": 6, "imb-cifar10": 6, "imb-cifar100": 5, "imb-celebahq": 3}


@pytest.fixture(scope="module")
def hub_mirrors(tmp_path_factory):
    out = {}
    for name, (image_col, label_col, names, _, splits) in HUB_CASES.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, write_hub_mirror(root, image_col, label_col, names, splits))
    return out


# ---------------------------------------------------------------------------------------------------------
# 1. Counts
# ---------------------------------------------------------------------------------------------------------


def test_counts_cifar10_ir100():
    expected = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(5000, 10, 100) == expected
    assert sum(long_tail_counts(5000, 10, 100)) == 12406
    assert long_tail_counts(5000, 10, 100) == [int(5000 * 100 ** (-c / 9)) for c in range(10)]


def test_counts_cifar10_ir50():
    assert long_tail_counts(5000, 10, 50) == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


def test_counts_cifar100_ir100():
    counts = long_tail_counts(500, 100, 100)
    assert sum(counts) == 10847
    assert counts[0] == 500 and counts[-1] == 5
    assert counts == [int(500 * (1 / 100) ** (c / 99)) for c in range(100)]


def test_class_splits_thirds():
    assert class_splits(10) == {"many": [0, 1, 2], "medium": [3, 4, 5], "few": [6, 7, 8, 9]}
    assert class_splits(2) == {"many": [0], "medium": [], "few": [1]}  # CelebA-HQ: the larger class is Many
    splits = class_splits(100)
    assert (splits["many"][-1], splits["medium"][0], splits["medium"][-1], splits["few"][0]) == (
        32,
        33,
        65,
        66,
    )


# ---------------------------------------------------------------------------------------------------------
# 2. Selection = the legacy procedure
# ---------------------------------------------------------------------------------------------------------


def test_selection_equals_legacy_procedure():
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 300))
    for ir, seed in [(100, 0), (50, 0), (10, 3)]:
        expected = legacy_long_tail(labels.copy(), ir, seed)
        got = long_tail_indices(labels, ir, seed=seed)
        np.testing.assert_array_equal(got, expected)  # same indices, same order


def test_selection_leaves_global_numpy_rng_untouched():
    labels = np.repeat(np.arange(5), 40)
    np.random.seed(123)
    expected_next = np.random.random(3)
    np.random.seed(123)
    long_tail_indices(labels, 10, seed=0)
    np.testing.assert_array_equal(np.random.random(3), expected_next)


def test_selection_with_class_order_equals_legacy_on_relabelled_data():
    labels = np.random.default_rng(2).permutation(np.repeat(np.arange(6), 50))
    order = [4, 0, 5, 2, 1, 3]
    relabelled = np.array([order.index(y) for y in labels])  # class order[k] becomes label k
    got = long_tail_indices(labels, 20, seed=0, class_order=order)
    np.testing.assert_array_equal(got, legacy_long_tail(relabelled, 20, 0))


def test_no_imbalance_ratio_keeps_everything_in_order():
    labels = np.array([2, 0, 1, 1, 0])
    np.testing.assert_array_equal(long_tail_indices(labels, None), np.arange(5))


# ---------------------------------------------------------------------------------------------------------
# 3. Named Hub datasets from local files in the mirrors' formats
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HUB_CASES))
def test_hub_dataset_loads_subsamples_and_remaps(name, hub_mirrors, tmp_path):
    root, source_labels = hub_mirrors[name]
    _, _, mirror_names, canonical, splits = HUB_CASES[name]
    ir = IMBALANCE[name]
    ds = load_imbalanced_dataset(
        name, imbalance_ratio=ir, resolution=8, dataset_name=str(root), cache_dir=str(tmp_path / "cache")
    )
    expected_names = ["crab" if n == "cra" else n for n in canonical]  # the cifar100 mirror's typo is fixed
    assert ds.class_names == expected_names and ds.num_classes == len(canonical)

    # Independent expectation: relabel the source by name, then run the legacy procedure.
    canonical_labels = np.array([canonical.index(mirror_names[y]) for y in source_labels["train"]])
    expected_rows = legacy_long_tail(canonical_labels, ir, 0)
    n = splits["train"]
    assert ds.class_counts == [int(n * ir ** (-c / (len(canonical) - 1))) for c in range(len(canonical))]
    assert len(ds) == len(expected_rows)

    rows = []
    for i in range(len(ds)):
        item = ds[i]
        x = item["pixel_values"]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        source_label, row = decode(x)
        assert item["label"] == canonical.index(mirror_names[source_label]) == ds.labels[i]
        assert item["class_name"] == ds.class_names[item["label"]]
        rows.append(row)
    assert rows == expected_rows.tolist()


def test_artbench_baroque_image_gets_label_1(hub_mirrors, tmp_path):
    root, source_labels = hub_mirrors["imb-artbench10"]
    ds = load_imbalanced_dataset(
        "imb-artbench10", imbalance_ratio=None, resolution=8, dataset_name=str(root), cache_dir=str(tmp_path)
    )
    assert ARTBENCH_MIRROR_NAMES.index("baroque") == 8  # the mirror calls baroque 8 ...
    baroque_rows = set(np.where(source_labels["train"] == 8)[0].tolist())
    for i in range(len(ds)):
        item = ds[i]
        if decode(item["pixel_values"])[1] in baroque_rows:
            assert item["label"] == 1 and item["class_name"] == "baroque"  # ... we call it 1
    assert ds.class_counts == [6] * 10
    assert class_prompts(ds.class_names, ds.prompt_template)[4] == "a post impressionism painting"


@pytest.mark.parametrize("name", list(HUB_CASES))
def test_reference_split_is_balanced_and_unsubsampled(name, hub_mirrors, tmp_path):
    root, source_labels = hub_mirrors[name]
    _, _, _, canonical, splits = HUB_CASES[name]
    reference_split = "validation" if name == "imb-celebahq" else "test"
    ds = load_reference_dataset(name, resolution=8, dataset_name=str(root), cache_dir=str(tmp_path))
    assert ds.class_counts == [splits[reference_split]] * len(canonical)
    rows = sorted(decode(ds[i]["pixel_values"])[1] for i in range(len(ds)))
    assert rows == list(range(len(source_labels[reference_split])))
    # split="test" on the training loader is the same reference set
    same = load_imbalanced_dataset(name, split="test", resolution=8, dataset_name=str(root), cache_dir=str(tmp_path))
    assert same.labels == ds.labels


def test_parquet_without_classlabel_metadata_falls_back_to_registry_names(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = np.repeat(np.arange(10), 3)
    blobs = []
    for row, y in enumerate(labels):
        buffer = io.BytesIO()
        Image.new("RGB", IMAGE_SIZE, encode(int(y), row)).save(buffer, "PNG")
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    (tmp_path / "raw" / "data").mkdir(parents=True)
    table = pa.table({"img": blobs, "label": labels.tolist()})  # plain int64 labels, raw image structs
    pq.write_table(table, tmp_path / "raw" / "data" / "train-00000-of-00001.parquet")
    ds = load_imbalanced_dataset(
        "imb-cifar10",
        imbalance_ratio=3,
        resolution=8,
        dataset_name=str(tmp_path / "raw"),
        cache_dir=str(tmp_path),
    )
    assert ds.class_names == CIFAR10_NAMES
    assert ds.class_counts == [int(3 * 3 ** (-c / 9)) for c in range(10)]
    assert decode(ds[len(ds) - 1]["pixel_values"])[0] == 9


def test_save_to_disk_copy_loads(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    labels = [0, 1, 1, 0, 1, 0]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["female", "male"])})
    images = [Image.new("RGB", IMAGE_SIZE, encode(y, r)) for r, y in enumerate(labels)]
    split = Dataset.from_dict({"image": images, "label": labels}, features=features)
    DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "saved"))
    ds = load_imbalanced_dataset("imb-celebahq", imbalance_ratio=3, resolution=4, dataset_name=str(tmp_path / "saved"))
    assert ds.class_counts == [3, 1]
    assert ds[0]["pixel_values"].shape == (3, 4, 4)


# ---------------------------------------------------------------------------------------------------------
# 4. Digits: offline, no files
# ---------------------------------------------------------------------------------------------------------


def test_digits_loads_offline_with_expected_counts(monkeypatch):
    import datasets
    from sklearn.datasets import load_digits

    def no_network(*args, **kwargs):
        raise AssertionError("the digits dataset must not touch the network or the Hub")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_network)

    available = np.bincount(load_digits().target)
    ds = load_imbalanced_dataset("imb-digits", imbalance_ratio=10)
    expected = [min(int(available[0] * 10 ** (-c / 9)), available[c]) for c in range(10)]
    assert ds.class_counts == expected
    assert ds.class_names == [str(d) for d in range(10)]
    item = ds[len(ds) - 1]
    assert item["pixel_values"].shape == (3, 16, 16) and item["label"] == 9 and item["class_name"] == "9"
    assert -1 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1
    # default ratio 100 keeps the legacy selection: the same as running it on sklearn's targets
    ds100 = load_imbalanced_dataset("imb-digits", resolution=8)
    assert ds100.labels == load_digits().target[legacy_long_tail(load_digits().target, 100)].tolist()

    reference = load_reference_dataset("imb-digits")
    assert reference.class_counts == [int(available.min())] * 10


def test_digits_class_order_makes_chosen_class_largest():
    from sklearn.datasets import load_digits

    available = np.bincount(load_digits().target)
    order = list(range(9, -1, -1))
    ds = load_imbalanced_dataset("imb-digits", imbalance_ratio=10, class_order=[str(c) for c in order])
    assert ds.class_names == [str(c) for c in order]
    assert ds.class_counts == [min(int(available[9] * 10 ** (-k / 9)), available[order[k]]) for k in range(10)]
    assert all(ds.class_names[y] == str(order[y]) for y in ds.labels[:5])


# ---------------------------------------------------------------------------------------------------------
# 5. Local class folders, every image mode
# ---------------------------------------------------------------------------------------------------------


def write_mode_zoo(root: Path) -> None:
    """Two classes; 'alpha' holds RGBA / LA / palette-with-transparency, 'beta' grey / CMYK / 16-bit."""
    (root / "alpha").mkdir(parents=True)
    (root / "beta").mkdir(parents=True)
    Image.new("RGBA", IMAGE_SIZE, (10, 20, 30, 0)).save(root / "alpha" / "rgba.png")  # fully transparent
    Image.new("LA", IMAGE_SIZE, (0, 0)).save(root / "alpha" / "la.png")
    palette = Image.new("P", IMAGE_SIZE, 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "alpha" / "p.png", transparency=0)
    Image.new("RGB", IMAGE_SIZE, (200, 100, 50)).save(root / "alpha" / "rgb.jpg")
    Image.new("L", IMAGE_SIZE, 128).save(root / "beta" / "gray.png")
    Image.new("CMYK", IMAGE_SIZE, (0, 255, 255, 0)).save(root / "beta" / "cmyk.tif")
    Image.fromarray(np.full(IMAGE_SIZE[::-1], 128 * 257, dtype=np.uint16)).save(root / "beta" / "grey16.png")
    Image.new("P", IMAGE_SIZE, 1).save(root / "beta" / "palette.gif")
    (root / "beta" / "notes.txt").write_text("not an image")


def test_local_folder_all_image_modes(tmp_path):
    write_mode_zoo(tmp_path / "zoo")
    ds = load_imbalanced_dataset(None, imbalance_ratio=None, resolution=6, train_data_dir=tmp_path / "zoo")
    assert ds.class_names == ["alpha", "beta"] and ds.class_counts == [4, 4]
    pixels = {}
    for i in range(len(ds)):
        item = ds[i]
        x = item["pixel_values"]
        assert x.shape == (3, 6, 6) and -1 <= float(x.min()) and float(x.max()) <= 1
        pixels[Path(str(ds.images[i])).name] = x.mean(dim=(1, 2))
    white = torch.ones(3)
    for transparent in ("rgba.png", "la.png", "p.png"):  # transparency is composited onto white
        torch.testing.assert_close(pixels[transparent], white)
    grey = torch.full((3,), 128 / 255 * 2 - 1)
    torch.testing.assert_close(pixels["gray.png"], grey)
    torch.testing.assert_close(pixels["grey16.png"], grey)  # 16-bit scaled, not clipped to white
    torch.testing.assert_close(pixels["cmyk.tif"], torch.tensor([1.0, -1.0, -1.0]))  # C=0,M=Y=255 -> red


def test_local_folder_subsampling_and_reference(tmp_path):
    root = tmp_path / "folders"
    for c, (name, count) in enumerate([("b_cls", 8), ("a_cls", 9), ("c_cls", 7)]):
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.new("RGB", IMAGE_SIZE, (c, k, 0)).save(root / name / f"{k:02d}.png")
    ds = load_imbalanced_dataset(None, imbalance_ratio=4, resolution=8, train_data_dir=root, random_flip=True)
    assert ds.class_names == ["a_cls", "b_cls", "c_cls"]  # sorted sub-folder names
    assert ds.class_counts == [9, int(9 * 4**-0.5), int(9 / 4)]
    reference = load_reference_dataset(None, resolution=8, train_data_dir=root)
    assert reference.class_counts == [7, 7, 7]


# ---------------------------------------------------------------------------------------------------------
# 6. Errors name the problem and the allowed values
# ---------------------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match=r"'imb-mnist'.*imb-artbench10.*imb-digits"):
        load_imbalanced_dataset("imb-mnist")


@pytest.mark.parametrize("bad", [0.5, 0, -3, float("nan")])
def test_imbalance_ratio_below_one(bad):
    with pytest.raises(ValueError, match=r"imbalance_ratio must be .*>= 1"):
        long_tail_counts(100, 10, bad)
    with pytest.raises(ValueError, match="imbalance_ratio"):
        load_imbalanced_dataset("imb-digits", imbalance_ratio=bad)


def test_class_left_with_zero_images_is_named():
    # 178 zeros at IR 1000: digit c gets int(178 * 1000 ** (-c / 9)), 0 from c = 7 on
    assert [int(178 * 1000 ** (-c / 9)) for c in (6, 7)] == [1, 0]
    with pytest.raises(ValueError, match=r"class 7 \('7'\), 8 \('8'\), 9 \('9'\) would be left with zero images"):
        load_imbalanced_dataset("imb-digits", imbalance_ratio=1000)


def test_empty_class_folder_is_named(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "empty").mkdir()
    Image.new("RGB", IMAGE_SIZE).save(tmp_path / "full" / "x.png")
    with pytest.raises(ValueError, match=r"class 'empty' has no images directly in its folder"):
        load_imbalanced_dataset(None, train_data_dir=tmp_path)


def test_class_without_rows_in_hub_data_is_named(tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["female", "male"])})
    (tmp_path / "data").mkdir()
    Dataset.from_dict({"image": [Image.new("RGB", IMAGE_SIZE)] * 2, "label": [0, 0]}, features=features).to_parquet(
        str(tmp_path / "data" / "train-00000-of-00001.parquet")
    )
    with pytest.raises(ValueError, match=r"\['male'\] have no images"):
        load_imbalanced_dataset("imb-celebahq", dataset_name=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_unknown_class_in_class_order_lists_known():
    with pytest.raises(ValueError, match=r"unknown class 'eleven'.*'0', '1'"):
        load_imbalanced_dataset("imb-digits", class_order=["eleven", *map(str, range(9))])
    with pytest.raises(ValueError, match="exactly once"):
        load_imbalanced_dataset("imb-digits", class_order=["0", "1"])


def test_artbench_with_foreign_class_names_is_refused(tmp_path):
    write_hub_mirror(tmp_path, "image", "label", ["cubism", *ARTBENCH_MIRROR_NAMES[1:]], {"train": 1})
    with pytest.raises(ValueError, match=r"\['cubism'\].*expected exactly.*art_nouveau"):
        load_imbalanced_dataset("imb-artbench10", dataset_name=str(tmp_path), cache_dir=str(tmp_path / "c"))


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="no_such_dir"):
        load_imbalanced_dataset(None, train_data_dir=tmp_path / "no_such_dir")


def test_corrupt_image_named_at_construction_and_at_load(tmp_path):
    (tmp_path / "cls").mkdir()
    Image.new("RGB", IMAGE_SIZE).save(tmp_path / "cls" / "good.png")
    (tmp_path / "cls" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ConfigError, match=r"broken\.png: corrupt image"):
        load_imbalanced_dataset(None, imbalance_ratio=None, train_data_dir=tmp_path)
    ds = load_imbalanced_dataset(None, imbalance_ratio=None, resolution=4, train_data_dir=tmp_path, verify_images=False)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        ds[0]  # sorted: broken.png comes first
    assert ds[1]["pixel_values"].shape == (3, 4, 4)


@pytest.mark.parametrize("bad", [0, -8])
def test_resolution_below_one(bad):
    with pytest.raises(ValueError, match=rf"resolution must be an integer >= 1, got {bad}"):
        load_imbalanced_dataset("imb-digits", resolution=bad)


# ---------------------------------------------------------------------------------------------------------
# 7. Class-balanced sampler (RS baseline)
# ---------------------------------------------------------------------------------------------------------


def test_balanced_sampler_draws_each_class_at_rate_one_over_c():
    labels = np.repeat(np.arange(10), long_tail_counts(500, 10, 100))  # 50x imbalance between ends
    draws = 20000
    sampler = class_balanced_sampler(labels, num_samples=draws, generator=torch.Generator().manual_seed(0))
    drawn = labels[list(sampler)]
    rates = np.bincount(drawn, minlength=10) / draws
    # binomial std at p = 0.1 is 0.0021; 0.01 is ~5 std
    np.testing.assert_allclose(rates, np.full(10, 1 / 10), atol=0.01)
    assert len(class_balanced_sampler(labels)) == len(labels)


# ---------------------------------------------------------------------------------------------------------
# 8. Prompts
# ---------------------------------------------------------------------------------------------------------


def test_class_prompts_use_readable_names_and_the_right_article():
    names = ["post_impressionism", "ukiyo_e", "art_nouveau", "renaissance"]
    assert class_prompts(names) == [
        "a post impressionism painting",
        "an ukiyo-e painting",
        "an art nouveau painting",
        "a renaissance painting",
    ]
    assert class_prompts(["maple_tree", "airplane"], "a photo of a {}") == [
        "a photo of a maple tree",
        "a photo of an airplane",
    ]
    assert class_prompts(["apple"], "a handwritten digit {}") == ["a handwritten digit apple"]  # no article: as is


def test_each_named_dataset_brings_its_own_prompt_template():
    assert get_dataset_spec("imb-cifar10").prompt_template == "a photo of a {}"
    assert get_dataset_spec("imb-artbench10").prompt_template == "a {} painting"


def test_a_hub_copy_without_the_reference_split_is_one_clear_error(tmp_path):
    from capman_peft.data import load_reference_dataset
    from capman_peft.testing import write_artbench_mirror

    data = write_artbench_mirror(tmp_path / "artbench")  # a train split only
    with pytest.raises(ConfigError, match=r"--dataset_name .*artbench: has no split 'test' .*one of \['train'\]"):
        load_reference_dataset("imb-artbench10", 16, dataset_name=str(data), cache_dir=str(tmp_path / "hf"))
