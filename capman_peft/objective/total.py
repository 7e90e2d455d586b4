"""Eq. 4 for one batch: L_total = L_base + λ·L_CM, from one call of the CM forward module, and the guard that stops
training on a non-finite loss.

The noise, timesteps, label dropout and row draws of the batch come from ``capman_peft.training.randomness``; the
base objective from ``base.py`` and L_CM from ``cm.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import NonFiniteLossError
from .cm import DEFAULT_BAND_UPPER, DEFAULT_RELATIVE_MARGIN, RELATIVE_FORMS, CMWeights, cm_loss, push_warmup_scale
from .coral import CoralSettings, coral_loss

if TYPE_CHECKING:
    from ..randomness import StepDraws


@dataclass
class CMSettings:
    """The CM loss of one run: per-class coefficients, form, and its weight λ in Eq. 4."""

    weights: CMWeights
    form: str
    margin: float
    cm_lambda: float
    general_fraction: float = 1.0
    relative_margin: float = DEFAULT_RELATIVE_MARGIN
    band_upper: float = DEFAULT_BAND_UPPER
    push_warmup_steps: int = 0

    def general_rows(self, batch_size: int) -> int:
        """Rows of a batch that get a theta^g prediction (the same on every process: DDP-safe)."""
        return max(1, round(self.general_fraction * batch_size))


def importance_rows(row_weights: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """k = len(uniforms) rows drawn with replacement with probability p_i ∝ row_weights[i], and the factor
    1 / (B·p_i) that makes the mean over the drawn rows of factor·L an unbiased estimate of the batch mean of L
    (rows of weight 0 are never drawn; they must contribute 0). No host sync."""
    batch = len(row_weights)
    total = row_weights.sum()
    probs = row_weights / total.clamp(min=torch.finfo(row_weights.dtype).tiny)
    cdf = probs.cumsum(0)
    rows = torch.searchsorted(cdf, uniforms.to(cdf) * cdf[-1], right=True).clamp(max=batch - 1)
    chosen = probs[rows]
    factor = torch.where(chosen > 0, 1 / (batch * chosen.clamp(min=torch.finfo(chosen.dtype).tiny)), 0.0)
    return rows, factor


def cm_rows(cm: CMSettings | None, labels: Tensor, draws: StepDraws) -> tuple[Tensor | None, Tensor | None]:
    """The rows of the θ^g pass (None: all) and each row's weight in L_CM's mean: label-dropped rows count 0 (both
    predictions were made without the class); with ``cm.general_fraction < 1`` the rows ``importance_rows`` draws."""
    if cm is None:
        return None, None
    kept = (~draws.label_dropped).float()
    k = cm.general_rows(len(labels))
    if k == len(labels):
        return None, kept
    return importance_rows((cm.weights.pull + cm.weights.push)[labels] * kept, draws.general_draw[:k])


def diffusion_loss(
    denoiser: nn.Module,
    objective: Any,
    x0: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    cm: CMSettings | None,
    draws: StepDraws,
    condition: Callable[[Tensor], Any] | None = None,
    step: int = 0,
    coral: CoralSettings | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_base + lambda * L_CM (+ CORAL's loss) for one batch (paper Eq. 4), with one call of the denoiser module.

    The condition of sample i is ``condition(labels[i])`` — the model family's condition for that class (the class
    id itself when `condition` is None); a dropped label uses the null class ``num_classes``. The objectives see the
    true labels. L_CM leaves label-dropped samples out: both predictions were made without the class, so there is no
    class to allocate capacity for (their weight is 0 in the batch mean). With ``cm.general_fraction < 1`` theta^g
    runs on rows drawn by ``importance_rows`` only. `draws` holds the batch's noise, timesteps, label dropout and
    CBDM labels (the training scripts take them from `StepRandomness`; elsewhere use `draw_step(...).rows(0, batch,
    device)`). `step` is the optimizer step the batch belongs to (0 for the first): the push's warm-up ramp reads it.
    `coral` adds CORAL's contrastive loss on the denoiser's ``Predictions.embedding`` (``objective/coral.py``).
    """
    if draws.noise.shape != x0.shape:
        raise ValueError(f"draws for shape {tuple(draws.noise.shape)} but x0 has shape {tuple(x0.shape)}")
    noise, timesteps, dropped = draws.noise.to(x0.dtype), draws.timesteps, draws.label_dropped
    x_t = objective.schedule.add_noise(x0, noise, timesteps)
    cond_labels = torch.where(dropped, torch.full_like(labels, num_classes), labels)
    extra_labels = draws.extra_labels

    def condition_of(ids: Tensor | None) -> Any:
        return ids if ids is None or condition is None else condition(ids)

    general_rows, sample_weight = cm_rows(cm, labels, draws)

    time_input = objective.schedule.denoiser_timesteps(timesteps)
    outputs = denoiser(x_t, time_input, condition_of(cond_labels), condition_of(extra_labels), general_rows)
    loss, logs = objective(
        outputs.full,
        x0=x0,
        noise=noise,
        x_t=x_t,
        timesteps=timesteps,
        labels=labels,
        pred_extra=outputs.extra,
        label_dropped=dropped,
    )
    logs = dict(logs)
    if coral is not None:
        if outputs.embedding is None:
            raise ValueError("coral needs a denoiser with a CORAL head (capman_peft.objective.attach_coral_head)")
        coral_value = coral_loss(outputs.embedding, labels, timesteps, ~dropped, coral)
        loss = loss + coral_value
        logs["coral_loss"] = coral_value.detach()
    if cm is not None:
        rows = slice(None) if general_rows is None else general_rows
        target = objective.target(x0[rows], noise[rows], timesteps[rows]) if cm.form in RELATIVE_FORMS else None
        cm_value, cm_logs = cm_loss(
            outputs.full[rows],
            outputs.general,
            labels[rows],
            cm.weights,
            form=cm.form,
            margin=cm.margin,
            relative_margin=cm.relative_margin,
            band_upper=cm.band_upper,
            target=target,
            sample_weight=sample_weight,
            push_scale=push_warmup_scale(step, cm.push_warmup_steps),
        )
        loss = loss + cm.cm_lambda * cm_value
        logs.update(cm_logs)
    logs["loss"] = loss.detach()
    return loss, logs


def check_finite(step: int, process: int | None = None, **terms: Tensor) -> None:
    """Raise ``NonFiniteLossError`` naming the non-finite scalar loss terms, with the finite ones for context (and
    the process they come from, in a multi-process run).

    One host sync for all terms; the message is built only on failure.
    """
    if not terms:
        return
    values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    named = dict(zip(terms, values.tolist(), strict=True))
    bad = ", ".join(f"{name} = {value}" for name, value in named.items() if not math.isfinite(value))
    finite = ", ".join(f"{name} = {value:.4g}" for name, value in named.items() if math.isfinite(value))
    context = (f" ({finite})" if finite else "") + ("" if process is None else f" on process {process}")
    raise NonFiniteLossError(
        f"Non-finite loss at step {step}: {bad}{context}. Training stopped; lower the learning rate or "
        "--cm_diversity_weight, or check the data."
    )
