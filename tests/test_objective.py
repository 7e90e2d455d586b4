"""The CM loss (Eq. 2-3) in its forms, its boundedness, the non-finite guard and the ddpm/cbdm/oc base objectives.

Every expected number is computed independently in the test, with python floats and explicit loops.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from capman_peft.errors import NonFiniteLossError
from capman_peft.objective import (
    CM_FORMS,
    build_objective,
    check_cm_bounded,
    check_finite,
    class_weights,
    cm_loss,
    cm_lower_bound,
    cm_weights,
    format_cm_table,
    importance_rows,
    oc_selection_probs,
    push_warmup_scale,
)

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
    )


def values(tensor: torch.Tensor) -> list[float]:
    return tensor.detach().flatten().tolist()


def eq3_by_hand(counts: list[int]) -> tuple[list[float], list[float]]:
    num_classes, total, inverse_sum = len(counts), sum(counts), sum(1 / n for n in counts)
    return [num_classes * n / total for n in counts], [num_classes / (n * inverse_sum) for n in counts]


def mean_sq(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)


def v_by_hand(a: float, eps: list[float], x0: list[float]) -> list[float]:
    """v = √ᾱ ε − √(1 − ᾱ) x0."""
    return [math.sqrt(a) * e - math.sqrt(1 - a) * x for e, x in zip(eps, x0, strict=True)]


def transferred_eps_by_hand(a: float, x_t: list[float], x0_ref: list[float]) -> list[float]:
    """ε̂ = (x_t − √ᾱ x0_j) / √(1 − ᾱ)."""
    return [(x - math.sqrt(a) * r) / math.sqrt(1 - a) for x, r in zip(x_t, x0_ref, strict=True)]


def noisy(x0: torch.Tensor, noise: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """x_t = √ᾱ x0 + √(1 − ᾱ) ε per sample."""
    a = torch.tensor(alphas).reshape(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# --- class weights and cm_loss -------------------------------------------------------------------------


def test_class_weights_follow_eq3():
    omega_con, omega_div = class_weights(CIFAR10_IR100)
    expected_con, expected_div = eq3_by_hand(CIFAR10_IR100)
    assert omega_con.dtype == omega_div.dtype == torch.float32
    assert omega_con.shape == omega_div.shape == (10,)
    assert values(omega_con) == pytest.approx(expected_con, rel=1e-6)
    assert values(omega_div) == pytest.approx(expected_div, rel=1e-6)


def pull_push_by_hand(counts, form, w_con=1.0, w_div=1.0):
    """Eq. 2's two coefficients (paper), or the net c_y = w_div ω_div − w_con ω_con split by sign (hinge)."""
    omega_con, omega_div = eq3_by_hand(counts)
    if form == "paper":
        return [w_con * c for c in omega_con], [w_div * d for d in omega_div]
    c = [w_div * d - w_con * k for k, d in zip(omega_con, omega_div, strict=True)]
    return [max(-v, 0.0) for v in c], [max(v, 0.0) for v in c]


@pytest.mark.parametrize("form", CM_FORMS)
@pytest.mark.parametrize("w_con, w_div", [(1.0, 1.0), (1.0, 0.2), (0.0, 1.0), (1.0, 0.0)])
def test_cm_weights_follow_eq3_and_the_form(form, w_con, w_div):
    weights = cm_weights(CIFAR10_IR100, form, w_con, w_div)
    pull, push = pull_push_by_hand(CIFAR10_IR100, form, w_con, w_div)
    assert values(weights.pull) == pytest.approx(pull, rel=1e-6, abs=1e-7)
    assert values(weights.push) == pytest.approx(push, rel=1e-6, abs=1e-7)
    if form == "hinge":  # every class is pulled or pushed, not both
        assert all(p == 0 or q == 0 for p, q in zip(pull, push, strict=True))


@pytest.mark.parametrize("form", CM_FORMS)
@pytest.mark.parametrize("counts", [[7] * 10, [3] * 7, [13] * 100])
def test_balanced_counts_give_exactly_zero_cm_loss(form, counts):
    omega_con, omega_div = class_weights(counts)
    assert torch.equal(omega_con, torch.ones(len(counts))) and torch.equal(omega_div, torch.ones(len(counts)))
    torch.manual_seed(0)
    labels = torch.randint(0, len(counts), (8,))
    eps_full, eps_general, target = torch.randn(3, 8, 3, 4, 4)
    loss, stats = cm_loss(eps_full, eps_general, labels, cm_weights(counts, form), form=form, margin=0.5, target=target)
    assert loss == 0 and stats["cm_loss"] == 0


