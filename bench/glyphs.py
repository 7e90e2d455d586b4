"""The study's second testbed: printed letters, rendered offline from the fonts matplotlib ships.

Ten capital letters in 20 text fonts (DejaVu, STIX, Computer Modern; regular, bold, italic), each image with its own
size, rotation and offset, white ink on black, 8x8 like the digits (or 16x16: ``--size 16``, the fourth testbed). The
source folder is balanced (600 images per letter, more than the digits' ~180); training subsamples it to a long tail
with ``--imbalance_ratio`` and the letters it leaves out are the held-out images. A separately rendered set (another
seed) trains the classifier whose features and predictions judge the samples (the digits classifier's network, its
own weights).

    python bench/glyphs.py --output_dir bench_output/glyphs     # writes source/ and classifier.safetensors
    python bench/glyphs.py --output_dir bench_output/glyphs16 --size 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LETTERS = "ABCEHKMRSX"
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf",
)  # fmt: skip
SOURCE_PER_CLASS = 600
CLASSIFIER_PER_CLASS = 300
SIZE = 8
CANVAS = 32


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def render(letter: str, rng: np.random.Generator, fonts: list[Path], size: int = SIZE) -> Image.Image:
    """One letter: a random font, size, rotation and offset on a 32 px canvas, box-filtered down to `size` px and
    stretched so that its brightest pixel is white (as the digits' ink is)."""
    font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(26, 35)))
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(canvas).text((CANVAS / 2, CANVAS / 2), letter, fill=255, font=font, anchor="mm")
    dx, dy = rng.uniform(-3, 3, size=2)
    canvas = canvas.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, translate=(dx, dy))
    small = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float64)
    small = np.round(small * 255 / max(small.max(), 1)).astype(np.uint8)
    return Image.fromarray(small, "L").convert("RGB")


def render_set(per_class: int, seed: int, size: int = SIZE) -> tuple[list[Image.Image], list[int]]:
    fonts = [_font_dir() / name for name in FONTS]
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, letter in enumerate(LETTERS):
        for _ in range(per_class):
            images.append(render(letter, rng, fonts, size))
            labels.append(label)
    return images, labels


def build(output_dir: Path, size: int = SIZE) -> tuple[Path, Path]:
    """``output_dir/source/<letter>/<i>.png`` (balanced) and ``output_dir/classifier.safetensors``; reused if there."""
    import torch
    from safetensors.torch import save_file

    from capman_peft.evaluation.digits import train_digits_classifier

    source, weights = output_dir / "source", output_dir / "classifier.safetensors"
    if not (source / LETTERS[-1] / f"{SOURCE_PER_CLASS - 1}.png").is_file():
        images, labels = render_set(SOURCE_PER_CLASS, seed=0, size=size)
        counts = dict.fromkeys(range(len(LETTERS)), 0)
        for image, label in zip(images, labels, strict=True):
            (source / LETTERS[label]).mkdir(parents=True, exist_ok=True)
            image.save(source / LETTERS[label] / f"{counts[label]}.png")
            counts[label] += 1
    if not weights.is_file():
        images, labels = render_set(CLASSIFIER_PER_CLASS, seed=1, size=size)
        pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])
        model = train_digits_classifier(pixels, torch.tensor(labels), seed=0)
        save_file(model.state_dict(), str(weights), metadata={"data": "rendered letters, seed 1, balanced"})
    return source, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="bench_output/glyphs", help="Where source/ and the classifier go.")
    parser.add_argument(
        "--size", type=int, default=SIZE, help="Image side in pixels (8, or 16 for the fourth testbed)."
    )
    args = parser.parse_args()
    source, weights = build(Path(args.output_dir), args.size)
    print(f"wrote {source} ({SOURCE_PER_CLASS} per letter) and {weights}")


if __name__ == "__main__":
    main()
