"""CORAL (Rodriguez et al., NeurIPS 2025): a supervised contrastive loss on the UNet's bottleneck, so that the classes
(the rare ones above all) get separate latent representations instead of overlapping ones.

As the authors' code (SankarLab/coral-lt-diffusion) computes it: the mid block's output, average-pooled and projected
to 128 dimensions by a linear head trained with the model (``model/model.py``: ``mean_proj``), L2-normalised and
scored by pytorch-metric-learning's ``SupConLoss`` (temperature τ = 0.1) against the class labels, weighted by
``0.5 · mean over the batch of exp((1 − t/T) / 0.3)`` (``diffusion.py``); the training loop adds that once more times
τ (``main.py``: ``loss_ddpm + loss_supcon * temperature``), which :func:`coral_loss` includes. The head is not part of
the exported model: the output stays a plain diffusers UNet.

Where ours differs (docs/method.md "Fidelity to the authors' code"): the authors drop the labels of a whole batch
(p = 0.1) and skip the loss on that step; we drop labels per sample, as every objective here does, and contrast the
samples that kept theirs. Their non-AMP loop also drops CBDM's loss when both are on; we always add CORAL to the base
objective, as their AMP loop does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import SupConLoss
from torch import Tensor, nn

CORAL_HEAD = "coral_head"
"""The attribute of the denoiser that holds CORAL's projection head while it trains (removed before export)."""
EMBEDDING_DIM = 128  # the authors' latent_dim


@dataclass(frozen=True)
class CoralSettings:
    """CORAL's loss of one run (the authors' defaults: ``main.py`` flags)."""

    weight: float = 0.5
    """``--supcon_weight``: the loss's weight before the timestep scale."""
    time_temperature: float = 0.3
    """``--temperature_scaling``: the timestep scale is exp((1 − t/T) / time_temperature)."""
    temperature: float = 0.1
    """``--supcon_temp``: SupCon's temperature, and the factor the loss is added with."""
    num_train_timesteps: int = 1000
    """T of the noise schedule."""


class CoralHead(nn.Module):
    """The projection of the average-pooled bottleneck (channels) to CORAL's 128-dimensional embedding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, EMBEDDING_DIM)

    def forward(self, bottleneck: Tensor) -> Tensor:
        return self.proj(bottleneck.float().mean(dim=(2, 3)))


def attach_coral_head(model: nn.Module, channels: int) -> CoralHead:
    """A new, trainable :class:`CoralHead` on `model` (the UNet, or the PEFT model's base UNet), so that the
    optimizer, EMA, checkpoints and distributed training treat it like the UNet's own weights."""
    head = CoralHead(channels).to(next(model.parameters()).device)
    model.add_module(CORAL_HEAD, head)
    return head


def drop_coral_head(model: nn.Module) -> nn.Module:
    """`model` without CORAL's head anywhere in it (what is exported: the plain diffusers UNet)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CoralHead):
            parent_name, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent_name), child)
    return model


def coral_loss(embeddings: Tensor, labels: Tensor, timesteps: Tensor, kept: Tensor, settings: CoralSettings) -> Tensor:
    """τ · weight · mean_i exp((1 − t_i/T) / time_temperature) · SupCon_τ(normalize(embeddings), labels), over the
    rows that kept their label (`kept`); 0 when fewer than two did.

    Args:
        embeddings: the head's output for θ's rows, (B, 128).
        labels: the true class ids, (B,).
        timesteps: the rows' diffusion timesteps t in [0, T), (B,).
        kept: True where the label was not dropped, (B,).
    """
    rows = kept.nonzero().squeeze(1)
    if len(rows) < 2:
        return embeddings.sum() * 0.0  # nothing to contrast; keeps the head in the graph (DDP)
    scale = torch.exp((1 - timesteps[rows].float() / settings.num_train_timesteps) / settings.time_temperature)
    supcon = SupConLoss(temperature=settings.temperature)(F.normalize(embeddings[rows].float(), dim=1), labels[rows])
    return settings.temperature * settings.weight * scale.mean() * supcon