def cm_loss_by_hand(
    form, eps_full, eps_general, labels, counts, w_con, w_div, margin, sample_weight, target=None, rho=None, upper=None
):
    """Eq. 2 sample by sample: returns (L_CM, L_con, L_div, per-sample distances). ``relative`` takes the margin of
    row i as rho · RMS(ε_θ − target)_i; ``band`` adds max(0, RMS gap − upper · RMS(ε_θ − target)_i)."""
    pull, push = pull_push_by_hand(counts, form, w_con, w_div)
    con = div = 0.0
    distances = []
    for i, y in enumerate(labels.tolist()):
        d = mean_sq(values(eps_full[i]), values(eps_general[i]))
        distances.append(d)
        con += sample_weight[i] * pull[y] * d
        if form == "paper":
            div += sample_weight[i] * push[y] * -d
        else:
            error = math.sqrt(mean_sq(values(eps_full[i]), values(target[i]))) if target is not None else None
            m = rho * error if form in ("relative", "band") else margin
            term = max(0.0, m - math.sqrt(d))
            if form == "band":
                term += max(0.0, math.sqrt(d) - upper * error)
            div += sample_weight[i] * push[y] * term
    batch = len(distances)
    return (con + div) / batch, con / batch, div / batch, distances


def spread_pair(batch: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ε_θ and ε_θg whose per-sample distance ranges from about 0.1 to 5."""
    generator = torch.Generator().manual_seed(seed)
    eps_full = torch.randn(batch, 2, 3, 3, generator=generator)
    scale = torch.linspace(0.2, 1.6, batch).reshape(-1, 1, 1, 1)
    return eps_full, eps_full + scale * torch.randn(batch, 2, 3, 3, generator=generator)


@pytest.mark.parametrize("form", CM_FORMS)
@pytest.mark.parametrize("w_con, w_div", [(1.0, 1.0), (1.0, 0.2), (0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "sample_weight"])
def test_cm_loss_matches_per_sample_loop(form, w_con, w_div, weighted):
    eps_full, eps_general = spread_pair()
    labels = torch.tensor([0, 9, 1, 8, 7, 2])
    sample_weight = [0.5, 2.0, 0.0, 1.0, 3.0, 1.0] if weighted else [1.0] * 6
    margin, (rho, upper) = 1.0, (0.4, 0.6) if form == "band" else (0.7, 0.9)
    noise = torch.randn(eps_full.shape, generator=torch.Generator().manual_seed(1))
    target = eps_full + torch.linspace(0.5, 2.5, 6).reshape(-1, 1, 1, 1) * noise
    loss, stats = cm_loss(
        eps_full,
        eps_general,
        labels,
        cm_weights(CIFAR10_IR100, form, w_con, w_div),
        form=form,
        margin=margin,
        relative_margin=rho,
        band_upper=upper,
        target=target,
        sample_weight=torch.tensor(sample_weight) if weighted else None,
    )
    expected, con, div, distances = cm_loss_by_hand(
        form, eps_full, eps_general, labels, CIFAR10_IR100, w_con, w_div, margin, sample_weight, target, rho, upper
    )
    if form in ("hinge", "hinge_general"):  # the margin is exercised on both sides
        assert min(distances) < margin**2 < max(distances)
    if form == "band":  # rows below the lower margin and above the upper wall
        ratios = [
            math.sqrt(d / mean_sq(values(f), values(t))) for d, f, t in zip(distances, eps_full, target, strict=True)
        ]
        assert min(ratios) < rho and max(ratios) > upper
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(stats["cm_loss"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(stats["cm_consistency"]) == pytest.approx(con, rel=1e-5, abs=1e-7)
    assert float(stats["cm_diversity"]) == pytest.approx(div, rel=1e-5, abs=1e-7)


def test_cm_stats_report_group_distances_and_nan_for_absent_groups():
    eps_full, eps_general = spread_pair()
    labels = torch.tensor([0, 9, 1, 8, 7, 2])  # Many: 0, 1, 2; Few: 7, 8, 9; no Medium (3-5)
    _, stats = cm_loss(eps_full, eps_general, labels, cm_weights(CIFAR10_IR100))
    distances = [mean_sq(values(a), values(b)) for a, b in zip(eps_full, eps_general, strict=True)]
    assert math.isnan(stats["cm_distance_medium"])
    many = [distances[i] for i, y in enumerate(labels.tolist()) if y <= 2]
    few = [distances[i] for i, y in enumerate(labels.tolist()) if y >= 6]
    assert float(stats["cm_distance_many"]) == pytest.approx(sum(many) / len(many), rel=1e-6)
    assert float(stats["cm_distance_few"]) == pytest.approx(sum(few) / len(few), rel=1e-6)
    assert all(not value.requires_grad and value.ndim == 0 for value in stats.values())
    # rows the loss leaves out (weight 0: label-dropped) are left out of the group distances too
    kept = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    _, stats = cm_loss(eps_full, eps_general, labels, cm_weights(CIFAR10_IR100), sample_weight=torch.tensor(kept))
    many = [distances[i] for i, y in enumerate(labels.tolist()) if y <= 2 and kept[i]]
    few = [distances[i] for i, y in enumerate(labels.tolist()) if y >= 6 and kept[i]]
    assert len(many) == 2 and len(few) == 1
    assert float(stats["cm_distance_many"]) == pytest.approx(sum(many) / len(many), rel=1e-6)
    assert float(stats["cm_distance_few"]) == pytest.approx(few[0], rel=1e-6)


def test_paper_form_gradient_flows_into_both_predictions():
    eps_full, eps_general = spread_pair()
    eps_full.requires_grad_(True)
    eps_general.requires_grad_(True)
    labels = torch.tensor([0, 9, 1, 8, 7, 2])
    loss, _ = cm_loss(eps_full, eps_general, labels, cm_weights(CIFAR10_IR100, "paper"), form="paper")
    loss.backward()
    omega_con, omega_div = eq3_by_hand(CIFAR10_IR100)
    batch, elements = eps_full.shape[0], eps_full[0].numel()
    for i, y in enumerate(labels.tolist()):
        coef = omega_con[y] - 1.0 * omega_div[y]
        expected = 2 * coef * (eps_full[i] - eps_general[i]).detach() / (batch * elements)
        torch.testing.assert_close(eps_full.grad[i], expected, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(eps_general.grad[i], -expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("form", ["hinge", "hinge_general", "relative", "band"])
def test_hinge_gradients_push_with_unit_slope_inside_the_margin_through_the_forms_predictions(form):
    """Pushed class y, gap g = ε_θ − ε_θg with RMS r = √d: d/dε_θg of push·max(0, m − r) is +push·g/(B·D·r) while
    r < m (a unit step in RMS, whatever the size of g), and 0 beyond m. ``hinge`` sends the opposite gradient into ε_θ;
    ``hinge_general``, ``relative`` and ``band`` hold ε_θ constant in the push (0 there), and ``relative`` and ``band``
    have m = rho·RMS(ε_θ − target) (the target gets no gradient). ``band``'s wall push·max(0, r − u·RMS(ε_θ −
    target)) gives −push·g/(B·D·r) past it: θ^g is pulled back. Pulled classes get the consistency gradient
    ±2·pull·g/(B·D) on both."""
    eps_full, eps_general = spread_pair()
    target = eps_full.detach() + 1.5 * torch.randn(eps_full.shape, generator=torch.Generator().manual_seed(3))
    for tensor in (eps_full, eps_general, target):
        tensor.requires_grad_(True)
    labels = torch.tensor([0, 9, 1, 8, 7, 9])
    rho, upper = 0.8, 0.85
    weights = cm_weights(CIFAR10_IR100, form)
    loss, _ = cm_loss(
        eps_full, eps_general, labels, weights, form=form, margin=1.0, relative_margin=rho, band_upper=upper,
        target=target,
    )  # fmt: skip
    loss.backward()
    pull, push = pull_push_by_hand(CIFAR10_IR100, form)
    batch, elements = eps_full.shape[0], eps_full[0].numel()
    inside = beyond = 0
    for i, y in enumerate(labels.tolist()):
        gap = (eps_full[i] - eps_general[i]).detach()
        rms = math.sqrt(mean_sq(values(eps_full[i]), values(eps_general[i])))
        if push[y] > 0:
            error = math.sqrt(mean_sq(values(eps_full[i]), values(target[i])))
            margin = rho * error if form in ("relative", "band") else 1.0
            inside += rms < margin
            on_general = push[y] * gap / (batch * elements * rms) if rms < margin else torch.zeros_like(gap)
            if form == "band" and rms > upper * error:
                beyond += 1
                on_general = -push[y] * gap / (batch * elements * rms)
            on_full = -on_general if form == "hinge" else torch.zeros_like(gap)
        else:
            on_full = 2 * pull[y] * gap / (batch * elements)
            on_general = -on_full
        torch.testing.assert_close(eps_full.grad[i], on_full, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(eps_general.grad[i], on_general, rtol=1e-4, atol=1e-7)
    assert 0 < inside < 4  # pushed rows on both sides of the margin
    assert (beyond > 0) == (form == "band")  # and past the band's wall
    assert target.grad is None or not target.grad.any()


def test_push_scale_multiplies_the_push_and_never_the_pull():
    eps_full, eps_general = spread_pair()
    labels = torch.tensor([0, 9, 1, 8, 7, 2])
    weights = cm_weights(CIFAR10_IR100)
    _, full = cm_loss(eps_full, eps_general, labels, weights, margin=2.0)
    _, ramped = cm_loss(eps_full, eps_general, labels, weights, margin=2.0, push_scale=0.25)
    assert float(full["cm_diversity"]) > 0 and float(full["cm_consistency"]) > 0
    assert float(ramped["cm_diversity"]) == pytest.approx(0.25 * float(full["cm_diversity"]), rel=1e-6)
    assert float(ramped["cm_consistency"]) == float(full["cm_consistency"])


def test_push_warmup_is_a_linear_ramp_over_the_steps():
    assert [push_warmup_scale(step, 4) for step in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert push_warmup_scale(0, 0) == 1.0


@pytest.mark.parametrize("bad", [10, -1])
def test_cm_loss_rejects_labels_outside_class_range(bad):
    eps_full, eps_general = spread_pair(batch=3)
    with pytest.raises(ValueError, match=rf"\[{bad}\]"):
        cm_loss(eps_full, eps_general, torch.tensor([0, bad, 2]), cm_weights(CIFAR10_IR100))


def test_cm_loss_refuses_bad_settings():
    eps_full, eps_general = spread_pair(batch=3)
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="margin must be positive"):
        cm_loss(eps_full, eps_general, labels, cm_weights(CIFAR10_IR100), margin=0.0)
    with pytest.raises(ValueError, match="unknown CM form"):
        cm_weights(CIFAR10_IR100, "repel")
    with pytest.raises(ValueError, match="needs the diffusion target"):
        cm_loss(eps_full, eps_general, labels, cm_weights(CIFAR10_IR100), form="relative")
    with pytest.raises(ValueError, match="band_upper"):
        cm_loss(eps_full, eps_general, labels, cm_weights(CIFAR10_IR100), form="band", target=eps_full, band_upper=0.5)


# --- boundedness -----------------------------------------------------------------------------------------


def toy_step_losses(form: str, w_div: float, steps: int = 300) -> list[float]:
    """Eq. 4 on a toy class-conditional model: ε(y) = (W^g + B A) φ(y) with φ(y) one-hot, fitted by Adam on
    L_base + L_CM. Returns the total loss per step."""
    counts = [100, 40, 10]
    torch.manual_seed(0)
    targets = torch.randn(3, 4)
    w_g = torch.nn.Parameter(torch.randn(4, 3) * 0.1)
    a = torch.nn.Parameter(torch.randn(1, 3))
    b = torch.nn.Parameter(torch.zeros(4, 1))  # the expert starts at exactly zero, as a LoRA does
    optimizer = torch.optim.Adam([w_g, a, b], lr=0.05)
    weights = cm_weights(counts, form, 1.0, w_div)
    labels = torch.tensor([0] * 10 + [1] * 4 + [2])
    phi = torch.eye(3)[labels]
    losses = []
    for _ in range(steps):
        full, general = phi @ (w_g + b @ a).T, phi @ w_g.T
        base = (full - targets[labels]).pow(2).mean()
        cm, stats = cm_loss(full, general, labels, weights, form=form, margin=0.3)
        loss = base + cm
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, stats


def test_paper_form_is_unbounded_below_even_where_the_old_rule_called_it_stable():
    """docs/method.md: for a fixed merged W the expert can grow a pushed class's distance at no cost to L_base, so Eq. 2
    as written is unbounded below for any λ > 0 once some class has c_y > 0. With w_div = 0.4 the rarest class here
    has c_y = 0.57 < 1 ("stable" by a λ·c_y < 1 rule), and the toy model's loss still runs away."""
    omega_con, omega_div = eq3_by_hand([100, 40, 10])
    assert 0 < 0.4 * omega_div[2] - omega_con[2] < 1
    losses, _ = toy_step_losses("paper", 0.4, steps=600)
    assert min(losses) < -100
    assert cm_lower_bound(cm_weights([100, 40, 10], "paper", 1.0, 0.4), "paper") == -math.inf


