"""Images as training items: class names, prompts and their text embeddings, RGB conversion, transforms, and the
labelled dataset the scripts train on."""

from __future__ import annotations

import io
import numbers
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .longtail import class_splits


def readable_class_name(name: str) -> str:
    """``post_impressionism`` -> ``post impressionism``, ``ukiyo_e`` -> ``ukiyo-e`` (prompts, plots)."""
    return name.replace("_", " ").replace("ukiyo e", "ukiyo-e")


def class_prompts(class_names: Sequence[str], template: str = "a {} painting") -> list[str]:
    """One text prompt per class, e.g. ``"a renaissance painting"`` (the paper's ArtBench prompt).

    An article "a" right before the class name becomes "an" before a vowel: "a photo of an airplane".
    """
    prompts = []
    for name in class_names:
        readable = readable_class_name(name)
        article = "an" if readable[:1].lower() in "aeiou" else "a"
        prompts.append(re.sub(r"\ba \{\}", f"{article} {{}}", template).format(readable))
    return prompts


@torch.no_grad()
def chosen_captions(captions: Sequence[str], picks: torch.Tensor | None) -> list[str]:
    """One caption per row: a caption of several lines holds alternatives (e.g. CUB's ten descriptions per image),
    of which the row's uniform draw in [0, 1) picks line ``floor(draw * lines)``; without draws, the first line."""
    chosen = []
    for row, caption in enumerate(captions):
        lines = caption.split("\n")
        pick = 0 if picks is None else min(int(picks[row] * len(lines)), len(lines) - 1)
        chosen.append(lines[pick])
    return chosen


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """Text embeddings exactly as StableDiffusionPipeline.encode_prompt makes them (padded to the max length)."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = tokens.attention_mask.to(text_encoder.device) if use_mask else None
    return text_encoder(tokens.input_ids.to(text_encoder.device), attention_mask=mask)[0]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited onto white, 16-bit images are scaled, and float images
    (mode F) in [0, 1] are read as fractions of white.

    Why not just ``convert("RGB")``: that drops alpha, so transparent pixels keep whatever colour they
    happen to store (often black), it clips 16-bit grey at 255 (measured: a 0..60000 ramp turns
    into 0 then all-255), and it rounds a float image in [0, 1) to black.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and arr.max(initial=0) <= 1:
            arr = arr * 255.0
        elif image.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        image = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


class ImageTransform:
    """The diffusers training-script transform: resize the shorter side (bilinear), crop a square (centered, or at a
    random position as ``RandomCrop`` draws it), flip, to [-1, 1]. It returns the crop's top-left in the resized image
    too: SDXL conditions on it (its time ids), as diffusers' SDXL script records it."""

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False) -> None:
        _check_resolution(resolution)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """(pixels in [-1, 1], (crop top, crop left))."""
        from torchvision import transforms
        from torchvision.transforms import functional

        res = self.resolution
        image = functional.resize(image, res, interpolation=transforms.InterpolationMode.BILINEAR)
        if self.center_crop:  # torchvision's center_crop offsets
            top, left = int(round((image.height - res) / 2.0)), int(round((image.width - res) / 2.0))
        else:
            top, left, _, _ = transforms.RandomCrop.get_params(image, (res, res))
        pixels = functional.to_tensor(functional.crop(image, top, left, res, res))
        if self.random_flip and torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
            pixels = pixels.flip(-1)
        return functional.normalize(pixels, [0.5], [0.5]), (top, left)


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, numbers.Integral) or resolution < 1:
        raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}")


class _HubImages:
    """Lazy view of one image column of a Hub dataset: rows are decoded only when an item is read."""

    def __init__(self, hf_dataset: Any, image_column: str, rows: np.ndarray, source: str):
        self.hf_dataset = hf_dataset.select_columns([image_column])
        self.image_column = image_column
        self.rows = rows
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Image.Image:
        value = self.hf_dataset[int(self.rows[i])][self.image_column]
        if isinstance(value, Image.Image):
            return value
        # Parquet written without the datasets metadata leaves the column as a raw {bytes, path} struct.
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            return Image.open(io.BytesIO(value))
        return Image.open(value)

    def describe(self, i: int) -> str:
        return f"row {int(self.rows[i])} of {self.source}"


class LabelledImageDataset(torch.utils.data.Dataset):
    """Labelled images with their class names and counts: the long-tailed training set, the balanced reference set
    and the held-out images alike; items are decoded and transformed lazily.

        Items are ``{"pixel_values": FloatTensor[3, H, W] in [-1, 1], "label": int, "class_name": str,
        "original_size": LongTensor[2], "crop_top_left": LongTensor[2]}`` (height and width before the resize; the
        crop's top and left after it: SDXL's size conditioning), and ``"caption": str`` when the data has per-image
        captions.

        Args:
            images: per item a PIL image, a file path, or any indexable returning those (read in ``__getitem__``).
            labels: class id per item, ``0`` the largest class.
            class_names: name per class id.
            transform: PIL image -> (pixels, crop top-left); see :class:`ImageTransform`.
            prompt_template: the dataset's class prompt template (``class_prompts``).
            captions: a caption per item, or None (the class prompt stands for every image of a class).
            split_thresholds: (many_above, few_below) image counts of the Many/Medium/Few splits; None: thirds of
                the classes by size (``class_splits``).
    """

    def __init__(
        self,
        images: Sequence[Any],
        labels: Sequence[int],
        class_names: Sequence[str],
        transform: Callable[[Image.Image], tuple[torch.Tensor, tuple[int, int]]],
        prompt_template: str = "a {} painting",
        captions: Sequence[str] | None = None,
        split_thresholds: Sequence[int] | None = None,
    ):
        if len(images) != len(labels) or (captions is not None and len(captions) != len(labels)):
            raise ValueError(f"got {len(images)} images and {len(captions or [])} captions for {len(labels)} labels")
        self.images = images
        self.labels = [int(y) for y in labels]
        self.class_names = list(class_names)
        self.transform = transform
        self.prompt_template = prompt_template
        self.captions = None if captions is None else list(captions)
        self.class_counts = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=self.num_classes).tolist()
        self.split_thresholds = None if split_thresholds is None else tuple(split_thresholds)
        self.splits = class_splits(self.class_counts, self.split_thresholds)
        """Many / Medium / Few class ids by training count."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = self.labels[i]
        image = self.load_image(i)
        pixels, crop_top_left = self.transform(image)
        item = {
            "pixel_values": pixels,
            "label": label,
            "class_name": self.class_names[label],
            "original_size": torch.tensor([image.height, image.width]),
            "crop_top_left": torch.tensor(crop_top_left),
        }
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item

    def load_image(self, i: int) -> Image.Image:
        """The RGB image of item ``i``; a file that cannot be decoded raises ValueError naming it."""
        try:
            image = self.images[i]
            if isinstance(image, (str, os.PathLike)):
                with Image.open(image) as opened:
                    opened.load()
                    rgb = to_rgb(opened)
                    # Closing an image frees its pixels, so an RGB file must be copied out first.
                    return rgb.copy() if rgb is opened else rgb
            image.load()
            return to_rgb(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise ConfigError(f"cannot read image {self._describe(i)}: {err}") from err

    def _describe(self, i: int) -> str:
        if isinstance(self.images, _HubImages):
            return self.images.describe(i)
        item = self.images[i]
        return repr(str(item)) if isinstance(item, (str, os.PathLike)) else f"item {i}"
