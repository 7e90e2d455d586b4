"""The study's fifth testbed: latent text-to-image from scratch (paper Tab. G.11) at CPU scale, on testbed 3's digits.

``build(output_dir)`` writes, reusing what is there:

* ``captioned/``: testbed 3's pool (bench/mnist16.py, 400 digits per class) as an image folder with a
  ``metadata.jsonl``: ``file_name``, the class column ``digit`` ("0" ... "9", the judge's class order) and ``text``,
  three descriptions per image, one per line (training draws one per step, as for CUB's ten), and ``prompts.json``,
  the class prompts (``--validation_prompts_per_class``: "a handwritten digit seven");
* ``base/``: a ``StableDiffusionPipeline`` folder to train in — a tiny ``AutoencoderKL`` (16 px -> 8 x 8 x 4 latents)
  trained here on the pool, a seeded random two-layer CLIP text encoder with a character tokenizer (frozen, as any
  base's text encoder), and a DDPM scheduler; its UNet is never used (the runs train one from
  ``bench/models/unet-latent16.json``);
* testbed 3's judge (``classifier.safetensors``), which also checks the VAE: it prints the judge's accuracy on the
  VAE's reconstructions of the 100 digits per class kept apart (against the originals').

    python bench/latent16.py --output_dir bench_output/latent16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mnist16 import build as build_mnist16  # noqa: E402

WORDS = "zero one two three four five six seven eight nine".split()
TEMPLATES = ("a handwritten digit {}", "the number {} written by hand", "a grey {} on a black background")
# The metadata.jsonl column holding each image's class (the testbed recipe's --class_column).
CLASS_COLUMN = "digit"
# The class prompts of the grids, the expert-use report and the evaluation: the first description's wording.
PROMPTS = "prompts.json"
VAE_STEPS, VAE_BATCH, VAE_SEED, TEXT_SEED = 1500, 64, 0, 0


def write_captioned(source: Path, folder: Path) -> Path:
    """The source's class folders as one image folder with a metadata.jsonl (class column ``digit``)."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for digit in range(10):
        for image in sorted((source / str(digit)).glob("*.png"), key=lambda p: int(p.stem)):
            name = f"{digit}_{image.stem}.png"
            shutil.copy(image, folder / name)
            text = "\n".join(template.format(WORDS[digit]) for template in TEMPLATES)
            rows.append(json.dumps({"file_name": name, CLASS_COLUMN: str(digit), "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    prompts = {str(digit): TEMPLATES[0].format(word) for digit, word in enumerate(WORDS)}
    (folder / PROMPTS).write_text(json.dumps(prompts, indent=1))
    return folder


def pixels(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-folder tree's images in [-1, 1] (N, 3, 16, 16) and their classes."""
    from PIL import Image

    images, labels = [], []
    for digit in range(10):
        for path in sorted((folder / str(digit)).glob("*.png"), key=lambda p: int(p.stem)):
            images.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
            labels.append(digit)
    return torch.stack(images).float() / 127.5 - 1, torch.tensor(labels)


def train_vae(images: torch.Tensor) -> AutoencoderKL:
    """A two-level AutoencoderKL fitted to `images` (L1 + 1e-6 KL, Adam 1e-3), its latents scaled to unit std."""
    torch.manual_seed(VAE_SEED)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        sample_size=16,
    )  # fmt: skip
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(VAE_SEED)
    for _ in range(VAE_STEPS):
        batch = images[torch.randint(len(images), (VAE_BATCH,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = (vae.decode(posterior.sample(generator)).sample - batch).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        std = vae.encode(images[:1000]).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1 / std)
    return vae.eval()


def build_base(folder: Path, images: torch.Tensor) -> Path:
    """The base pipeline folder (trained VAE, random frozen text encoder, DDPM scheduler)."""
    import tempfile

    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from capman_peft.testing import make_tiny_sd_unet, tiny_text_config, tiny_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    vae = train_vae(images)
    torch.manual_seed(TEXT_SEED)
    text_encoder = CLIPTextModel(tiny_text_config())
    with tempfile.TemporaryDirectory() as files:
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(Path(files) / "tokenizer"),
            unet=make_tiny_sd_unet(cross_attention_dim=text_encoder.config.hidden_size),
            scheduler=DDPMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def check_vae(base: Path, held_out: Path, weights: Path) -> None:
    """The judge's accuracy on the held-out digits and on their VAE reconstructions."""
    from capman_peft.evaluation.digits import load_digits_classifier

    vae, judge = AutoencoderKL.from_pretrained(base / "vae"), load_digits_classifier(weights)
    images, labels = pixels(held_out)
    with torch.no_grad():
        rebuilt = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)

        def accuracy(batch: torch.Tensor) -> float:
            as_bytes = ((batch + 1) * 127.5).round().to(torch.uint8)
            return (judge(as_bytes)[1].argmax(dim=1) == labels).float().mean().item()

        print(
            f"latent16 VAE: L1 {(rebuilt - images).abs().mean().item():.4f} on the held-out digits; the judge's "
            f"accuracy {accuracy(images):.3f} on them, {accuracy(rebuilt):.3f} on their reconstructions"
        )


def build(output_dir: Path) -> tuple[Path, Path, Path]:
    """(base pipeline folder, captioned data folder, judge weights) under `output_dir`; reused if there."""
    source, weights = build_mnist16(output_dir / "mnist16")
    captioned = write_captioned(source, output_dir / "captioned")
    base = output_dir / "base"
    if not (base / "model_index.json").is_file():
        build_base(base, pixels(source)[0])
        check_vae(base, output_dir / "mnist16" / "held_out", weights)
    return base, captioned, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="bench_output/latent16", help="Where the testbed's folders go.")
    args = parser.parse_args()
    base, captioned, weights = build(Path(args.output_dir))
    print(f"wrote {base}, {captioned} and {weights}")


if __name__ == "__main__":
    main()