def test_hinge_never_goes_below_zero_and_leaves_the_saddle():
    """The hinge form's loss stays >= its stated minimum 0 and the expert, started at exactly 0, is taken into use:
    the rare class's RMS gap reaches the margin while the frequent class's stays near 0."""
    assert cm_lower_bound(cm_weights([100, 40, 10]), "hinge") == 0.0
    losses, stats = toy_step_losses("hinge", 1.0)
    assert min(losses) >= -1e-7 and losses[-1] < losses[0]
    assert float(stats["cm_distance_few"]) > 0.8 * 0.3**2 and float(stats["cm_distance_many"]) < 1e-3


def test_check_cm_bounded_refuses_the_unbounded_paper_form_by_name():
    weights = cm_weights(CIFAR10_IR100, "paper", 1.0, 0.2)
    pull, push = pull_push_by_hand(CIFAR10_IR100, "paper", 1.0, 0.2)
    assert [y for y in range(10) if push[y] > pull[y]] == [7, 8, 9]
    with pytest.raises(ValueError, match="unbounded below") as error:
        check_cm_bounded(weights, "paper", class_names=CIFAR10_NAMES)
    message = str(error.value)
    for name in ("horse", "ship", "truck", "--cm_form hinge", "--allow_unbounded_cm"):
        assert name in message
    assert "frog" not in message
    with pytest.warns(UserWarning, match="truck"):
        assert check_cm_bounded(weights, "paper", class_names=CIFAR10_NAMES, allow_unbounded=True) == -math.inf
    assert check_cm_bounded(cm_weights(CIFAR10_IR100, "paper", 1.0, 0.0), "paper") == 0.0  # consistency only
    assert check_cm_bounded(cm_weights(CIFAR10_IR100), "hinge") == 0.0
    table = format_cm_table(weights, CIFAR10_IR100, CIFAR10_NAMES)
    assert "truck" in table and "5000" in table


