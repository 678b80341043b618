"""Trilateral-geometry KD: a learned per-sample fusion ratio between the KD and the CE target.

Hu et al., *Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
Distillation* (ICLR 2024). Per sample ``i`` the student loss is

    ``l_i = r_i * T^2 * KL(p_i || q_i) + (1 - r_i) * CE(q_i, y_i)``

with the ratio ``r_i in (0, 1)`` given by a small network from the *trilateral geometry* of the
student prediction S, the teacher prediction T and the ground truth G — how right each model is
and how close S is to T — plus the inter-sample relation to the teacher's class-mean prediction
``T̄_y`` (against outlier teacher predictions). :func:`relation_features` lists the 8 features.
Unlabelled samples (``-100``) have only the KD target (``r_i = 1``).

The paper trains the ratio network by bilevel optimisation (the ratios that make a look-ahead
student best on held-out data). kdforge uses a **first-order, in-batch approximation** of that
meta-gradient: one SGD step of the student on ``sum_i l_i`` changes the labelled CE of the other
samples of the batch by ``-eta * sum_i r_i <g_val, g_KD_i - g_CE_i> + const``; with the parameter
Jacobians approximated by a kernel ``K_ij = [y_i = y_j] * cos(q_i, q_j)`` (samples of one class
that the student sees alike share their gradients; other classes are taken as orthogonal — without
that restriction a near-uniform student makes every pair alike and the batch's other classes act
as a class prior that rewards a *wrong* teacher), this is

    ``s_i = sum_{j != i, labelled} K_ij * (q_j - e_{y_j}) . (T (q^T_i - p^T_i) - (q_i - e_{y_i}))``

(``q^T``, ``p^T`` at temperature ``T``; the first factor is the other samples' CE gradient, the
second ``grad KD_i - grad CE_i`` in logit space: ``s_i > 0`` means *a step toward the teacher on i
lowers the others' CE more than a step toward the label*), and
the ratio network minimises ``-sum_i r_i s_i``. The student sees ``r`` detached; the network's
update term adds 0 to the loss value. Without a network (``fusion=None``) a fixed ``ratio`` is
used: ``ratio = 0`` is CE, ``ratio = 1`` is ``T^2 * KL`` (tested).

**The true bilevel rule** (``bilevel=TrilateralBilevel(...)``): the loss then adds no update term
(the student sees ``r`` detached, as always); the ratio network is trained outside the loss by
:class:`kdforge.train.TrilateralMetaLearner` — one SGD look-ahead of the student and the held-out
CE of the look-ahead student (Meta-Weight-Net style). The formulas are in
:mod:`kdforge.losses.trilateral_bilevel`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdforge.config import StrictModel
from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    Teacher,
    check_positions,
    check_reduction,
    check_student,
    check_teacher,
    check_temperature,
    diagnose_nonfinite,
    kl,
    real_positions,
    reduce,
    select,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import register_loss
from kdforge.losses.supervised import IGNORE_INDEX

__all__ = ["N_RELATION_FEATURES", "TrilateralBilevel", "TrilateralFusion", "meta_scores", "relation_features",
           "trilateral_kd"]

N_RELATION_FEATURES = 8


class TrilateralBilevel(StrictModel):
    """Settings of the true bilevel update of the ratio network (``trilateral_kd``'s ``bilevel``
    parameter; :class:`kdforge.train.TrilateralMetaLearner` runs it). Per step:

    ``theta'(phi) = theta - inner_lr * grad_theta mean_i l_i(theta, r_i(phi))`` (the look-ahead),
    ``phi <- Adam(meta_lr)`` step on ``grad_phi CE(theta'(phi); held-out batch)``, then the
    student's ordinary step with ``r`` detached.
    """

    lookahead: Literal["head", "all"] = Field(
        "head", description="head: the look-ahead moves the final nn.Linear only (exact for that layer, closed "
        "form, cheap for any student); all: every student parameter (torch.func, for small classifiers)")
    holdout: Literal["split", "batch"] = Field(
        "split", description="split: a fixed held-out split of the labelled training data, never trained on "
        "(the paper's held-out set); batch: the other half of the same batch (no labels set aside)")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="split: share of the labelled training data held out")
    holdout_batch_size: int = Field(128, ge=1, description="split: held-out samples drawn per step")
    inner_lr: float = Field(0.1, gt=0, description="eta: SGD step size of the look-ahead")
    meta_lr: float = Field(3e-3, gt=0, description="beta: Adam learning rate of the ratio network")


def relation_features(q: torch.Tensor, p: torch.Tensor, y: torch.Tensor, class_mean: torch.Tensor) -> torch.Tensor:
    """``[n, 8]`` relation features from student ``q`` and teacher ``p`` probabilities ``[n, C]``,
    labels ``y [n]`` (valid ids) and the teacher's class-mean predictions ``class_mean [C, C]``:

    ``q_y``, ``p_y`` (correctness), ``[argmax q = y]``, ``[argmax p = y]``, ``TV(q, p)`` (S-T side),
    ``TV(p, T̄_y)``, ``TV(q, T̄_y)`` (inter-sample), ``max p`` (teacher confidence). ``TV`` is the
    total variation ``0.5 * sum |a - b|``; the S-G and T-G sides are ``1 - q_y`` and ``1 - p_y``.
    """
    idx = y.unsqueeze(-1)
    mean_y = class_mean[y]
    return torch.stack([
        q.gather(-1, idx).squeeze(-1),
        p.gather(-1, idx).squeeze(-1),
        (q.argmax(-1) == y).to(q.dtype),
        (p.argmax(-1) == y).to(q.dtype),
        0.5 * (q - p).abs().sum(-1),
        0.5 * (p - mean_y).abs().sum(-1),
        0.5 * (q - mean_y).abs().sum(-1),
        p.max(-1).values,
    ], dim=-1)


class TrilateralFusion(nn.Module):
    """The ratio network: ``r = sigmoid(MLP(relation_features))`` and the running teacher class means.

    Args:
        num_classes: ``C``.
        hidden: width of the one hidden layer.
        momentum: EMA momentum of the class-mean teacher predictions (updated in training mode).
        init_ratio: the initial ratio (the output bias is set to its logit; the last layer's
            weights start at 0, so every sample starts at this ratio).
    """

    def __init__(self, num_classes: int, hidden: int = 16, momentum: float = 0.9, init_ratio: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < init_ratio < 1.0:
            raise ConfigError(f"init_ratio must be in (0, 1), got {init_ratio}", "use e.g. init_ratio=0.5")
        self.mlp = nn.Sequential(nn.Linear(N_RELATION_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, float(torch.logit(torch.tensor(init_ratio))))
        self.momentum = momentum
        self.register_buffer("class_mean", torch.full((num_classes, num_classes), 1.0 / num_classes))

    @torch.no_grad()
    def update_means(self, p: torch.Tensor, y: torch.Tensor) -> None:
        """EMA of the teacher's mean prediction per class over this batch's labelled samples."""
        for c in y.unique().tolist():
            batch_mean = p[y == c].mean(0).to(self.class_mean.dtype)
            self.class_mean[c].mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(features.to(self.mlp[0].weight.dtype))).squeeze(-1)


def meta_scores(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """``s_i`` of the module docstring for logits ``s``, ``t`` ``[n, C]`` and valid labels ``y``."""
    with torch.no_grad():
        q = s.softmax(-1)
        onehot = torch.nn.functional.one_hot(y, s.shape[-1]).to(s.dtype)
        g_ce = q - onehot
        g_kd = temperature * ((s / temperature).softmax(-1) - (t / temperature).softmax(-1))
        unit = torch.nn.functional.normalize(q, dim=-1)
        kernel = (unit @ unit.T) * (y.unsqueeze(0) == y.unsqueeze(1)).to(s.dtype)
        kernel.fill_diagonal_(0.0)
        return ((kernel @ g_ce) * (g_kd - g_ce)).sum(-1)


@register_loss("trilateral_kd",
               description="trilateral-geometry KD: per-sample learned KD/CE fusion ratio (TrilateralFusion)",
               paper="Hu et al. 2024, Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge "
                     "Distillation (ICLR)", needs_labels=True, sparse_ok=False)
def trilateral_kd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    fusion: TrilateralFusion | None = None,
    ratio: float = 0.5,
    bilevel: TrilateralBilevel | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> torch.Tensor:
    """``r_i T^2 KL(p_i || q_i) + (1 - r_i) CE(q_i, y_i)`` per sample (module docstring).

    Args:
        student_logits: ``[..., C]``.
        teacher: dense teacher logits ``[..., C]``.
        fusion: the ratio network (its parameters must be optimised with the student: pass it in
            the Distiller's ``extra_modules``; the fashion_mnist recipe does). None: fixed ``ratio``.
        ratio: the fixed ratio in ``[0, 1]`` when ``fusion`` is None.
        bilevel: None: the first-order in-batch update of ``fusion`` (module docstring). Set: the
            network is trained by the true bilevel rule outside the loss (a
            :class:`kdforge.train.TrilateralMetaLearner` must be attached to ``fusion``); the loss
            adds no update term.
        temperature: ``T`` of the KD side.
        mask, labels, reduction, check_finite: as :func:`~kdforge.losses.dkd`; unlabelled positions
            keep only KD.
    """
    check_student(student_logits)
    if isinstance(teacher, SparseTeacher):
        raise ConfigError("trilateral_kd needs dense teacher logits, got a SparseTeacher",
                          "use a cached or online dense teacher")
    check_teacher(student_logits, teacher)
    check_temperature(temperature)
    check_reduction(reduction)
    if fusion is None and bilevel is not None:
        raise ConfigError("trilateral_kd's bilevel settings train a ratio network, but there is none (fixed ratio)",
                          "pass fusion=TrilateralFusion(num_classes) (the recipes create it: drop ratio), "
                          "or drop bilevel")
    if fusion is None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"trilateral_kd ratio must be in [0, 1], got {ratio}", "use e.g. ratio=0.5")
    lead = tuple(student_logits.shape[:-1])
    if labels is None:
        raise ShapeError("trilateral_kd needs labels", "pass labels=[...] class ids (-100 for unlabelled)")
    check_positions("labels", labels, lead)
    check_positions("mask", mask, lead)
    real = real_positions(lead, mask, student_logits.device)
    s = upcast(select(student_logits, real))
    t = upcast(select(teacher.detach(), real))
    y = select(labels.to(s.device).unsqueeze(-1), real).squeeze(-1).long()
    has = y != IGNORE_INDEX
    y_safe = torch.where(has, y, 0)
    if value_checks_enabled() and y.numel() and int(y_safe.max()) >= s.shape[-1]:
        raise ShapeError(f"labels outside [0, {s.shape[-1]})", "labels must index the classes (-100 for none)")
    logq_t = torch.log_softmax(s / temperature, -1)
    logp_t = torch.log_softmax(t / temperature, -1)
    kd = kl(logp_t, logq_t) * temperature**2
    ce = torch.nn.functional.cross_entropy(s, y_safe, reduction="none")
    meta = None
    if fusion is None:
        r = torch.full_like(kd, float(ratio))
    else:
        q, p = s.detach().softmax(-1), t.softmax(-1)
        if fusion.training and bool(has.any()):
            fusion.update_means(p[has], y[has])
        r_net = fusion(relation_features(q, p, y_safe, fusion.class_mean))
        if bilevel is not None and fusion.training and not getattr(fusion, "bilevel_attached", False):
            raise ConfigError("trilateral_kd has bilevel settings but no meta-learner trains its fusion network",
                              "wrap it: kdforge.train.TrilateralMetaLearner(fusion, bilevel, ...) and train with "
                              "TrilateralBilevelDistiller (the recipes do this), or drop bilevel")
        if bilevel is None and fusion.training and int(has.sum()) > 1:
            scores = torch.zeros_like(kd)
            scores[has] = meta_scores(s[has].detach(), t[has], y[has], temperature)
            meta = -(r_net * scores * has).sum()
        r = r_net.detach().to(kd.dtype)
    r = torch.where(has, r, 1.0)
    per_pos = r * kd + (1 - r) * torch.where(has, ce, 0.0)
    if check_finite and value_checks_enabled() and per_pos.numel() and not bool(torch.isfinite(per_pos.detach()).all()):
        raise diagnose_nonfinite("trilateral_kd", s, t)
    out = reduce(per_pos, real, lead, reduction)
    if meta is not None and reduction != "none":
        out = out + (meta - meta.detach())  # the ratio network's update; adds 0 to the value
    return out
