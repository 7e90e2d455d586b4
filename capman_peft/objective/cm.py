"""The capacity manipulation loss (paper Eq. 2-3) in its bounded default form, and its boundedness check.

``cm_loss`` consumes the two noise predictions ε_θ (expert on) and ε_θg (expert off) that the CM forward wrapper
(``capman_peft.denoiser.CMDenoiser``) returns from one call; ``cm_weights`` gives the per-class coefficients of Eq. 3.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ..data import LISTED_ENDS, SPLITS, class_splits, listed_classes, split_of_class
from ..errors import ConfigError
from .base import ClassCounts, _check_labels, _counts64

if TYPE_CHECKING:
    from ..settings import ObjectiveSettings


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


# How L_CM treats the classes it pushes apart (c_y > 0), docs/method.md. The hinge forms are bounded
# below by construction and differ in what the push may move and how far:
# * "hinge": the push's gradient reaches both predictions, so the expert can meet the margin by perturbing θ itself;
# * "hinge_general": the push moves θ^g only (ε_θ is a constant in it); the expert has to compensate through L_base;
# * "relative": as "hinge_general", with a margin per row of ``relative_margin`` times θ's own RMS error on that row;
# * "band": "relative" with an upper wall: beyond ``band_upper`` times θ's error the gap is pulled back (θ^g only),
#   so W^g keeps a bounded share of a pushed class and the expert carries a bounded difference.
# "paper" is Eq. 2 as written, kept for reproduction; it is unbounded below as soon as some class has c_y > 0.
# The hinges with a lower margin only (what ``capman-analyze push`` measures; the band's wall would need its own slope).
LOWER_MARGIN_FORMS = ("hinge", "hinge_general", "relative")
HINGE_FORMS = (*LOWER_MARGIN_FORMS, "band")
CM_FORMS = (*HINGE_FORMS, "paper")
# The forms whose margins are fractions of θ's own error on the row: they need the diffusion target.
RELATIVE_FORMS = ("relative", "band")
# The absolute hinges' margin: the RMS gap between θ and θ^g that a pushed class should reach, in units of the
# prediction (unit-variance noise for ε-prediction). Chosen once, a priori, and not tuned.
DEFAULT_MARGIN = 0.1
# The relative hinge's margin as a fraction ρ of θ's own RMS error on the row. With the gap orthogonal to θ's error,
# θ^g's loss is then (1 + ρ²) times θ's: ρ = 0.5 asks θ^g to be 25% worse on a pushed class, a push an expert of a
# few percent of the weights can carry. Chosen a priori, not tuned.
DEFAULT_RELATIVE_MARGIN = 0.5
# The band's upper wall as a fraction of θ's own RMS error: past it θ^g is pulled back, so θ^g's loss on a pushed
# class stays below about (1 + 1²) = 2 times θ's (under the relative hinge it ends 2.3-4.7 times θ's on the Few classes
# of the 16-px MNIST testbed, where θ lost the rare classes). Chosen a priori, before any run of the band.
DEFAULT_BAND_UPPER = 1.0


class CMWeights(NamedTuple):
    """Per-class coefficients of L_CM: ``pull`` multiplies d (consistency), ``push`` the diversity term; ``split``
    is each class's index in ``SPLITS`` by training-set size and ``groups`` the indices of the groups that have
    classes (for the logged group distances: known on the host, so logging them costs no sync)."""

    pull: Tensor
    push: Tensor
    split: Tensor
    groups: tuple[int, ...]

    def to(self, device: torch.device | str) -> CMWeights:
        return CMWeights(self.pull.to(device), self.push.to(device), self.split.to(device), self.groups)


def cm_weights(
    class_counts: ClassCounts,
    form: str = "hinge",
    consistency_weight: float = 1.0,
    diversity_weight: float = 1.0,
    splits: dict[str, list[int]] | None = None,
) -> CMWeights:
    """The (pull, push) coefficients per class, float32; `splits` the Many/Medium/Few class ids (default:
    ``class_splits`` of the counts).

    The hinge forms use the net weight of Algorithm C.1, c_y = w_div·ω_div[y] − w_con·ω_con[y]: pull max(−c_y, 0), push
    max(c_y, 0), so each class is either pulled together with θ^g (majorities) or pushed away from it (minorities).
    ``paper`` keeps Eq. 2's two terms apart: every class is pulled with w_con·ω_con and pushed with w_div·ω_div.
    Setting a weight to 0 drops its term (the paper's "w/o L_Con" / "w/o L_Div" ablations).
    """
    _check_form(form)
    omega_con, omega_div = _class_weights64(class_counts)
    if form == "paper":
        pull, push = consistency_weight * omega_con, diversity_weight * omega_div
    else:
        c = diversity_weight * omega_div - consistency_weight * omega_con
        pull, push = (-c).clamp(min=0), c.clamp(min=0)
    groups = splits or class_splits([int(n) for n in class_counts])
    split = torch.tensor(split_of_class(groups), dtype=torch.long)
    present = tuple(index for index, name in enumerate(SPLITS) if groups[name])
    return CMWeights(pull.float(), push.float(), split, present)


def _check_form(form: str) -> None:
    if form not in CM_FORMS:
        raise ValueError(f"unknown CM form {form!r}; choose one of {', '.join(CM_FORMS)}")


def _rms(difference: Tensor) -> Tensor:
    # 1e-12 keeps the square root differentiable at 0.
    return (difference.pow(2).flatten(1).mean(dim=1) + 1e-12).sqrt()


def _push_term(
    form: str,
    full: Tensor,
    general: Tensor,
    distance: Tensor,
    margin: float | Tensor,
    relative_margin: float,
    band_upper: float,
    target: Tensor | None,
) -> Tensor:
    """R_i of each row (:func:`cm_loss` gives each form's)."""
    if form == "paper":
        return -distance
    if form == "hinge":
        # 1e-12 keeps the square root differentiable at d = 0 (where θ and θ^g start out equal).
        return (margin - (distance + 1e-12).sqrt()).clamp(min=0)
    gap = _rms(full.detach() - general)
    if form not in RELATIVE_FORMS:  # hinge_general
        return (margin - gap).clamp(min=0)
    error = _rms(full - target.float()).detach()
    push = (relative_margin * error - gap).clamp(min=0)
    if form == "band":
        push = push + (gap - band_upper * error).clamp(min=0)
    return push


def cm_loss(
    eps_full: Tensor,
    eps_general: Tensor,
    labels: Tensor,
    weights: CMWeights,
    *,
    form: str = "hinge",
    margin: float | Tensor = DEFAULT_MARGIN,
    relative_margin: float = DEFAULT_RELATIVE_MARGIN,
    band_upper: float = DEFAULT_BAND_UPPER,
    target: Tensor | None = None,
    sample_weight: Tensor | None = None,
    push_scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Capacity manipulation loss L_CM (Eq. 2), a weighted mean over the rows given.

    With d_i the per-sample mean of (ε_θ − ε_θg)², each row contributes ``pull[y]·d_i + push[y]·R_i``; the pull
    always moves both predictions (θ and θ^g should agree on the majorities):

    * ``hinge``: R_i = max(0, margin − √d_i): the RMS gap of a pushed class should reach ``margin``. R ≥ 0, so
      L_CM ≥ 0; the gradient reaches both predictions (appendix C).
    * ``hinge_general``: the same with ε_θ held constant in R_i: only θ^g is pushed away; θ keeps its own
      prediction, and the expert has to compensate what the general part loses.
    * ``relative``: as ``hinge_general`` with margin_i = ``relative_margin`` · RMS(ε_θ − target)_i (held constant):
      the gap asked of a row is a fixed fraction of θ's own error there. Needs ``target``.
    * ``band``: ``relative`` plus max(0, g_i − ``band_upper`` · RMS(ε_θ − target)_i) with g_i the RMS gap: a gap
      past the upper wall pulls θ^g back towards θ (ε_θ held constant). Needs ``target``.
    * ``paper``: R_i = −d_i (Eq. 2 as written). Unbounded below when some class has push > pull.

    Args:
        labels: true class ids, one per row.
        weights: from ``cm_weights`` (the same form); C is their length.
        margin: the hinge forms' margin, or one per row (the push analysis gives the relative form's there).
        target: the diffusion target (ε or v) of each row, for ``relative`` and ``band``.
        sample_weight: per-row factor of the mean (default 1): 0 leaves a row out (label-dropped samples), an
            importance weight makes a subset of rows an unbiased estimate of the batch mean.
        push_scale: factor on the push term (the training scripts' warm-up ramp, ``push_warmup_scale``); the pull
            is never scaled.

    Returns:
        The loss and detached scalar stats: ``cm_loss``, ``cm_consistency`` and ``cm_diversity`` (the two terms'
        contributions) and ``cm_distance_{many,medium,few}`` (mean d over the rows of that group, NaN when there
        are none).
    """
    _check_form(form)
    if eps_full.shape != eps_general.shape:
        raise ValueError(f"eps_full {tuple(eps_full.shape)} != eps_general {tuple(eps_general.shape)}")
    if not (bool(torch.as_tensor(margin).gt(0).all()) and relative_margin > 0):
        raise ValueError(f"margin and relative_margin must be positive, got {margin} and {relative_margin}")
    if form == "band" and not band_upper > relative_margin:
        raise ValueError(f"band_upper ({band_upper}) must be above relative_margin ({relative_margin})")
    if form in RELATIVE_FORMS and (target is None or target.shape != eps_full.shape):
        raise ValueError(f"form={form!r} needs the diffusion target, shaped like eps_full")
    ids = _check_labels(labels, len(weights.pull))
    if len(ids) != len(eps_full):
        raise ValueError(f"{len(ids)} labels for a batch of {len(eps_full)} predictions")

    full, general = eps_full.float(), eps_general.float()
    distance = (full - general).pow(2).reshape(len(ids), -1).mean(dim=1)
    push_term = _push_term(form, full, general, distance, margin, relative_margin, band_upper, target)
    rows = torch.ones_like(distance) if sample_weight is None else sample_weight.to(distance)
    consistency = rows * weights.pull.to(distance.device)[labels] * distance
    diversity = push_scale * rows * weights.push.to(distance.device)[labels] * push_term
    # One sum per row: for balanced counts the coefficients are exact (0 for hinge; equal ω = 1 for paper with
    # w_con = w_div), so L_CM is exactly 0 as Eq. 3 promises.
    loss = (consistency + diversity).mean()

    stats = {
        "cm_loss": loss.detach(),
        "cm_consistency": consistency.detach().mean(),
        "cm_diversity": diversity.detach().mean(),
    }
    split_of_row = weights.split.to(distance.device)[labels]
    for index in weights.groups:
        # Rows the loss leaves out (label-dropped: weight 0) are left out here too. A group without rows in the batch
        # gives NaN: every process logs the same keys (the logs are averaged over them).
        mask = ((split_of_row == index) & (rows > 0)).to(distance.dtype)
        stats[f"cm_distance_{SPLITS[index]}"] = (distance.detach() * mask).sum() / mask.sum()
    return loss, stats


def push_warmup_scale(step: int, warmup_steps: int) -> float:
    """The push's factor at optimizer step ``step`` (0 for the first): a linear ramp from 0 to 1 over
    ``warmup_steps`` steps (1 throughout when 0), so classes are pushed apart only once θ has begun to fit them."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def cm_lower_bound(weights: CMWeights, form: str) -> float:
    """The least value L_CM can take (per row and so for the mean): 0 for the hinge forms; for paper −inf as soon as
    some class has push > pull (docs/method.md: for a fixed merged W the expert can grow that class's distance
    without changing L_base, so Eq. 4 is unbounded below for any λ > 0), else 0."""
    _check_form(form)
    if form in HINGE_FORMS:
        return 0.0
    return -math.inf if bool((weights.push > weights.pull).any()) else 0.0


def cm_card_settings(objective: ObjectiveSettings, **adapter: Any) -> dict[str, Any] | None:
    """The CM settings a model card lists (None for a baseline run): the adapter's shape, then the loss weights."""
    if not objective.capacity_manipulation:
        return None
    return {
        **adapter,
        "lambda": objective.cm_lambda,
        "w_con": objective.cm_consistency_weight,
        "w_div": objective.cm_diversity_weight,
        "form": objective.cm_form,
        "margin": objective.cm_relative_margin if objective.cm_form in RELATIVE_FORMS else objective.cm_margin,
        **({"band_upper": objective.cm_band_upper} if objective.cm_form == "band" else {}),
        **({"push_warmup_steps": objective.cm_push_warmup_steps} if objective.cm_push_warmup_steps else {}),
        "objective": objective.objective,
    }


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
        "--cm_form paper: the CM loss (Eq. 2 as written) is unbounded below here: classes "
        f"{', '.join(_class_label(k, class_names) for k in pushed)} are pushed apart more than they are pulled "
        "together, and for a fixed merged weight the expert can grow their distance at no cost to L_base, for any "
        "--cm_lambda > 0 (docs/method.md); allowed: a hinge form (--cm_form hinge, hinge_general, "
        "relative or band), or --allow_unbounded_cm to train the literal form anyway"
    )
    if not allow_unbounded:
        raise ConfigError(message)
    warnings.warn(message, stacklevel=2)
    return bound


def format_cm_table(weights: CMWeights, class_counts: Sequence[int], class_names: Sequence[str] | None = None) -> str:
    """A printable per-class table of the CM coefficients for the training scripts' start-up report."""
    pulls, pushes = weights.pull.tolist(), weights.push.tolist()
    rows = [f"{'class':<24} {'N_c':>7} {'pull':>8} {'push':>8}"]
    for k in listed_classes(class_counts):
        if k is None:
            rows.append(f"... {len(class_counts) - LISTED_ENDS * 2} more classes ...")
        else:
            rows.append(f"{_class_label(k, class_names):<24} {class_counts[k]:>7} {pulls[k]:>8.3f} {pushes[k]:>8.3f}")
    return "\n".join(rows)