# --- the partial general pass (--cm_general_fraction) ------------------------------------------------------


def test_importance_rows_give_an_unbiased_estimate_of_the_batch_mean():
    """E over draws of mean_j factor_j · L[row_j] equals the batch mean of L (rows of weight 0 contribute 0)."""
    torch.manual_seed(0)
    row_weights = torch.tensor([4.0, 0.0, 1.0, 0.5, 2.5, 0.0, 1.0, 3.0])
    per_row = torch.tensor([0.3, 9.0, -1.2, 2.0, 0.1, 7.0, -0.4, 1.5]) * (row_weights > 0)
    expected = sum(per_row.tolist()) / 8
    k, draws = 3, 40000
    estimates = []
    for _ in range(draws):
        rows, factor = importance_rows(row_weights, torch.rand(k))
        assert set(rows.tolist()) <= {0, 2, 3, 4, 6, 7}  # weight-0 rows are never drawn
        estimates.append(float((factor * per_row[rows]).mean()))
    mean = sum(estimates) / draws
    spread = (sum((e - mean) ** 2 for e in estimates) / (draws - 1)) ** 0.5 / draws**0.5
    assert abs(mean - expected) < 4 * spread
    probability = [w / sum(row_weights.tolist()) for w in row_weights.tolist()]
    rows, factor = importance_rows(row_weights, torch.tensor([0.0, 0.5, 0.99]))
    assert factor.tolist() == pytest.approx([1 / (8 * probability[r]) for r in rows.tolist()])
    rows, factor = importance_rows(torch.zeros(4), torch.rand(2))  # nothing to estimate: zero weight
    assert factor.tolist() == [0.0, 0.0] and rows.max() < 4


