"""Ground-truth weighting of self-distillation: the per-generation optimal label weight.

Borup & Andersen 2021, *Even your Teacher Needs Guidance: Ground-Truth Targets Dampen
Regularization Imposed by Self-Distillation* (NeurIPS). In iterative self-distillation step
``t`` fits the target

    z_t = alpha_t * y + (1 - alpha_t) * f_{t-1}(X)

(the ground truth mixed with the previous model's outputs on the training inputs). For kernel
ridge regression the paper gives a closed form for the optimal ``alpha_t`` and shows how to
estimate it for deep networks. The full paper is not available to us; what follows is **our
reading** of the abstract, derived here from scratch:

* **Closed form** (:func:`optimal_label_weight`). If the fit is a *linear smoother* of its target
  (kernel ridge: predictions on held-out inputs ``f_val = A_val z`` with ``A_val [n_val, n]``),
  the held-out squared error ``E(alpha) = ||y_val - A_val (alpha y + (1 - alpha) f_prev)||^2``
  is a quadratic in ``alpha``. With ``d = A_val (y - f_prev)`` and ``r = y_val - A_val f_prev``
  (both ``[n_val, C]``), ``E(alpha) = ||r - alpha d||^2``, minimised at

      alpha* = <r, d> / ||d||^2        (Frobenius inner product), clipped to [0, 1].

  ``alpha* = 1`` when ``f_prev`` is useless (the labels alone are the held-out optimum);
  ``alpha* = 0`` when ``A_val f_prev`` already is; ``||d|| = 0`` (previous model = labels on the
  training set) leaves ``alpha`` undetermined: we return 1 (the labels; the mixture is the same).

* **Deep-net estimate** (:func:`estimate_label_weight`). A network is not a linear smoother; we
  take the smoother of a ridge regression on the previous generation's penultimate features
  ``Phi`` (plus a constant column): ``A_val = Phi_val (Phi^T Phi + lambda I)^{-1} Phi^T``, with
  ``y`` one-hot labels ``[n, C]`` and ``f_prev`` the previous generation's softmax ``[n, C]`` on
  the fitting split of the *labelled training images*; the held-out rows are another split of
  the labelled training images (never the test set). ``lambda`` is chosen on the held-out split
  from a grid (the one that fits the labels alone best), relative to the mean eigenvalue of
  ``Phi^T Phi``. The previous model must not have trained on the held-out rows (features that
  have seen their labels fit them like the labels and drive ``alpha`` to 0): the recipe estimates
  ``alpha_g`` on a *shadow* chain trained without them (``recipes/born_again_guidance.py``).

The recipe wiring (``teacher: {source: born_again, label_weight: auto}``) lives in
``recipes/fashion_mnist.py``; docs/regimes.md "Ground-truth guidance" has the mapping onto loss
terms and the measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kdforge.errors import ShapeError

__all__ = [
    "GuidanceEstimate",
    "estimate_label_weight",
    "optimal_label_weight",
    "penultimate_features",
    "ridge_smoother",
]

#: the ridge strengths tried, relative to the mean eigenvalue of ``Phi^T Phi``
RIDGE_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def optimal_label_weight(a_val: torch.Tensor, y_val: torch.Tensor, y: torch.Tensor,
                         f_prev: torch.Tensor, *, clip: bool = True) -> float:
    """``alpha*`` minimising ``||y_val - A_val (alpha y + (1 - alpha) f_prev)||^2`` (module docstring).

    Args:
        a_val: the smoother ``[n_val, n]``: held-out predictions of a fit to a target ``[n, C]``.
        y_val: held-out targets ``[n_val, C]`` (one-hot labels).
        y: training targets ``[n, C]`` (one-hot labels).
        f_prev: the previous model's outputs on the training inputs ``[n, C]``.
        clip: clip to ``[0, 1]`` (False: the unconstrained minimiser).
    """
    if y.shape != f_prev.shape or a_val.shape != (y_val.shape[0], y.shape[0]) or y_val.shape[1:] != y.shape[1:]:
        raise ShapeError(f"shapes do not fit: A_val {tuple(a_val.shape)}, y_val {tuple(y_val.shape)}, "
                         f"y {tuple(y.shape)}, f_prev {tuple(f_prev.shape)}",
                         "pass A_val [n_val, n], y_val [n_val, C], y and f_prev [n, C]")
    a, yv, yt, fp = (t.double() for t in (a_val, y_val, y, f_prev))
    d = a @ (yt - fp)
    r = yv - a @ fp
    den = float((d * d).sum())
    if den <= 1e-12 * max(1.0, float((r * r).sum())):
        return 1.0  # the previous model equals the labels on the training set: alpha changes nothing
    alpha = float((r * d).sum()) / den
    return min(1.0, max(0.0, alpha)) if clip else alpha


def ridge_smoother(phi: torch.Tensor, phi_val: torch.Tensor, ridge: float) -> torch.Tensor:
    """``A_val = Phi_val (Phi^T Phi + ridge I)^{-1} Phi^T`` ``[n_val, n]`` (float64) for features
    ``phi [n, p]`` and ``phi_val [n_val, p]`` (add a constant column yourself for an intercept)."""
    p, pv = phi.double(), phi_val.double()
    gram = p.T @ p + ridge * torch.eye(p.shape[1], dtype=torch.float64)
    return pv @ torch.linalg.solve(gram, p.T)


@dataclass(frozen=True)
class GuidanceEstimate:
    """One generation's estimate: ``alpha`` (clipped) weights the labels, ``1 - alpha`` the
    previous generation; ``ridge`` the chosen absolute ``lambda``; errors are the held-out mean
    squared errors (per image) of the labels alone, the previous model alone and the mixture."""

    alpha: float
    alpha_unclipped: float
    ridge: float
    n_fit: int
    n_heldout: int
    heldout_mse_labels: float
    heldout_mse_previous: float
    heldout_mse_alpha: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _smoother_family(phi: torch.Tensor, phi_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-decomposition ``Phi^T Phi = V diag(s) V^T``: ``A_val(lambda) = (Phi_val V) diag(1/(s+lambda)) (Phi V)^T``."""
    s, v = torch.linalg.eigh(phi.T @ phi)
    return s.clamp_min(0.0), phi_val @ v, phi @ v


