"""Sinkhorn KD (SinKD): entropy-regularised optimal transport between teacher and student.

Cui et al., *Sinkhorn Distance Minimization for Knowledge Distillation* (COLING 2024). The
Sinkhorn distance (Cuturi 2013) between two discrete measures ``a`` (n points) and ``b`` (m
points) with ground cost ``M [n, m]`` is ``<pi*, M>`` where

    ``pi* = argmin_{pi 1 = a, pi^T 1 = b} <pi, M> - eps * H(pi)``.

It is solved here in the **log domain** (stable for small ``eps``): with potentials ``f, g``
(``g = 0`` at the start), ``n_iters`` times

    ``f = eps * (log a - logsumexp_j((g_j - M_ij) / eps))``,
    ``g = eps * (log b - logsumexp_i((f_i - M_ij) / eps))``,

then ``pi_ij = exp((f_i + g_j - M_ij) / eps)`` — the same iterates as the classic scaling
``u = a / (K v)``, ``v = b / (K^T u)``, ``K = exp(-M / eps)``, with ``f = eps log u``,
``g = eps log v``. Gradients flow by autograd through the unrolled iterations.

**Debiasing** (``debias=True``, the default): the entropic distance ``W(a, b)`` is not zero when
``a = b`` (the plan spreads mass), so minimising it would push the student *away* from a teacher
it already matches. The loss is therefore the Sinkhorn divergence (Genevay et al. 2018; Feydy et
al. 2019) ``S(a, b) = W(a, b) - ½ W(a, a) - ½ W(b, b)``: zero at ``a = b``, nonnegative for these
costs, three solves instead of one. ``debias=False`` gives the plain distance ``W``.

Two variants (``mode=``), both on ``p = softmax(z_t / T)`` and ``q = softmax(z_s / T)``, scaled by
``T^2`` like the other losses:

* ``"batch"`` (the paper's batch-wise reformulation): the teacher's distributions
  ``{p_i}`` and the student's ``{q_j}`` over the ``B`` real positions of the batch are two clouds
  of ``B`` points with uniform weights ``1/B``; ``M_ij = ½ ||p_i - q_j||_1`` (total variation
  between sample ``i``'s teacher and sample ``j``'s student distribution). The transport sees the
  geometry of the whole batch, not only the matched pairs. Per position (``reduction="none"``)
  the value is ``B * sum_j pi_ij M_ij`` (so ``"mean"`` is ``<pi, M>`` and ``"sum"`` is ``B``
  times it, as the trainer's ``sum / N`` expects). Memory ``O(B^2)`` per iteration plus
  ``O(B^2 V)`` for the cost: for classifiers and small batches; a batch of more than
  ``max_positions`` real positions is refused (use ``mode="sample"`` or a smaller batch).
  The positions of one call are coupled: not for :func:`~kdforge.losses.chunked_distillation_loss`
  (the trainer never chunks this loss: it has no closed-form kernel).
* ``"sample"`` (default; separable over positions): per position, OT between ``p`` and ``q`` over
  the ``V`` classes with the 0/1
  ground cost (moving mass between different classes costs 1); without regularisation this is
  the total variation distance. ``O(V^2)`` per position: ``V <= 1024`` (classifiers).

The cost needs every class: a sparse (top-k) teacher is completed to a dense distribution with its
tail mass spread uniformly over the other classes (the maximum-entropy completion that the
``tail_bucket`` policy assumes too; ``sparse_policy="renormalize"``: the top-k renormalised), so it
costs ``[n, V]`` memory; a sampled-tail teacher is refused.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    SPARSE_POLICIES,
    SparsePolicy,
    Teacher,
    check_positions,
    check_reduction,
    check_student,
    check_teacher,
    check_temperature,
    dense_pair,
    diagnose_nonfinite,
    real_positions,
    reduce,
    select,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import register_loss

__all__ = ["SINKHORN_MODES", "sinkhorn_kd", "sinkhorn_plan"]

SINKHORN_MODES = ("batch", "sample")
_MAX_SAMPLE_CLASSES = 1024


def sinkhorn_plan(log_a: torch.Tensor, log_b: torch.Tensor, cost: torch.Tensor, eps: float, n_iters: int
                  ) -> torch.Tensor:
    """The entropic OT plan ``[..., n, m]`` between ``exp(log_a) [..., n]`` and ``exp(log_b) [..., m]``
    for ``cost [..., n, m]`` after ``n_iters`` log-domain Sinkhorn iterations (module docstring)."""
    g = torch.zeros_like(log_b)
    f = torch.zeros_like(log_a)
    for _ in range(n_iters):
        f = eps * (log_a - torch.logsumexp((g.unsqueeze(-2) - cost) / eps, dim=-1))
        g = eps * (log_b - torch.logsumexp((f.unsqueeze(-1) - cost) / eps, dim=-2))
    return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps)


@register_loss("sinkhorn", description="SinKD: Sinkhorn divergence (entropic OT) between teacher and student, per sample "
               "or batch-wise", paper="Cui et al. 2024, Sinkhorn Distance Minimization for Knowledge Distillation",
               sparse_ok=True)
def sinkhorn_kd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mode: Literal["sample", "batch"] = "sample",
    eps: float = 0.1,
    debias: bool = True,
    n_iters: int = 20,
    max_positions: int = 4096,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """Sinkhorn distance between teacher and student distributions (see the module docstring).

    Args:
        student_logits: ``[..., V]``.
        teacher: dense teacher logits ``[..., V]`` or a ``SparseTeacher`` (completed, see above).
        mode: ``"sample"`` (OT over the classes of each position, 0/1 ground cost) or ``"batch"``
            (OT across the batch's positions, the paper's batch-wise variant).
        debias: the Sinkhorn divergence ``W(p,q) - ½W(p,p) - ½W(q,q)`` (zero when the student
            matches the teacher) instead of the plain distance ``W(p,q)``.
        eps: entropic regularisation (> 0; the costs lie in ``[0, 1]``).
        n_iters: Sinkhorn iterations (>= 1).
        max_positions: largest number of real positions ``mode="batch"`` accepts.
        sparse_policy: for a sparse teacher: ``"tail_bucket"`` (tail mass spread uniformly over the
            other classes) or ``"renormalize"`` / ``"student_full"`` (the top-k renormalised).
        mask, temperature, reduction, labels, check_finite: as :func:`forward_kl`.
    """
    check_student(student_logits)
    check_teacher(student_logits, teacher)
    if isinstance(teacher, SparseTeacher):  # the cost needs every class: complete the top-k (uniform tail)
        if teacher.num_exact is not None:
            raise ConfigError("sinkhorn cannot use a sampled-tail teacher (its tail is a sample, not a distribution)",
                              "build the cache without a sampled tail, or use forward_kl for sampled-tail caches")
        if sparse_policy not in SPARSE_POLICIES:
            raise ConfigError(f"unknown sparse_policy {sparse_policy!r}", f"use one of {', '.join(SPARSE_POLICIES)}")
        # tail_bucket: the tail mass spread uniformly; renormalize / student_full: the top-k renormalised
        teacher = teacher.to_dense_logprobs(None if sparse_policy == "tail_bucket" else float("-inf"))
    check_temperature(temperature)
    check_reduction(reduction)
    if mode not in SINKHORN_MODES:
        raise ConfigError(f"unknown sinkhorn mode {mode!r}", f"use one of {', '.join(SINKHORN_MODES)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"sinkhorn eps must be a finite number > 0, got {eps!r}", "use e.g. eps=0.1")
    if not (isinstance(n_iters, int) and n_iters >= 1):
        raise ConfigError(f"sinkhorn n_iters must be an integer >= 1, got {n_iters!r}", "use e.g. n_iters=20")
    lead = tuple(student_logits.shape[:-1])
    check_positions("mask", mask, lead)
    real = real_positions(lead, mask, student_logits.device)
    s = select(student_logits, real)
    t = select(teacher.detach(), real)
    n, v = s.shape[0], s.shape[-1]
    if n == 0:
        per_pos = upcast(s).sum(-1)
    else:
        logq, logp = dense_pair(s, t, temperature)
        if mode == "batch" and n > max_positions:
            raise ShapeError(f"sinkhorn mode='batch' got {n} real positions, more than max_positions="
                             f"{max_positions} (the plan is [n, n], the cost [n, n, V])",
                             "use mode='sample', a smaller batch, or raise max_positions if memory allows")
        if mode == "sample" and v > _MAX_SAMPLE_CLASSES:
            raise ShapeError(f"sinkhorn mode='sample' builds a [V, V] cost per position; V={v} > "
                             f"{_MAX_SAMPLE_CLASSES}", "use mode='batch' (or another loss) for vocabularies")
        ot = _batch_ot if mode == "batch" else _sample_ot
        per_pos = ot(logp, logq, eps, n_iters)
        if debias:
            per_pos = per_pos - 0.5 * ot(logp, logp, eps, n_iters) - 0.5 * ot(logq, logq, eps, n_iters)
        if temperature != 1.0:
            per_pos = per_pos * temperature**2
        if check_finite and value_checks_enabled() and not bool(torch.isfinite(per_pos.detach()).all()):
            raise diagnose_nonfinite("sinkhorn", s, t)
    return reduce(per_pos, real, lead, reduction)


def _batch_ot(logp: torch.Tensor, logq: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """Per position ``n * sum_j pi_ij M_ij`` of the batch-wise OT between ``{p_i}`` and ``{q_j}``."""
    n = logp.shape[0]
    p, q = logp.exp(), logq.exp()
    cost = 0.5 * (p.unsqueeze(1) - q.unsqueeze(0)).abs().sum(-1)  # [n, n]
    uniform = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    plan = sinkhorn_plan(uniform, uniform, cost, eps, n_iters)
    return n * (plan * cost).sum(-1)


def _sample_ot(logp: torch.Tensor, logq: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """Per position ``<pi, M>`` of the OT between ``p_i`` and ``q_i`` over the classes, 0/1 cost."""
    n, v = logp.shape
    cost = 1.0 - torch.eye(v, dtype=logq.dtype, device=logq.device)
    plan = sinkhorn_plan(logp, logq, cost.expand(n, v, v), eps, n_iters)
    return (plan * cost).sum((-1, -2))
