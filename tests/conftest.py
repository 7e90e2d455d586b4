"""Tiny diffusers models built from configs, so no test needs the network."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Experts in the up path only, on convs and attention projections (the paper's from-scratch setting).
UP_TARGETS = r"up_blocks\..*\.(conv1|conv2|to_q|to_k|to_v|to_out\.0)"
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_tiny_unet2d(num_classes: int = 3, seed: int = 0) -> UNet2DModel:
    """Class-conditional UNet2DModel with convs and attention in both halves (num_class_embeds = C + 1)."""
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
        num_class_embeds=num_classes + 1,
    )


def make_tiny_sd_unet(seed: int = 0) -> UNet2DConditionModel:
    """Text-conditional UNet2DConditionModel with cross-attention in both halves."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=4,
    )


@pytest.fixture
def tiny_unet2d() -> UNet2DModel:
    return make_tiny_unet2d()


@pytest.fixture
def tiny_sd_unet() -> UNet2DConditionModel:
    return make_tiny_sd_unet()