def estimate_label_weight(phi: torch.Tensor, phi_val: torch.Tensor, labels: torch.Tensor, labels_val: torch.Tensor,
                          prev_probs: torch.Tensor, *, num_classes: int | None = None,
                          ridges: Sequence[float] = RIDGE_GRID) -> GuidanceEstimate:
    """The deep-net estimate of ``alpha*`` (module docstring).

    Args:
        phi: the previous generation's penultimate features on the fitting split ``[n, p]``.
        phi_val: the same on the held-out split ``[n_val, p]``.
        labels, labels_val: class indices ``[n]``, ``[n_val]``.
        prev_probs: the previous generation's softmax on the fitting split ``[n, C]``.
        num_classes: C (default ``prev_probs.shape[1]``).
        ridges: ``lambda`` grid relative to the mean eigenvalue of ``Phi^T Phi``; the one with the
            lowest held-out error of the labels-only fit is used.
    """
    c = num_classes or prev_probs.shape[1]
    if phi.shape[0] != labels.shape[0] or phi_val.shape[0] != labels_val.shape[0] or prev_probs.shape != (
            phi.shape[0], c) or phi.shape[1] != phi_val.shape[1]:
        raise ShapeError(f"shapes do not fit: phi {tuple(phi.shape)}, phi_val {tuple(phi_val.shape)}, labels "
                         f"{tuple(labels.shape)}, labels_val {tuple(labels_val.shape)}, prev_probs {tuple(prev_probs.shape)}",
                         "pass phi [n, p], phi_val [n_val, p], labels [n], labels_val [n_val], prev_probs [n, C]")
    if phi.shape[0] == 0 or phi_val.shape[0] == 0:
        raise ShapeError("the fitting or the held-out split is empty", "use more labelled images")
    one = torch.ones(1, dtype=torch.float64)
    p = torch.cat([phi.double().flatten(1), one.expand(phi.shape[0], 1)], 1)
    pv = torch.cat([phi_val.double().flatten(1), one.expand(phi_val.shape[0], 1)], 1)
    y = nn.functional.one_hot(labels.long(), c).double()
    yv = nn.functional.one_hot(labels_val.long(), c).double()
    fp = prev_probs.double()
    s, pv_v, p_v = _smoother_family(p, pv)
    scale = float(s.mean()) or 1.0

    def predict(z: torch.Tensor, lam: float) -> torch.Tensor:  # A_val(lam) z without forming A_val
        return pv_v @ ((p_v.T @ z) / (s + lam)[:, None])

    lam = min((r * scale for r in ridges), key=lambda lam: float(((yv - predict(y, lam)) ** 2).sum()))
    a_val = pv_v @ (p_v.T / (s + lam)[:, None])  # [n_val, n]
    alpha_raw = optimal_label_weight(a_val, yv, y, fp, clip=False)
    alpha = min(1.0, max(0.0, alpha_raw))

    def mse(z: torch.Tensor) -> float:
        return float(((yv - a_val @ z) ** 2).sum()) / yv.shape[0]

    return GuidanceEstimate(alpha=alpha, alpha_unclipped=alpha_raw, ridge=float(lam), n_fit=int(p.shape[0]),
                            n_heldout=int(pv.shape[0]), heldout_mse_labels=mse(y), heldout_mse_previous=mse(fp),
                            heldout_mse_alpha=mse(alpha * y + (1 - alpha) * fp))


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """The input of ``model``'s last ``nn.Linear`` (the classifier) on ``x``, flattened ``[N, p]``,
    computed in eval mode (the model's train/eval mode is restored)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ShapeError(f"{type(model).__name__} has no nn.Linear classifier to read features from",
                         "use a model whose last layer is an nn.Linear (e.g. kdforge's small_cnn, mlp)")
    captured: list[torch.Tensor] = []
    handle = linears[-1].register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured) if captured else torch.empty(0, linears[-1].in_features)