# --- non-finite guard ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_names_the_non_finite_term_and_step(bad):
    with pytest.raises(NonFiniteLossError) as error:
        check_finite(
            12,
            base_loss=torch.tensor(0.031),
            cm_consistency=torch.tensor(0.002),
            cm_diversity=torch.tensor(bad),
        )
    message = str(error.value)
    assert isinstance(error.value, RuntimeError)
    assert f"step 12: cm_diversity = {bad}" in message
    assert "base_loss = 0.031" in message and "cm_consistency = 0.002" in message
    assert "learning rate" in message


def test_check_finite_passes_finite_terms():
    assert check_finite(3, base_loss=torch.tensor(0.5), cm_loss=torch.tensor(-0.1)) is None


# --- ddpm ----------------------------------------------------------------------------------------------


def test_ddpm_epsilon_and_v_prediction_targets():
    torch.manual_seed(0)
    x0, noise, pred = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    timesteps = torch.tensor([3, 400, 999])
    labels = torch.tensor([0, 1, 2])
    alphas = [make_scheduler().alphas_cumprod[t].item() for t in timesteps.tolist()]
    x_t = noisy(x0, noise, alphas)

    loss, stats = build_objective("ddpm", make_scheduler())(
        pred, x0=x0, noise=noise, x_t=x_t, timesteps=timesteps, labels=labels
    )
    assert loss.item() == pytest.approx(mean_sq(values(pred), values(noise)), rel=1e-6)
    assert float(stats["base_loss"]) == loss.item()

    loss, _ = build_objective("ddpm", make_scheduler("v_prediction"))(
        pred, x0=x0, noise=noise, x_t=x_t, timesteps=timesteps, labels=labels
    )
    v = []
    for i, a in enumerate(alphas):
        v += v_by_hand(a, values(noise[i]), values(x0[i]))
    assert loss.item() == pytest.approx(mean_sq(values(pred), v), rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_min_snr_gamma_weighting(prediction_type):
    torch.manual_seed(1)
    x0, noise, pred = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    timesteps = torch.tensor([5, 100, 600, 999])
    scheduler = make_scheduler(prediction_type)
    alphas = [scheduler.alphas_cumprod[t].item() for t in timesteps.tolist()]
    objective = build_objective("ddpm", scheduler, snr_gamma=5.0)
    loss, _ = objective(
        pred,
        x0=x0,
        noise=noise,
        x_t=noisy(x0, noise, alphas),
        timesteps=timesteps,
        labels=torch.zeros(4).long(),
    )
    expected = 0.0
    for i, a in enumerate(alphas):
        snr = a / (1 - a)
        if prediction_type == "epsilon":
            target, weight = values(noise[i]), min(snr, 5.0) / snr
        else:
            target = v_by_hand(a, values(noise[i]), values(x0[i]))
            weight = min(snr, 5.0) / (snr + 1)
        expected += weight * mean_sq(values(pred[i]), target) / 4
    assert {min(a / (1 - a), 5.0) for a in alphas} > {5.0}  # both sides of γ are exercised
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["ddpm", "cbdm"])
def test_focal_weighting_of_the_per_sample_loss(name):
    """+Focal: each sample's mean squared error L_i is weighted by (1 - exp(-L_i))^gamma (Lin et al. with
    -log p = L), gradient included; gamma = 0 is the plain loss. CBDM's data term gets the same weighting (its
    regulariser is 0 here: the extra prediction equals the own one)."""
    torch.manual_seed(2)
    x0, noise = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    pred = (noise + torch.tensor([0.1, 0.7, 2.0]).reshape(3, 1, 1, 1) * torch.randn(3, 1, 2, 2)).requires_grad_()
    timesteps = torch.tensor([10, 500, 900])
    scheduler = make_scheduler()
    alphas = [scheduler.alphas_cumprod[t].item() for t in timesteps.tolist()]
    inputs = dict(x0=x0, noise=noise, x_t=noisy(x0, noise, alphas), timesteps=timesteps, labels=torch.zeros(3).long())
    counts = {"class_counts": [5]} if name == "cbdm" else {}
    if name == "cbdm":
        inputs["pred_extra"] = pred.detach().clone()
    losses = [mean_sq(values(pred[i]), values(noise[i])) for i in range(3)]
    assert min(losses) < 0.1 < 1 < max(losses)  # easy and hard samples
    for gamma in (0.0, 2.0):
        loss, _ = build_objective(name, scheduler, focal_gamma=gamma, **counts)(pred, **inputs)
        expected = sum((1 - math.exp(-L)) ** gamma * L for L in losses) / 3
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    # d/dL of (1 - e^-L)^2 L = 2(1 - e^-L) e^-L L + (1 - e^-L)^2, times dL/dpred = 2(pred - noise)/4, over 3 samples
    (grad,) = torch.autograd.grad(loss, pred)
    for i, L in enumerate(losses):
        slope = 2 * (1 - math.exp(-L)) * math.exp(-L) * L + (1 - math.exp(-L)) ** 2
        expected_grad = [slope * 2 * (p - e) / 4 / 3 for p, e in zip(values(pred[i]), values(noise[i]), strict=True)]
        assert values(grad[i]) == pytest.approx(expected_grad, rel=1e-4)


