"""Ranking distillation: Margin-MSE between the teacher's and the student's score margins.

Hofstätter et al., *Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
Distillation* (arXiv 2010.02666, 2020). A ranker scores a (query, passage) pair; the student only has
to *rank* like the teacher, so instead of the raw scores (whose scale and offset differ between, say,
a cross-encoder and a bi-encoder) it learns the teacher's **margin** between a relevant and a
non-relevant passage. For a triple ``(q, p, n)``::

    margin_mse = ( (s_S(q, p) - s_S(q, n)) - (s_T(q, p) - s_T(q, n)) )^2

The "logits" of one position (one query) are its scores ``[1 + k]``: column 0 the positive's,
columns ``1..k`` ``k >= 1`` negatives' (``k = 1`` is the paper's triple; with more negatives the
squared margin errors are averaged over them)::

    per query:  (1/k) * sum_j ( (s_0 - s_j) - (t_0 - t_j) )^2

The scores come from anywhere: a cross-encoder's scalar output, or the dot product / cosine of a
bi-encoder's query and passage embeddings (:func:`pair_scores`). Each query's term depends on its own
scores only, so the loss is separable over positions (queries), unlike in-batch similarity KD.
Properties: zero when every student margin equals the teacher's; unchanged when a constant is added
to all of one query's teacher (or student) scores; nonnegative; float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    check_reduction,
    diagnose_nonfinite,
    real_positions,
    reduce,
    select,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.spec import register_loss

__all__ = ["SCORE_KINDS", "margin_mse", "pair_scores"]

#: how a bi-encoder turns a (query, passage) pair of embeddings into a score
SCORE_KINDS = ("dot", "cosine")


def pair_scores(queries: torch.Tensor, passages: torch.Tensor, *, score: str = "dot") -> torch.Tensor:
    """Bi-encoder scores of each query against its own passages.

    Args:
        queries: ``[B, D]`` query embeddings.
        passages: ``[B, P, D]`` embeddings of each query's ``P`` passages (positive first).
        score: ``"dot"`` (``<q, p>``, Hofstätter et al.'s BERT_DOT) or ``"cosine"``.

    Returns:
        ``[B, P]`` scores, the ``student_logits``/``teacher`` of :func:`margin_mse`.
    """
    if score not in SCORE_KINDS:
        raise ConfigError(f"unknown score {score!r}", f"use one of {', '.join(SCORE_KINDS)}")
    if queries.ndim != 2 or passages.ndim != 3 or passages.shape[0] != queries.shape[0] \
            or passages.shape[-1] != queries.shape[-1]:
        raise ShapeError(f"pair_scores needs queries [B, D] and passages [B, P, D], got {tuple(queries.shape)} and "
                         f"{tuple(passages.shape)}", "embed each query and its P passages with the same encoder")
    if score == "cosine":
        queries, passages = F.normalize(queries, dim=-1), F.normalize(passages, dim=-1)
    return torch.einsum("bd,bpd->bp", queries, passages)


@register_loss("margin_mse", description="Margin-MSE: squared error between the student's and the teacher's "
               "positive-minus-negative score margins (rankers)",
               paper="Hofstätter et al. 2020, Improving Efficient Neural Ranking Models with Cross-Architecture KD",
               sparse_ok=False)
def margin_mse(student_logits: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None,
               reduction: str = "mean", labels: torch.Tensor | None = None, temperature: float = 1.0,
               check_finite: bool = True) -> torch.Tensor:
    """Per real position (query): ``mean_j ((s_0 - s_j) - (t_0 - t_j))^2`` over its ``k`` negatives.

    Args:
        student_logits: ``[..., 1 + k]`` student scores, the positive's first.
        teacher: ``[..., 1 + k]`` teacher scores of the same passages (dense tensor).
        mask: ``[...]`` real positions; ``reduction``: ``mean`` (over real positions), ``sum``, ``none``.

    ``temperature`` and ``labels`` are ignored (uniform signature).
    """
    check_reduction(reduction)
    if not isinstance(teacher, torch.Tensor):
        raise ShapeError(f"margin_mse needs a dense teacher (its scores as a tensor), got {type(teacher).__name__}",
                         "precompute the teacher's scores of each query's passages ([..., 1 + k])")
    if teacher.shape != student_logits.shape:
        raise ShapeError(f"margin_mse: student scores {tuple(student_logits.shape)} and teacher scores "
                         f"{tuple(teacher.shape)} differ", "score the same passages, positive first, on both sides")
    if student_logits.ndim < 1 or student_logits.shape[-1] < 2:
        raise ShapeError(f"margin_mse needs scores [..., 1 + k] with k >= 1 negatives, got "
                         f"{tuple(student_logits.shape)}", "give each query its positive's and at least one "
                         "negative's score")
    lead = tuple(student_logits.shape[:-1])
    real = real_positions(lead, mask, student_logits.device)
    s = upcast(select(student_logits, real))
    t = upcast(select(teacher, real)).detach().to(device=s.device, dtype=s.dtype)
    student_margin = s[:, :1] - s[:, 1:]
    teacher_margin = t[:, :1] - t[:, 1:]
    per = (student_margin - teacher_margin).pow(2).mean(-1)
    if check_finite and value_checks_enabled() and not bool(torch.isfinite(per.detach()).all()):
        raise diagnose_nonfinite("margin_mse", s, t)
    return reduce(per, real, lead, reduction)
