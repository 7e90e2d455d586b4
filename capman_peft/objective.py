"""The training objective: the CM loss (paper Eq. 2-3) in its bounded forms, and the base objectives.

``L_total = L_base + λ·L_CM`` (Eq. 4). This module holds the math only: ``cm_loss`` consumes the two noise
predictions ε_θ (expert on) and ε_θg (expert off) that the CM forward wrapper returns from one call, and
the base objectives (``ddpm`` / ``cbdm`` / ``oc``, chosen by name with ``build_objective``) consume the full
model's prediction. Every loss is computed in float32 whatever the prediction dtype, as diffusers' scripts do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .data import class_splits
from .errors import ConfigError

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


def _class_weights64(class_counts: ClassCounts) -> tuple[Tensor, Tensor]:
    counts = _counts64(class_counts)
    num_classes = counts.numel()
    omega_con = num_classes * counts / counts.sum()
    # C / (N_c · Σ_j 1/N_j) written as C / Σ_j (N_c / N_j): every ratio is exactly 1 for balanced counts, so
    # ω_div is exactly 1 there and L_CM is exactly 0 (Eq. 3), which 1/N summed in floating point would miss.
    omega_div = num_classes / (counts[:, None] / counts[None, :]).sum(dim=1)
    return omega_con, omega_div


def class_weights(class_counts: ClassCounts) -> tuple[Tensor, Tensor]:
    """ω_con and ω_div of Eq. 3 from the training-set class counts N_c, as float32 tensors of shape (C,).

    ω_con[c] = C·N_c / Σ_j N_j grows with the class size (majorities are pulled to agree with θ^g),
    ω_div[c] = C / (N_c · Σ_j 1/N_j) shrinks with it (minorities are pushed away from θ^g); both are
    exactly 1 for a balanced set. Move them to the training device once: ``cm_loss`` indexes them per step.
    """
    omega_con, omega_div = _class_weights64(class_counts)
    return omega_con.float(), omega_div.float()


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


# How L_CM treats the classes it pushes apart (c_y > 0), DESIGN.md §2. "hinge" is the default: bounded below by
# construction and, with slope 1 at d = 0, it leaves the E = 0 saddle. "paper" is Eq. 2 as written, kept for
# reproduction; it is unbounded below as soon as some class has c_y > 0.
CM_FORMS = ("hinge", "paper")
# The hinge's margin: the RMS gap between θ and θ^g that a pushed class should reach, in units of the prediction
# (unit-variance noise for ε-prediction). Chosen once, a priori, and not tuned (README "Does CM help?").
DEFAULT_MARGIN = 0.1


class CMWeights(NamedTuple):
    """Per-class coefficients of L_CM: ``pull`` multiplies d (consistency), ``push`` the diversity term."""

    pull: Tensor
    push: Tensor


def cm_weights(
    class_counts: ClassCounts,
    form: str = "hinge",
    consistency_weight: float = 1.0,
    diversity_weight: float = 1.0,
) -> CMWeights:
    """The (pull, push) coefficients per class, float32.

    ``hinge`` uses the net weight of Algorithm C.1, c_y = w_div·ω_div[y] − w_con·ω_con[y]: pull max(−c_y, 0), push
    max(c_y, 0), so each class is either pulled together with θ^g (majorities) or pushed away from it (minorities).
    ``paper`` keeps Eq. 2's two terms apart: every class is pulled with w_con·ω_con and pushed with w_div·ω_div.
    Setting a weight to 0 drops its term (the paper's "w/o L_Con" / "w/o L_Div" ablations).
    """
    if form not in CM_FORMS:
        raise ValueError(f"unknown CM form {form!r}; choose one of {', '.join(CM_FORMS)}")
    omega_con, omega_div = _class_weights64(class_counts)
    if form == "paper":
        pull, push = consistency_weight * omega_con, diversity_weight * omega_div
    else:
        c = diversity_weight * omega_div - consistency_weight * omega_con
        pull, push = (-c).clamp(min=0), c.clamp(min=0)
    return CMWeights(pull.float(), push.float())


def cm_loss(
    eps_full: Tensor,
    eps_general: Tensor,
    labels: Tensor,
    weights: CMWeights,
    *,
    form: str = "hinge",
    margin: float = DEFAULT_MARGIN,
    sample_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Capacity manipulation loss L_CM (Eq. 2), a weighted mean over the rows given.

    With d_i the per-sample mean of (ε_θ − ε_θg)², each row contributes ``pull[y]·d_i + push[y]·R_i``:

    * ``hinge``: R_i = max(0, margin − √d_i): the RMS gap of a pushed class should reach ``margin``. R ≥ 0, so
      L_CM ≥ 0; the slope at d = 0 is 1, so θ and θ^g, equal at initialisation, move apart.
    * ``paper``: R_i = −d_i (Eq. 2 as written). Unbounded below when some class has push > pull.

    Gradients flow into both predictions (appendix C).

    Args:
        labels: true class ids, one per row.
        weights: from ``cm_weights`` (the same form); C is their length.
        sample_weight: per-row factor of the mean (default 1): 0 leaves a row out (label-dropped samples), an
            importance weight makes a subset of rows an unbiased estimate of the batch mean.

    Returns:
        The loss and detached scalar stats: ``cm_loss``, ``cm_consistency`` and ``cm_diversity`` (the two terms'
        contributions) and ``cm_distance_{many,medium,few}`` (mean d over the rows of that group, NaN when there
        are none).
    """
    if form not in CM_FORMS:
        raise ValueError(f"unknown CM form {form!r}; choose one of {', '.join(CM_FORMS)}")
    if eps_full.shape != eps_general.shape:
        raise ValueError(f"eps_full {tuple(eps_full.shape)} != eps_general {tuple(eps_general.shape)}")
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin}")
    num_classes = len(weights.pull)
    ids = _check_labels(labels, num_classes)
    if len(ids) != len(eps_full):
        raise ValueError(f"{len(ids)} labels for a batch of {len(eps_full)} predictions")

    distance = (eps_full.float() - eps_general.float()).pow(2).reshape(len(ids), -1).mean(dim=1)
    if form == "hinge":
        # 1e-12 keeps the square root differentiable at d = 0 (where θ and θ^g start out equal).
        push_term = (margin - (distance + 1e-12).sqrt()).clamp(min=0)
    else:
        push_term = -distance
    rows = torch.ones_like(distance) if sample_weight is None else sample_weight.to(distance)
    consistency = rows * weights.pull.to(distance.device)[labels] * distance
    diversity = rows * weights.push.to(distance.device)[labels] * push_term
    # One sum per row: for balanced counts the coefficients are exact (0 for hinge; equal ω = 1 for paper with
    # w_con = w_div), so L_CM is exactly 0 as Eq. 3 promises.
    loss = (consistency + diversity).mean()

    stats = {
        "cm_loss": loss.detach(),
        "cm_consistency": consistency.detach().mean(),
        "cm_diversity": diversity.detach().mean(),
    }
    for group, classes in class_splits(num_classes).items():
        if not classes:
            continue
        # class_splits gives contiguous index ranges (thirds), so two comparisons select a group on device. A group
        # without rows in the batch gives NaN: every process logs the same keys (the logs are averaged over them).
        mask = ((labels >= classes[0]) & (labels <= classes[-1])).to(distance.dtype)
        stats[f"cm_distance_{group}"] = (distance.detach() * mask).sum() / mask.sum()
    return loss, stats


