"""Tiny models and data in the real formats, built from configs on the spot, so that tests, benchmarks and your own
checks never need the network: a class-conditional UNet2DModel, a Stable Diffusion pipeline folder with every SD v1
component at toy size, and a parquet file in the ImageFolder-on-the-Hub format of the ArtBench mirror.

    from capman_peft.testing import build_tiny_sd, write_artbench_mirror
    base = build_tiny_sd(tmp / "sd")                 # tmp/sd/base: loads with DiffusionPipeline.from_pretrained
    data = write_artbench_mirror(tmp / "artbench")   # --dataset imb-artbench10 --dataset_name <data>

Every builder seeds the global torch RNG itself, so the same call gives the same weights.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

# The mirror's label order (baroque is 8 there, 1 in the paper's alphabetical order).
ARTBENCH_MIRROR_NAMES = [
    "expressionism", "art_nouveau", "renaissance", "ukiyo_e", "realism",
    "romanticism", "surrealism", "impressionism", "baroque", "post_impressionism",
]  # fmt: skip
MIRROR_IMAGES_PER_CLASS = 4


def make_tiny_unet2d(num_classes: int | None = 3, seed: int = 0) -> UNet2DModel:
    """Class-conditional UNet2DModel with convs and attention in both halves (num_class_embeds = C + 1; None: no
    class embedding)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def make_tiny_sd_unet(seed: int = 0, cross_attention_dim: int = 12, **extra: Any) -> UNet2DConditionModel:
    """Text-conditional UNet2DConditionModel with cross-attention in both halves (`extra`: more config, e.g.
    SDXL's added conditions)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        attention_head_dim=4,
        **extra,
    )


def tiny_tokenizer(files: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per character (and per word-final character): no merges needed."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in string.ascii_lowercase + string.digits + "-":
            vocab[char + suffix] = len(vocab)
    files.mkdir(parents=True)
    (files / "vocab.json").write_text(json.dumps(vocab))
    (files / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )


def _tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer with one token per character, built with `tokenizers` (no sentencepiece file, no download)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(char, -1.0) for char in string.ascii_lowercase + string.digits + "-\u2581"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )


def _tiny_t5() -> T5EncoderModel:
    """A two-layer T5 encoder of width 32."""
    config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64, decoder_start_token_id=0)
    return T5EncoderModel(config)


def _tiny_vae(**extra: Any) -> AutoencoderKL:
    """Two blocks: downsampling factor 2, so 16 px images give 8 x 8 latents."""
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
        **extra,
    )


def tiny_text_config(**extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def build_tiny_sd(root: Path) -> Path:
    """A StableDiffusionPipeline folder with every SD v1 component at toy size."""
    tokenizer = tiny_tokenizer(root / "tokenizer-files")
    unet = make_tiny_sd_unet(cross_attention_dim=16)
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(tiny_text_config())
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(root / "base", safe_serialization=True)
    return root / "base"


def build_tiny_sdxl(root: Path) -> Path:
    """A StableDiffusionXLPipeline folder at toy size: a UNet with SDXL's added conditions (pooled text embedding
    and six time ids), two CLIP text encoders (the second with a projection), a VAE and SDXL's Euler scheduler."""
    tokenizer = tiny_tokenizer(root / "tokenizer-files")
    tokenizer_2 = tiny_tokenizer(root / "tokenizer-2-files")
    unet = make_tiny_sd_unet(
        cross_attention_dim=32,  # the two encoders' hidden states side by side
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,  # pooled embedding + six time ids
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(tiny_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(projection_dim=16))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(root / "base", safe_serialization=True)
    return root / "base"


def write_artbench_mirror(root: Path) -> Path:
    """data/train-00000-of-00001.parquet with the mirror's columns (image, label) and ClassLabel names."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(ARTBENCH_MIRROR_NAMES)), MIRROR_IMAGES_PER_CLASS).tolist()
    # 18 x 16 (non-square: resize + crop run) random images
    images = [Image.fromarray(rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)) for _ in labels]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=ARTBENCH_MIRROR_NAMES)})
    (root / "data").mkdir(parents=True)
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
        str(root / "data" / "train-00000-of-00001.parquet")
    )
    return root


def _write_described_image(image: Path, text: Path, level: int, lines: list[str]) -> None:
    """A 16 x 16 image of one grey level and its description file (``text_c10`` layout)."""
    image.parent.mkdir(parents=True, exist_ok=True)
    text.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), level, dtype=np.uint8)).save(image)
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")


def described(image_number: int) -> list[str]:
    """The two descriptions the copies below give image `image_number` (each names it)."""
    return [f"bird or flower number {image_number}", f"another text of number {image_number}"]


def write_cub_copy(root: Path, train_counts: tuple[int, ...] = (6, 4, 2)) -> Path:
    """A CUB_200_2011 folder in its released layout with ``text_c10/``: class c has ``train_counts[c]`` training
    images and one test image; image k (numbered from 1 in images.txt) has grey level 10 k (mod 256) and
    :func:`described`."""
    folder = root / "CUB_200_2011"
    classes, images, labels, split = [], [], [], []
    number = 0
    for c, count in enumerate(train_counts):
        name = f"{c + 1:03d}.Bird_kind_{c}"
        classes.append(f"{c + 1} {name}")
        for k in range(count + 1):
            number += 1
            rel = f"{name}/Bird_kind_{c}_{k:04d}_{number}.jpg"
            images.append(f"{number} {rel}")
            labels.append(f"{number} {c + 1}")
            split.append(f"{number} {int(k < count)}")
            text = folder / "text_c10" / name / f"{Path(rel).stem}.txt"
            _write_described_image(folder / "images" / rel, text, 10 * number % 256, described(number))
    for file, lines in (("classes", classes), ("images", images), ("image_class_labels", labels)):
        (folder / f"{file}.txt").write_text("\n".join(lines) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return folder


def write_oxford102_copy(root: Path) -> Path:
    """A 102flowers folder in its released layout (``jpg/``, ``imagelabels.mat``, ``setid.mat``) with ``text_c10/``:
    class c (label c + 1) has images 3c+1 (trnid), 3c+2 (valid) and 3c+3 (tstid); image k has grey level k % 256
    and :func:`described`."""
    from scipy.io import savemat

    folder = root / "102flowers"
    labels = np.repeat(np.arange(1, 103), 3)
    for number, label in enumerate(labels, 1):
        text = folder / "text_c10" / f"class_{label:05d}" / f"image_{number:05d}.txt"
        _write_described_image(folder / "jpg" / f"image_{number:05d}.jpg", text, number % 256, described(number))
    savemat(folder / "imagelabels.mat", {"labels": labels[None, :]})
    ids = np.arange(1, len(labels) + 1)
    savemat(folder / "setid.mat", {"trnid": ids[0::3][None], "valid": ids[1::3][None], "tstid": ids[2::3][None]})
    return folder


def build_tiny_sd3(root: Path) -> Path:
    """A StableDiffusion3Pipeline folder at toy size: an SD3 transformer (joint attention, patch size 1), two CLIP
    text encoders with projections, a T5 encoder, a VAE with SD3's shift factor and the flow-matching scheduler with
    SD3's shift 3."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,  # the two CLIP projections side by side
        pos_embed_max_size=16,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(tiny_text_config(projection_dim=16)),
        tokenizer=tiny_tokenizer(root / "tokenizer-files"),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(projection_dim=16)),
        tokenizer_2=tiny_tokenizer(root / "tokenizer-2-files"),
        text_encoder_3=_tiny_t5(),
        tokenizer_3=_tiny_t5_tokenizer(),
    )
    pipeline.save_pretrained(root / "base", safe_serialization=True)
    return root / "base"


def build_tiny_flux(root: Path, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline folder at toy size: a Flux transformer (one double- and one single-stream block, the guidance
    input of FLUX.1-dev unless `guidance_embeds` is False, as schnell), CLIP and T5 text encoders, a VAE with Flux's
    shift factor and the flow-matching scheduler with FLUX.1-dev's dynamic shifting."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2 x 2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width
        pooled_projection_dim=16,  # CLIP's width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(tiny_text_config()),
        tokenizer=tiny_tokenizer(root / "tokenizer-files"),
        text_encoder_2=_tiny_t5(),
        tokenizer_2=_tiny_t5_tokenizer(),
    )
    pipeline.save_pretrained(root / "base", safe_serialization=True)
    return root / "base"
