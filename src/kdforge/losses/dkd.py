"""Decoupled knowledge distillation (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation").

KD's forward KL splits exactly into a *target-class* term and a *non-target-class* term:
with ``b = [p_y, 1 - p_y]`` the binary (target vs rest) distribution and ``p̂`` the distribution
over the non-target classes (renormalised, target removed),

``KL(p || q) = KL(b^t || b^s) + (1 - p^t_y) * KL(p̂^t || p̂^s)``.

DKD drops the ``(1 - p^t_y)`` coupling and weights the two freely:

``DKD = T^2 * (alpha * TCKD + beta * NCKD)``, ``TCKD = KL(b^t || b^s)``,
``NCKD = KL(p̂^t || p̂^s)``, everything at temperature ``T``.

The paper's CIFAR-100 setting is ``alpha = 1, beta = 8, T = 4`` with a linear warm-up of the
whole DKD term over the first 20 epochs (the warm-up belongs to the trainer's loss weight
schedule, not to this function).
"""

from __future__ import annotations

import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    NEG_INF,
    SparsePolicy,
    Teacher,
    check_positions,
    check_reduction,
    check_student,
    check_teacher,
    check_temperature,
    diagnose_nonfinite,
    kl,
    log1mexp,
    reduce,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import register_loss
from kdforge.losses.supervised import IGNORE_INDEX, label_positions

__all__ = ["dkd", "dkd_parts"]

_LOG_MASS_CAP = -1e-7


def dkd_parts(logq: torch.Tensor, logp: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)`` per row for log-distributions ``[n, C]`` and targets ``[n]``."""
    idx = target.unsqueeze(-1)
    lq_y = logq.gather(-1, idx).clamp(max=_LOG_MASS_CAP)
    lp_y = logp.gather(-1, idx).clamp(max=_LOG_MASS_CAP)
    b_s = torch.cat([lq_y, log1mexp(lq_y)], dim=-1)
    b_t = torch.cat([lp_y, log1mexp(lp_y)], dim=-1)
    tckd = kl(b_t, b_s)
    not_target = torch.ones_like(logq, dtype=torch.bool).scatter(-1, idx, False)
    lq_nt = torch.log_softmax(logq.masked_fill(~not_target, NEG_INF), dim=-1)
    lp_nt = torch.log_softmax(logp.masked_fill(~not_target, NEG_INF), dim=-1)
    nckd = kl(lp_nt, lq_nt)
    return tckd, nckd


@register_loss("dkd", description="decoupled KD: alpha*target-class KL + beta*non-target KL (needs labels)",
               paper="Zhao et al. 2022, Decoupled Knowledge Distillation (CVPR)", needs_labels=True, sparse_ok=False)
def dkd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 8.0,
    mask: torch.Tensor | None = None,
    temperature: float = 4.0,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """DKD loss ``T^2 * (alpha * TCKD + beta * NCKD)`` (see module docstring).

    Args:
        student_logits: ``[..., C]`` (classes or vocabulary).
        teacher: dense teacher logits ``[..., C]`` (a sparse teacher is not supported: the
            non-target distribution needs every class).
        labels: int ``[...]`` ground-truth class per position, ``ignore_index`` to skip one.
        alpha, beta: weights of the target-class and non-target-class terms.
        mask: optional bool ``[...]`` of real positions (combined with the labels' ignore mask).
        temperature: ``T`` (paper: 4), result scaled by ``T^2``.
        reduction: ``"mean"`` over labelled positions, ``"sum"``, ``"none"``.
        sparse_policy: accepted for the uniform signature; unused.
        check_finite: raise NonFiniteError on a NaN/Inf loss (one device sync).
    """
    check_student(student_logits)
    if isinstance(teacher, SparseTeacher):
        raise ConfigError("dkd needs dense teacher logits, got a SparseTeacher",
                          "use an online teacher for dkd, or a divergence that supports top-k (forward_kl, ...)")
    check_teacher(student_logits, teacher)
    check_temperature(temperature)
    check_reduction(reduction)
    lead = tuple(student_logits.shape[:-1])
    if labels is None:
        raise ShapeError("dkd needs labels (the target class of each position)",
                         "pass labels=[...] class ids (ignore_index=-100 to skip a position)")
    check_positions("labels", labels, lead)
    check_positions("mask", mask, lead)
    labels = labels.to(student_logits.device)
    real = label_positions(labels, mask, ignore_index)
    s = upcast(student_logits[real])
    t = upcast(teacher.detach()[real])
    y = labels[real].long()
    checks = value_checks_enabled()
    if checks and y.numel() and (int(y.min()) < 0 or int(y.max()) >= student_logits.shape[-1]):
        raise ShapeError(f"labels outside [0, {student_logits.shape[-1]})", "labels must index the classes")
    if s.shape[0] == 0:
        per_pos = s.sum(-1)
    else:
        logq = torch.log_softmax(s / temperature, dim=-1)
        logp = torch.log_softmax(t / temperature, dim=-1)
        tckd, nckd = dkd_parts(logq, logp, y)
        per_pos = (alpha * tckd + beta * nckd) * temperature**2
        if check_finite and checks and not bool(torch.isfinite(per_pos.detach()).all()):
            raise diagnose_nonfinite("dkd", s, t)
    return reduce(per_pos, real, lead, reduction)