def cm_lower_bound(weights: CMWeights, form: str) -> float:
    """The least value L_CM can take (per row and so for the mean): 0 for hinge; for paper −inf as soon as some
    class has push > pull (DESIGN.md §2: for a fixed merged W the expert can grow that class's distance without
    changing L_base, so Eq. 4 is unbounded below for any λ > 0), else 0."""
    if form == "hinge":
        return 0.0
    return -math.inf if bool((weights.push > weights.pull).any()) else 0.0


def _class_label(index: int, class_names: Sequence[str] | None) -> str:
    return f"{index} ({class_names[index]})" if class_names is not None else str(index)


def check_cm_bounded(
    weights: CMWeights,
    form: str,
    class_names: Sequence[str] | None = None,
    allow_unbounded: bool = False,
) -> float:
    """``cm_lower_bound``, refusing (ValueError) an unbounded objective unless ``allow_unbounded`` (then a warning).

    Only the paper's literal form can be unbounded: it is kept selectable to reproduce the paper.
    """
    if class_names is not None and len(class_names) != len(weights.pull):
        raise ValueError(f"{len(class_names)} class names for {len(weights.pull)} classes")
    bound = cm_lower_bound(weights, form)
    if bound > -math.inf:
        return bound
    pushed = [k for k in range(len(weights.pull)) if weights.push[k] > weights.pull[k]]
    message = (
        "--cm_diversity paper: the CM loss (Eq. 2 as written) is unbounded below here: classes "
        f"{', '.join(_class_label(k, class_names) for k in pushed)} are pushed apart more than they are pulled "
        "together, and for a fixed merged weight the expert can grow their distance at no cost to L_base, for any "
        "--cm_lambda > 0 (DESIGN.md §2); allowed: --cm_diversity hinge (the default), or --allow_unbounded_cm "
        "to train the literal form anyway"
    )
    if not allow_unbounded:
        raise ConfigError(message)
    warnings.warn(message, stacklevel=2)
    return bound


