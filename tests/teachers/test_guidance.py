"""The ground-truth weighting of self-distillation (kdforge.teachers.guidance, Borup & Andersen 2021):
the closed form against a brute-force minimisation of an explicit kernel ridge regression's held-out
error, constructed cases where the answer is known, clipping, and the deep-net estimate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ShapeError
from kdforge.students.vision import build_vision_model
from kdforge.teachers import (
    estimate_label_weight,
    optimal_label_weight,
    penultimate_features,
    ridge_smoother,
)


def _krr(seed: int = 0, n: int = 30, n_val: int = 20, c: int = 3, lam: float = 0.3):
    """An explicit RBF kernel ridge regression: A_val = K_val (K + lam I)^-1, A_train = K (K + lam I)^-1,
    one-hot labels of a noisy linear rule, and f_prev = the KRR's own fit to the labels (one step
    of self-distillation)."""
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n_val, 2, generator=g, dtype=torch.float64)
    w = torch.randn(2, c, generator=g, dtype=torch.float64)

    def onehot(z):
        return torch.nn.functional.one_hot((z @ w + 0.8 * torch.randn(len(z), c, generator=g,
                                                                       dtype=torch.float64)).argmax(1), c).double()

    def k(a, b):
        return torch.exp(-torch.cdist(a, b) ** 2 / 2.0)

    inv = torch.linalg.inv(k(x, x) + lam * torch.eye(n, dtype=torch.float64))
    a_val, a_train = k(xv, x) @ inv, k(x, x) @ inv
    y, yv = onehot(x), onehot(xv)
    return a_val, yv, y, a_train @ y


def _heldout_errors(a_val, yv, y, f, alphas):
    """||y_val - A_val (a y + (1 - a) f)||^2 for every a of ``alphas`` [G], from the definition."""
    targets = alphas[:, None, None] * y + (1 - alphas[:, None, None]) * f  # [G, n, C]
    return ((yv - a_val @ targets) ** 2).sum((1, 2))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_closed_form_equals_a_grid_minimisation_of_kernel_ridge_heldout_error(seed):
    a_val, yv, y, f = _krr(seed)
    grid = torch.linspace(-3.0, 4.0, 70001, dtype=torch.float64)  # step 1e-4
    errors = _heldout_errors(a_val, yv, y, f, grid)
    alpha = optimal_label_weight(a_val, yv, y, f, clip=False)
    assert alpha == pytest.approx(float(grid[errors.argmin()]), abs=1e-4)
    assert float(_heldout_errors(a_val, yv, y, f, torch.tensor([alpha], dtype=torch.float64))) <= float(errors.min())
    # clipped: the best of the grid restricted to [0, 1] (a convex quadratic: the clipped minimiser)
    inside = (grid >= 0) & (grid <= 1)
    best01 = float(grid[inside][errors[inside].argmin()])
    assert optimal_label_weight(a_val, yv, y, f) == pytest.approx(best01, abs=1e-4)
    assert 0.0 <= optimal_label_weight(a_val, yv, y, f) <= 1.0


@settings(max_examples=25, deadline=None)
@given(a=st.floats(-0.8, 1.8), seed=st.integers(0, 50))
def test_heldout_targets_made_of_a_mixture_recover_its_weight(a, seed):
    """y_val = A_val (a y + (1 - a) f): the held-out error is zero at a, so alpha* = a (clipped: into [0, 1])."""
    a_val, _, y, f = _krr(seed)
    yv = a_val @ (a * y + (1 - a) * f)
    assert optimal_label_weight(a_val, yv, y, f, clip=False) == pytest.approx(a, abs=1e-8)
    assert optimal_label_weight(a_val, yv, y, f) == pytest.approx(min(1.0, max(0.0, a)), abs=1e-8)


def test_a_useless_previous_model_gets_alpha_one_and_the_heldout_optimum_gets_zero():
    a_val, _, y, _ = _krr(5)
    noise = torch.rand(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    useless = noise / noise.sum(1, keepdim=True)  # random probabilities, unrelated to the labels
    # the labels' fit is the held-out optimum: any other target can only hurt
    assert optimal_label_weight(a_val, a_val @ y, y, useless) == pytest.approx(1.0)
    # f_prev's fit is the held-out optimum: the labels can only hurt
    assert optimal_label_weight(a_val, a_val @ useless, y, useless) == pytest.approx(0.0, abs=1e-12)


def test_clipping_and_an_undetermined_weight():
    a_val, _, y, f = _krr(2)
    assert optimal_label_weight(a_val, a_val @ (1.7 * y - 0.7 * f), y, f) == 1.0
    assert optimal_label_weight(a_val, a_val @ (-0.4 * y + 1.4 * f), y, f) == 0.0
    assert optimal_label_weight(a_val, a_val @ (-0.4 * y + 1.4 * f), y, f, clip=False) == pytest.approx(-0.4)
    assert optimal_label_weight(a_val, a_val @ f, y, y.clone()) == 1.0  # f_prev == labels: alpha changes nothing


def test_shape_errors_name_the_fix():
    a_val, yv, y, f = _krr(0)
    with pytest.raises(ShapeError, match="pass A_val"):
        optimal_label_weight(a_val.T, yv, y, f)
    with pytest.raises(ShapeError, match="prev_probs"):
        estimate_label_weight(torch.randn(5, 4), torch.randn(3, 4), torch.zeros(5, dtype=torch.long),
                              torch.zeros(3, dtype=torch.long), torch.rand(4, 3))


def _features(seed: int, n: int, p: int = 12, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, p, generator=g)
    w = torch.randn(p, c, generator=g)
    probs = torch.softmax(phi @ w, 1)
    labels = torch.multinomial(probs, 1, generator=g).flatten()
    return phi, labels, probs


def test_estimate_matches_the_explicit_ridge_smoother_and_ranks_teachers():
    phi, labels, probs = _features(0, 400)
    fit, held = slice(0, 300), slice(300, 400)
    useless = torch.softmax(torch.randn(300, 4, generator=torch.Generator().manual_seed(9)) * 3, 1)
    est_useless = estimate_label_weight(phi[fit], phi[held], labels[fit], labels[held], useless)
    est_true = estimate_label_weight(phi[fit], phi[held], labels[fit], labels[held], probs[fit])
    # the eigen-decomposed path equals the explicit smoother at the chosen ridge (constant column added)
    ones = torch.ones(400, 1)
    a_val = ridge_smoother(torch.cat([phi[fit], ones[fit]], 1), torch.cat([phi[held], ones[held]], 1), est_true.ridge)
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    assert est_true.alpha_unclipped == pytest.approx(
        optimal_label_weight(a_val, onehot[held], onehot[fit], probs[fit].double(), clip=False), rel=1e-6, abs=1e-9)
    # the true class probabilities are a better target than the sampled labels; noise is worse
    assert est_useless.alpha > 0.8 and est_true.alpha < 0.5
    assert est_true.heldout_mse_alpha <= min(est_true.heldout_mse_labels, est_true.heldout_mse_previous) + 1e-12
    assert (est_true.n_fit, est_true.n_heldout) == (300, 100)


@pytest.mark.parametrize("arch, kwargs", [("small_cnn", {}), ("mlp", {"hidden": [16]})])
def test_penultimate_features_are_the_classifiers_input(arch, kwargs):
    torch.manual_seed(0)
    model = build_vision_model(arch, **kwargs).train()
    x = torch.randn(7, 1, 28, 28)
    phi = penultimate_features(model, x, batch_size=3)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(last(phi), model(x))