def test_class_weights_refuse_empty_classes():
    with pytest.raises(ValueError, match="0"):
        class_weights([5, 0, 3])


def test_unknown_objective_or_prediction_type_is_refused():
    with pytest.raises(ValueError, match="ddpm, cbdm, oc"):
        build_objective("focal", make_scheduler(), class_counts=CIFAR10_IR100)
    with pytest.raises(ValueError, match="'sample'"):
        build_objective("ddpm", make_scheduler("sample"))
    assert build_objective("ddpm", make_scheduler()).extra_labels(torch.tensor([0, 1])) is None


# --- cbdm ----------------------------------------------------------------------------------------------


def cbdm_case():
    torch.manual_seed(2)
    x0, noise = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    pred = torch.randn(4, 2, 2, 2, requires_grad=True)
    pred_extra = torch.randn(4, 2, 2, 2, requires_grad=True)
    timesteps = torch.tensor([10, 500, 999, 250])
    alphas = [make_scheduler().alphas_cumprod[t].item() for t in timesteps.tolist()]
    return x0, noise, noisy(x0, noise, alphas), pred, pred_extra, timesteps


def test_cbdm_loss_and_stop_gradients_match_by_hand():
    x0, noise, x_t, pred, pred_extra, timesteps = cbdm_case()
    dropped = torch.tensor([False, True, False, False])
    tau, gamma = 1.5, 0.5
    objective = build_objective("cbdm", make_scheduler(), class_counts=[600, 300, 100], tau=tau, gamma=gamma)
    loss, stats = objective(
        pred,
        x0=x0,
        noise=noise,
        x_t=x_t,
        timesteps=timesteps,
        labels=torch.tensor([0, 1, 2, 0]),
        pred_extra=pred_extra,
        label_dropped=dropped,
    )
    base = mean_sq(values(pred), values(noise))
    kept = [i for i in range(4) if not dropped[i]]
    weights = [tau * t / 1000 for t in timesteps.tolist()]
    reg = sum(weights[i] * (1 + gamma) * mean_sq(values(pred[i]), values(pred_extra[i])) for i in kept) / 3
    assert float(stats["base_mse"]) == pytest.approx(base, rel=1e-6)
    assert float(stats["cbdm_reg"]) == pytest.approx(reg, rel=1e-6)
    assert loss.item() == pytest.approx(base + reg, rel=1e-6)

    loss.backward()
    elements, n_kept = 8, 3
    for i in range(4):
        gap = (pred[i] - pred_extra[i]).detach()
        expected_pred = 2 * (pred[i] - noise[i]).detach() / (4 * elements)
        expected_extra = torch.zeros_like(gap)
        if i in kept:
            # sg(ε(y')) in the first term, sg(ε(y)) in the second: each prediction gets only its own term.
            expected_pred = expected_pred + 2 * weights[i] * gap / (n_kept * elements)
            expected_extra = -2 * gamma * weights[i] * gap / (n_kept * elements)
        torch.testing.assert_close(pred.grad[i], expected_pred, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(pred_extra.grad[i], expected_extra, rtol=1e-5, atol=1e-8)


def test_cbdm_has_no_regularizer_on_a_label_dropped_batch():
    x0, noise, x_t, pred, pred_extra, timesteps = cbdm_case()
    objective = build_objective("cbdm", make_scheduler(), class_counts=[600, 300, 100])
    loss, stats = objective(
        pred,
        x0=x0,
        noise=noise,
        x_t=x_t,
        timesteps=timesteps,
        labels=torch.tensor([0, 1, 2, 0]),
        pred_extra=pred_extra,
        label_dropped=torch.ones(4, dtype=torch.bool),
    )
    assert stats["cbdm_reg"] == 0
    assert loss.item() == pytest.approx(mean_sq(values(pred), values(noise)), rel=1e-6)
    loss.backward()
    assert pred_extra.grad is None or torch.count_nonzero(pred_extra.grad) == 0


def test_cbdm_requires_the_extra_prediction():
    x0, noise, x_t, pred, _, timesteps = cbdm_case()
    objective = build_objective("cbdm", make_scheduler(), class_counts=[600, 300, 100])
    with pytest.raises(ValueError, match="pred_extra"):
        objective(pred, x0=x0, noise=noise, x_t=x_t, timesteps=timesteps, labels=torch.tensor([0, 1, 2, 0]))


def test_cbdm_extra_labels_follow_class_frequencies():
    objective = build_objective("cbdm", make_scheduler(), class_counts=[600, 300, 100])
    labels = torch.zeros(20000, dtype=torch.long)
    extra = objective.extra_labels(labels, generator=torch.Generator().manual_seed(0))
    assert extra.shape == labels.shape and extra.device == labels.device
    frequencies = [(extra == c).float().mean().item() for c in range(3)]
    assert frequencies == pytest.approx([0.6, 0.3, 0.1], abs=0.015)


# --- oc ------------------------------------------------------------------------------------------------


def test_oc_selection_probs_match_softmax_formula():
    torch.manual_seed(3)
    x0, x_t = torch.randn(5, 2, 2, 2), torch.randn(5, 2, 2, 2)
    alphas = [make_scheduler().alphas_cumprod[t].item() for t in (50, 200, 500, 800, 999)]
    probs = oc_selection_probs(x_t, x0, torch.tensor(alphas), 1 - torch.tensor(alphas))
    for i in range(5):
        xt_i = values(x_t[i])
        logits = []
        for j in range(5):
            sq = sum((x - math.sqrt(alphas[i]) * r) ** 2 for x, r in zip(xt_i, values(x0[j]), strict=True))
            logits.append(-sq / (2 * (1 - alphas[i])))
        top = max(logits)
        total = sum(math.exp(v - top) for v in logits)
        assert values(probs[i]) == pytest.approx([math.exp(v - top) / total for v in logits], abs=1e-6)


def test_oc_keeps_self_at_tiny_t():
    torch.manual_seed(4)
    x0, noise = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    timesteps = torch.zeros(4, dtype=torch.long)
    scheduler = make_scheduler()
    alpha = scheduler.alphas_cumprod[0].item()
    assert alpha == pytest.approx(0.9999)
    x_t = noisy(x0, noise, [alpha] * 4)
    labels = torch.tensor([0, 0, 0, 0])  # one class: only the selection probabilities can keep self
    objective = build_objective("oc", scheduler, class_counts=[50, 30, 20])
    references = objective.select_references(x_t, x0, timesteps, labels)
    assert references.tolist() == [0, 1, 2, 3]
    # The transfer formula itself recovers ε for j = i, up to float error.
    transferred = (x_t - math.sqrt(alpha) * x0) / math.sqrt(1 - alpha)
    torch.testing.assert_close(transferred, noise, atol=1e-4, rtol=0)
    targets = objective.targets(x0, noise, x_t, timesteps, references)
    torch.testing.assert_close(targets, noise, atol=1e-4, rtol=0)
    _, stats = objective(noise, x0=x0, noise=noise, x_t=x_t, timesteps=timesteps, labels=labels)
    assert stats["oc_ref_changed"] == 0 and float(stats["base_mse"]) < 1e-8


def oc_case(prediction_type: str = "epsilon"):
    """Sample 0 (majority) sits on sample 1's x0 (rare); sample 2 (rare) sits on sample 3's x0 (majority)."""
    torch.manual_seed(5)
    scheduler = make_scheduler(prediction_type)
    timesteps = torch.tensor([100, 300, 100, 50])
    alphas = [scheduler.alphas_cumprod[t].item() for t in timesteps.tolist()]
    x0, noise = 2 * torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    x_t = noisy(x0, noise, alphas)
    x_t[0] = math.sqrt(alphas[0]) * x0[1] + 0.01 * noise[0]
    x_t[2] = math.sqrt(alphas[2]) * x0[3] + 0.01 * noise[2]
    objective = build_objective("oc", scheduler, class_counts=[50, 30, 20])
    return objective, x0, noise, x_t, timesteps, alphas, torch.tensor([0, 2, 2, 0])


def test_oc_reference_must_be_at_least_as_frequent():
    objective, x0, noise, x_t, timesteps, alphas, labels = oc_case()
    probs = oc_selection_probs(x_t, x0, torch.tensor(alphas), 1 - torch.tensor(alphas))
    assert probs[0, 1] > 0.999 and probs[2, 3] > 0.999
    for seed in range(5):
        references = objective.select_references(
            x_t, x0, timesteps, labels, generator=torch.Generator().manual_seed(seed)
        )
        assert references[0] == 0  # its only likely reference (sample 1) is of a rarer class
        assert references[2] == 3  # a majority reference is kept
    dropped = torch.tensor([False, False, True, False])
    assert objective.select_references(x_t, x0, timesteps, labels, label_dropped=dropped)[2] == 2
    # the authors' trainer: a label-dropped sample is transferred by its true class like the others
    authors = build_objective("oc", objective.scheduler, class_counts=[50, 30, 20], transfer_label_dropped=True)
    references = authors.select_references(x_t, x0, timesteps, labels, label_dropped=dropped)
    assert references[2] == 3 and references[0] == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_oc_target_formula_by_hand(prediction_type):
    objective, x0, noise, x_t, timesteps, alphas, _ = oc_case(prediction_type)
    references = torch.tensor([0, 1, 3, 3])
    targets = objective.targets(x0, noise, x_t, timesteps, references)
    for i, j in enumerate(references.tolist()):
        a = alphas[i]
        eps_hat = values(noise[i]) if i == j else transferred_eps_by_hand(a, values(x_t[i]), values(x0[j]))
        expected = eps_hat if prediction_type == "epsilon" else v_by_hand(a, eps_hat, values(x0[j]))
        assert values(targets[i]) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_oc_loss_by_hand_on_a_pinned_batch():
    objective, x0, noise, x_t, timesteps, alphas, labels = oc_case()
    x_t[1] = math.sqrt(alphas[1]) * x0[1] + 0.01 * noise[1]  # samples 1 and 3 sit on their own x0
    x_t[3] = math.sqrt(alphas[3]) * x0[3] + 0.01 * noise[3]
    probs = oc_selection_probs(x_t, x0, torch.tensor(alphas), 1 - torch.tensor(alphas))
    assert min(probs[0, 1], probs[1, 1], probs[2, 3], probs[3, 3]) > 0.99  # the draw is all but certain
    pred = torch.randn_like(x0)
    loss, stats = objective(pred, x0=x0, noise=noise, x_t=x_t, timesteps=timesteps, labels=labels)
    target = values(noise[0]) + values(noise[1])
    target += transferred_eps_by_hand(alphas[2], values(x_t[2]), values(x0[3]))
    target += values(noise[3])
    assert loss.item() == pytest.approx(mean_sq(values(pred), target), rel=1e-5)
    assert float(stats["oc_ref_changed"]) == 0.25
    assert float(stats["base_loss"]) == loss.item()


def test_oc_works_for_batch_size_one():
    torch.manual_seed(6)
    x0, noise, pred = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    scheduler = make_scheduler()
    x_t = noisy(x0, noise, [scheduler.alphas_cumprod[400].item()])
    objective = build_objective("oc", scheduler, class_counts=[50, 30, 20])
    loss, stats = objective(pred, x0=x0, noise=noise, x_t=x_t, timesteps=torch.tensor([400]), labels=torch.tensor([2]))
    assert loss.item() == pytest.approx(mean_sq(values(pred), values(noise)), rel=1e-6)
    assert stats["oc_ref_changed"] == 0