def format_cm_table(weights: CMWeights, class_counts: Sequence[int], class_names: Sequence[str] | None = None) -> str:
    """A printable per-class table of the CM coefficients for the training scripts' start-up report."""
    rows = [f"{'class':<24} {'N_c':>7} {'pull':>8} {'push':>8}"]
    for k, (count, pull, push) in enumerate(
        zip(class_counts, weights.pull.tolist(), weights.push.tolist(), strict=True)
    ):
        rows.append(f"{_class_label(k, class_names):<24} {count:>7} {pull:>8.3f} {push:>8.3f}")
    return "\n".join(rows)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf: training stops instead of silently corrupting the weights."""


def check_finite(step: int, **terms: Tensor) -> None:
    """Raise ``NonFiniteLossError`` naming the non-finite scalar loss terms, with the finite ones for context.

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
    context = f" ({finite})" if finite else ""
    raise NonFiniteLossError(
        f"Non-finite loss at step {step}: {bad}{context}. Training stopped; lower the learning rate or "
        "--cm_diversity_weight, or check the data."
    )


class DDPMObjective:
    """L_base = mean‖pred − target‖² (Ho et al. 2020) with the scheduler's target: ε, or v for v-prediction.

    ``snr_gamma`` turns on min-SNR-γ weighting as in diffusers' ``train_text_to_image.py``; the CBDM and OC
    objectives inherit it for their data term.
    """

    name = "ddpm"

    def __init__(
        self,
        scheduler: DDPMScheduler,
        class_counts: ClassCounts | None = None,
        snr_gamma: float | None = None,
    ) -> None:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive or None, got {snr_gamma}")
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.class_counts = None if class_counts is None else _counts64(class_counts).float()
        self._alphas_cumprod = scheduler.alphas_cumprod.float()

    def _alphas_at(self, timesteps: Tensor) -> Tensor:
        """ᾱ_t per sample; the table follows the timesteps' device once instead of being copied every step."""
        if self._alphas_cumprod.device != timesteps.device:
            self._alphas_cumprod = self._alphas_cumprod.to(timesteps.device)
        return self._alphas_cumprod[timesteps]

    def _counts_on(self, device: torch.device) -> Tensor:
        if self.class_counts.device != device:
            self.class_counts = self.class_counts.to(device)
        return self.class_counts

    def extra_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """Labels of an extra conditional pass the objective needs (only CBDM has one)."""
        return None

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, timesteps)

    def mse(self, pred: Tensor, target: Tensor, timesteps: Tensor) -> Tensor:
        """Batch mean of the per-sample mean squared error, min-SNR-γ weighted when ``snr_gamma`` is set."""
        per_sample = (pred.float() - target.float()).pow(2).reshape(len(pred), -1).mean(dim=1)
        if self.snr_gamma is None:
            return per_sample.mean()
        alphas = self._alphas_at(timesteps)
        snr = alphas / (1 - alphas)
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
        tau: float = 1.0,
        gamma: float = 0.25,
    ) -> None:
        if class_counts is None:
            raise ValueError("the cbdm objective needs class_counts (y' is drawn from the class frequencies)")
        super().__init__(scheduler, class_counts, snr_gamma)
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
        weight = self.tau * timesteps.float() / self.num_train_timesteps
        per_sample = weight * gap.reshape(len(pred), -1).mean(dim=1)
        kept = torch.ones_like(per_sample, dtype=torch.bool) if label_dropped is None else ~label_dropped
        # where + clamp instead of boolean indexing: no host sync, and exactly 0 when every sample is dropped.
        reg = torch.where(kept, per_sample, 0.0).sum() / kept.sum().clamp(min=1)
        loss = base + reg
        return loss, {"base_loss": loss.detach(), "base_mse": base.detach(), "cbdm_reg": reg.detach()}


