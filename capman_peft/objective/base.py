"""The base objectives L_base of Eq. 4 (DDPM, CBDM, OC), chosen by name with ``build_objective``.

They consume the full model's prediction ε_θ; CM (``cm.py``) is added on top of any of them (paper Fig. 4a). Every
loss is computed in float32 whatever the prediction dtype, as diffusers' scripts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .schedule import FlowWeighting, noise_schedule

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

ClassCounts = Sequence[int] | Tensor


def _counts64(class_counts: ClassCounts) -> Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten().cpu()
    if counts.numel() == 0:
        raise ValueError("class_counts is empty")
    if not bool((counts > 0).all()):
        raise ValueError(f"every class needs a training sample, got class_counts={counts.tolist()}")
    return counts


def _check_labels(labels: Tensor, num_classes: int) -> list[int]:
    """Raise on class ids outside [0, C) (on CUDA they would be a device-side assert); returns them on host.

    This is the one host sync of the caller: it also tells which Many/Medium/Few groups are in the batch.
    """
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    ids = labels.tolist()
    bad = sorted({y for y in ids if not 0 <= y < num_classes})
    if bad:
        raise ValueError(
            f"labels must be true class ids in [0, {num_classes}), got {bad}; pass the true label even for "
            "samples whose condition was dropped to the null class"
        )
    return ids


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) → (B, 1, ..., 1) so that it broadcasts against ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def focal_weight(per_sample_loss: Tensor, gamma: float) -> Tensor:
    """(1 − p)^γ with p = exp(−L): focal loss (Lin et al. 2017, Eq. 5: FL = −(1 − p_t)^γ log p_t) for a loss L that
    is a negative log-likelihood up to a constant, as the per-sample diffusion MSE is (a Gaussian's). So
    weight·L = (1 − e^{−L})^γ·L is FL with −log p_t = L: samples the model already fits well (small L) are
    down-weighted, hard ones keep their weight. The weight is not detached, as in Lin et al.
    """
    return (-torch.expm1(-per_sample_loss)).pow(gamma)


class DDPMObjective:
    """L_base = mean‖pred − target‖² (Ho et al. 2020) with the schedule's target: ε, v for v-prediction, or the flow
    velocity ε − x0 for a flow-matching scheduler (then weighted per sample as ``weighting`` says).

    ``snr_gamma`` turns on min-SNR-γ weighting as in diffusers' ``train_text_to_image.py``; ``focal_gamma`` turns
    on the focal weighting of ``focal_weight`` (the paper's +Focal baseline). The CBDM and OC objectives inherit both
    for their data term.
    """

    name = "ddpm"

    def __init__(
        self,
        scheduler: DDPMScheduler,
        class_counts: ClassCounts | None = None,
        snr_gamma: float | None = None,
        focal_gamma: float | None = None,
        weighting: FlowWeighting | None = None,
    ) -> None:
        self.schedule = noise_schedule(scheduler, weighting)
        prediction_type = self.schedule.prediction_type
        if prediction_type not in ("epsilon", "v_prediction", "flow"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
        if snr_gamma is not None and prediction_type == "flow":
            raise ValueError("snr_gamma (min-SNR weighting) is for DDPM schedules; flow matching has weighting_scheme")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive or None, got {snr_gamma}")
        if focal_gamma is not None and focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0 or None, got {focal_gamma}")
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.focal_gamma = focal_gamma
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.class_counts = None if class_counts is None else _counts64(class_counts).float()

    def _counts_on(self, device: torch.device) -> Tensor:
        if self.class_counts.device != device:
            self.class_counts = self.class_counts.to(device)
        return self.class_counts

    def extra_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """Labels of an extra conditional pass the objective needs (only CBDM has one)."""
        return None

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.schedule.target(x0, noise, timesteps)

    def mse(self, pred: Tensor, target: Tensor, timesteps: Tensor) -> Tensor:
        """Batch mean of the per-sample mean squared error, focal-weighted when ``focal_gamma`` is set and min-SNR-γ
        weighted when ``snr_gamma`` is set."""
        per_sample = (pred.float() - target.float()).pow(2).reshape(len(pred), -1).mean(dim=1)
        schedule_weight = self.schedule.loss_weight(timesteps)
        if schedule_weight is not None:
            per_sample = schedule_weight * per_sample
        if self.focal_gamma is not None:
            per_sample = focal_weight(per_sample, self.focal_gamma) * per_sample
        if self.snr_gamma is None:
            return per_sample.mean()
        snr = self.schedule.snr(timesteps)
        if self.prediction_type == "epsilon":
            # min(snr, γ)/snr as min(γ/snr, 1): the same for snr > 0, and 1 (not NaN) at zero terminal SNR.
            weight = (self.snr_gamma / snr).clamp(max=1.0)
        else:
            weight = snr.clamp(max=self.snr_gamma) / (snr + 1)
        return (per_sample * weight).mean()

    def __call__(
        self,
        pred: Tensor,
        *,
        x0: Tensor,
        noise: Tensor,
        x_t: Tensor,
        timesteps: Tensor,
        labels: Tensor,
        pred_extra: Tensor | None = None,
        label_dropped: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and detached stats (``base_loss``). ``labels`` are true class ids."""
        loss = self.mse(pred, self.target(x0, noise, timesteps), timesteps)
        return loss, {"base_loss": loss.detach()}


class CBDMObjective(DDPMObjective):
    """Class-balancing diffusion (Qin et al. 2023; paper Eq. D.1): the DDPM loss plus a regularizer that pulls
    the prediction for y towards the one for a y' drawn from the training class frequencies.

    reg = mean over non-label-dropped samples of w_t·[(ε(y) − sg(ε(y')))² + γ·(sg(ε(y)) − ε(y'))²] with
    w_t = τ·t/T. Eq. D.1 averages over all y'; one y' per sample is its Monte-Carlo estimate. Label-dropped
    samples are conditioned on the null class, so there is no class prior to balance and they are skipped.
    """

    name = "cbdm"

    def __init__(
        self,
        scheduler: DDPMScheduler,
        class_counts: ClassCounts | None = None,
        snr_gamma: float | None = None,
        focal_gamma: float | None = None,
        tau: float = 1.0,
        gamma: float = 0.25,
        weighting: FlowWeighting | None = None,
    ) -> None:
        if class_counts is None:
            raise ValueError("the cbdm objective needs class_counts (y' is drawn from the class frequencies)")
        super().__init__(scheduler, class_counts, snr_gamma, focal_gamma, weighting)
        self.tau = tau
        self.gamma = gamma

    def extra_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """y' ~ Categorical(N_c / Σ N) per sample, on ``labels.device`` (where the generator must live)."""
        counts = self._counts_on(labels.device)
        return torch.multinomial(counts, len(labels), replacement=True, generator=generator)

    def __call__(
        self,
        pred: Tensor,
        *,
        x0: Tensor,
        noise: Tensor,
        x_t: Tensor,
        timesteps: Tensor,
        labels: Tensor,
        pred_extra: Tensor | None = None,
        label_dropped: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``pred_extra`` is the full model's prediction for ``extra_labels(labels)``; stats add
        ``base_mse`` and ``cbdm_reg``."""
        if pred_extra is None:
            raise ValueError("the cbdm objective needs pred_extra, the prediction for extra_labels(labels)")
        if pred_extra.shape != pred.shape:
            raise ValueError(f"pred_extra {tuple(pred_extra.shape)} and pred {tuple(pred.shape)} differ")
        base = self.mse(pred, self.target(x0, noise, timesteps), timesteps)
        own, other = pred.float(), pred_extra.float()
        gap = (own - other.detach()).pow(2) + self.gamma * (own.detach() - other).pow(2)
        weight = self.tau * self.schedule.time_fraction(timesteps)
        per_sample = weight * gap.reshape(len(pred), -1).mean(dim=1)
        kept = torch.ones_like(per_sample, dtype=torch.bool) if label_dropped is None else ~label_dropped
        # where + clamp instead of boolean indexing: no host sync, and exactly 0 when every sample is dropped.
        reg = torch.where(kept, per_sample, 0.0).sum() / kept.sum().clamp(min=1)
        loss = base + reg
        return loss, {"base_loss": loss.detach(), "base_mse": base.detach(), "cbdm_reg": reg.detach()}


def oc_selection_probs(x_t: Tensor, x0: Tensor, signal_squared: Tensor, noise_squared: Tensor) -> Tensor:
    """P[i, j] = softmax_j(−‖x_t,i − a_i x0_j‖² / (2 b_i²)): the posterior that x_t,i was noised from x0_j among
    the batch (paper Eq. D.4), where x_t = a·x0 + b·ε at sample i's timestep (given as a² and b²; DDPM: ᾱ and
    1 − ᾱ, flow matching: (1 − σ)² and σ²).

    The squared distances come from one (B, B) matmul, ‖x_t,i‖² − 2a_i⟨x_t,i, x0_j⟩ + a_i²‖x0_j‖², never a
    (B, B, D) tensor. They are taken in float64: at small t the logits are scaled by 1/b² ≈ 10⁴, where float32
    cancellation in the expansion would be visible.
    """
    xt = x_t.reshape(len(x_t), -1).double()
    ref = x0.reshape(len(x0), -1).double()
    scale = signal_squared.double().sqrt()[:, None]
    sq_dist = xt.pow(2).sum(1)[:, None] - 2 * scale * (xt @ ref.T) + scale.pow(2) * ref.pow(2).sum(1)[None, :]
    logits = -sq_dist.clamp(min=0) / (2 * noise_squared.double())[:, None]
    return logits.softmax(dim=1)


class OCObjective(DDPMObjective):
    """Oriented calibration (Zhang et al. 2024; paper Eq. D.2-D.4), the paper's from-scratch base.

    Each sample i draws a reference j from its batch by ``oc_selection_probs``; the reference is kept only
    when its class is at least as frequent (N_{y_j} ≥ N_{y_i}), so knowledge flows from majorities to
    minorities, and the target becomes ε̂ = (x_t − √ᾱ x0_j)/√(1 − ᾱ) (or v̂ = √ᾱ ε̂ − √(1 − ᾱ) x0_j; under flow
    matching ε̂ = (x_t − (1 − σ) x0_j)/σ and the velocity ε̂ − x0_j: the schedule's target for x0_j and ε̂). A sample
    that keeps itself gets the ordinary target from ``noise``. Label-dropped samples keep themselves by default:
    their condition is the null class, whose target is the unconditional one. With ``transfer_label_dropped`` they
    draw a reference by their true class like every other sample, as the OC authors' trainer does (it transfers
    every sample of the batch by its true label, label-dropped or not: OC_LT ``diffusion.py``, lines 324-336).
    """

    name = "oc"

    def __init__(
        self,
        scheduler: DDPMScheduler,
        class_counts: ClassCounts | None = None,
        snr_gamma: float | None = None,
        focal_gamma: float | None = None,
        transfer_label_dropped: bool = False,
        weighting: FlowWeighting | None = None,
    ) -> None:
        if class_counts is None:
            raise ValueError("the oc objective needs class_counts (a reference must be as frequent as its sample)")
        super().__init__(scheduler, class_counts, snr_gamma, focal_gamma, weighting)
        self.transfer_label_dropped = transfer_label_dropped

    @torch.no_grad()
    def select_references(
        self,
        x_t: Tensor,
        x0: Tensor,
        timesteps: Tensor,
        labels: Tensor,
        label_dropped: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Reference index j per sample (B,); j = i where the drawn one is rarer or i is label-dropped (unless
        ``transfer_label_dropped``)."""
        counts = self._counts_on(labels.device)
        _check_labels(labels, len(counts))
        probs = oc_selection_probs(x_t, x0, *self.schedule.squared_mixing(timesteps))
        drawn = torch.multinomial(probs.float(), 1, generator=generator).squeeze(1)
        keep = counts[labels[drawn]] >= counts[labels]
        if label_dropped is not None and not self.transfer_label_dropped:
            keep &= ~label_dropped
        return torch.where(keep, drawn, torch.arange(len(labels), device=labels.device))

    def targets(self, x0: Tensor, noise: Tensor, x_t: Tensor, timesteps: Tensor, references: Tensor) -> Tensor:
        """The schedule's target for the chosen references (ε̂, v̂ or the flow velocity); exactly the ordinary target
        where i is its own reference."""
        # a and b from float32 squares, as the prediction's precision needs (the same bits as √ᾱ_t in float32).
        signal, noise_scale = (_per_sample(c.float().sqrt(), x_t) for c in self.schedule.squared_mixing(timesteps))
        own = _per_sample(references == torch.arange(len(references), device=references.device), x_t)
        x0_ref = x0.float()[references]
        transferred = (x_t.float() - signal * x0_ref) / noise_scale
        eps_hat = torch.where(own, noise.float(), transferred)
        return self.schedule.target(x0_ref, eps_hat, timesteps)

    def __call__(
        self,
        pred: Tensor,
        *,
        x0: Tensor,
        noise: Tensor,
        x_t: Tensor,
        timesteps: Tensor,
        labels: Tensor,
        pred_extra: Tensor | None = None,
        label_dropped: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Stats add ``base_mse`` and ``oc_ref_changed``, the fraction of samples with another reference."""
        references = self.select_references(x_t, x0, timesteps, labels, label_dropped)
        loss = self.mse(pred, self.targets(x0, noise, x_t, timesteps, references), timesteps)
        changed = (references != torch.arange(len(references), device=references.device)).float().mean()
        return loss, {"base_loss": loss.detach(), "base_mse": loss.detach(), "oc_ref_changed": changed}


OBJECTIVES: dict[str, type[DDPMObjective]] = {"ddpm": DDPMObjective, "cbdm": CBDMObjective, "oc": OCObjective}


def build_objective(
    name: str, scheduler: DDPMScheduler, class_counts: ClassCounts | None = None, **options: float | bool | None
) -> DDPMObjective:
    """The base objective L_base of Eq. 4 by name; CM is added on top of any of them (paper Fig. 4a).

    Options: ``snr_gamma``, ``focal_gamma`` and ``weighting`` (all; ``weighting`` for flow-matching schedulers only),
    ``tau`` and ``gamma`` (cbdm), ``transfer_label_dropped`` (oc).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](scheduler, class_counts, **options)