def oc_selection_probs(x_t: Tensor, x0: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """P[i, j] = softmax_j(−‖x_t,i − √ᾱ_i x0_j‖² / (2(1 − ᾱ_i))): the posterior that x_t,i was noised from
    x0_j among the batch (paper Eq. D.4), with ᾱ at sample i's timestep.

    The squared distances come from one (B, B) matmul, ‖x_t,i‖² − 2√ᾱ_i⟨x_t,i, x0_j⟩ + ᾱ_i‖x0_j‖², never a
    (B, B, D) tensor. They are taken in float64: at small t the logits are scaled by 1/(1 − ᾱ) ≈ 10⁴, where
    float32 cancellation in the expansion would be visible.
    """
    xt = x_t.reshape(len(x_t), -1).double()
    ref = x0.reshape(len(x0), -1).double()
    alphas = alphas_cumprod_t.double()
    scale = alphas.sqrt()[:, None]
    sq_dist = xt.pow(2).sum(1)[:, None] - 2 * scale * (xt @ ref.T) + scale.pow(2) * ref.pow(2).sum(1)[None, :]
    logits = -sq_dist.clamp(min=0) / (2 * (1 - alphas))[:, None]
    return logits.softmax(dim=1)


class OCObjective(DDPMObjective):
    """Oriented calibration (Zhang et al. 2024; paper Eq. D.2-D.4), the paper's from-scratch base.

    Each sample i draws a reference j from its batch by ``oc_selection_probs``; the reference is kept only
    when its class is at least as frequent (N_{y_j} ≥ N_{y_i}), so knowledge flows from majorities to
    minorities, and the target becomes ε̂ = (x_t − √ᾱ x0_j)/√(1 − ᾱ) (or v̂ = √ᾱ ε̂ − √(1 − ᾱ) x0_j). A sample
    that keeps itself gets the ordinary target from ``noise``. Label-dropped samples always keep themselves:
    their condition is the null class, whose target is the unconditional one.
    """

    name = "oc"

    def __init__(
        self,
        scheduler: DDPMScheduler,
        class_counts: ClassCounts | None = None,
        snr_gamma: float | None = None,
    ) -> None:
        if class_counts is None:
            raise ValueError("the oc objective needs class_counts (a reference must be as frequent as its sample)")
        super().__init__(scheduler, class_counts, snr_gamma)

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
        """Reference index j per sample (B,); j = i where the drawn one is rarer or i is label-dropped."""
        counts = self._counts_on(labels.device)
        _check_labels(labels, len(counts))
        probs = oc_selection_probs(x_t, x0, self._alphas_at(timesteps))
        drawn = torch.multinomial(probs.float(), 1, generator=generator).squeeze(1)
        keep = counts[labels[drawn]] >= counts[labels]
        if label_dropped is not None:
            keep &= ~label_dropped
        return torch.where(keep, drawn, torch.arange(len(labels), device=labels.device))

    def targets(self, x0: Tensor, noise: Tensor, x_t: Tensor, timesteps: Tensor, references: Tensor) -> Tensor:
        """ε̂ (or v̂) for the chosen references; exactly the ordinary target where i is its own reference."""
        alphas = _per_sample(self._alphas_at(timesteps), x_t)
        own = _per_sample(references == torch.arange(len(references), device=references.device), x_t)
        x0_ref = x0.float()[references]
        transferred = (x_t.float() - alphas.sqrt() * x0_ref) / (1 - alphas).sqrt()
        eps_hat = torch.where(own, noise.float(), transferred)
        if self.prediction_type == "epsilon":
            return eps_hat
        return alphas.sqrt() * eps_hat - (1 - alphas).sqrt() * x0_ref

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
    name: str, scheduler: DDPMScheduler, class_counts: ClassCounts | None = None, **options: float | None
) -> DDPMObjective:
    """The base objective L_base of Eq. 4 by name; CM is added on top of any of them (paper Fig. 4a).

    Options: ``snr_gamma`` (all), ``tau`` and ``gamma`` (cbdm).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](scheduler, class_counts, **options)
