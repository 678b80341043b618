"""Losses between sentence embeddings: the student's ``[..., D]`` output vs the teacher's ``[..., D]``.

For encoder distillation (``kdforge.recipes.encoder_kd``, docs/encoders.md) the "logits" of a
position are a sentence embedding, and the teacher signal is the teacher's embedding of the same
sentence (dense, precomputed once). A student narrower than the teacher carries a linear
projection into the teacher's width (:class:`kdforge.students.encoder.SentenceEncoder`), so both
sides are ``[n, D]`` at the ``n`` real positions:

* ``embedding_mse`` — ``mean_d (s_d - t_d)^2`` per sentence: the distillation objective of
  Reimers & Gurevych, *Making Monolingual Sentence Embeddings Multilingual using Knowledge
  Distillation* (EMNLP 2020), which trains a student to map each sentence to the teacher's vector.
* ``embedding_cosine`` — ``1 - cos(s, t)`` per sentence: the same target, blind to the norm.
* ``similarity_kd`` — relational KD over the batch (Park et al., *Relational Knowledge
  Distillation*, CVPR 2019, in its in-batch contrastive form): with ``C = cos(e_i, e_j)`` the
  cosine-similarity matrix of the batch's real positions on each side, per sentence ``i``
  ``T^2 * KL(softmax(C^t_i / T) || softmax(C^s_i / T))`` over the other sentences ``j != i``. It
  preserves *which sentences are close to which*, what retrieval and clustering use, and does not
  need the two widths to match. Positions of one call are coupled (like SinKD's batch mode): the
  trainer never chunks it.

All three are zero when the student's embeddings equal the teacher's, nonnegative, in float32
(float64 stays float64), and support ``mask`` and ``reduction`` like every kdforge loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.errors import ShapeError
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

__all__ = ["embedding_cosine", "embedding_mse", "similarity_kd"]


def _pair(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    if not isinstance(teacher, torch.Tensor):
        raise ShapeError(f"{name} needs a dense teacher (its embeddings as a tensor), got {type(teacher).__name__}",
                         "precompute the teacher's sentence embeddings (a top-k cache holds logits, not embeddings)")
    if teacher.shape != student.shape:
        raise ShapeError(f"{name}: student embeddings {tuple(student.shape)} and teacher embeddings "
                         f"{tuple(teacher.shape)} differ",
                         "give the student a projection to the teacher's width (SentenceEncoder(projection_dim=...))")
    lead = tuple(student.shape[:-1])
    real = real_positions(lead, mask, student.device)
    s, t = upcast(select(student, real)), upcast(select(teacher, real)).detach().to(student.device)
    return s, t, real, lead


def _finish(name: str, per: torch.Tensor, s: torch.Tensor, t: torch.Tensor, real: torch.Tensor | None,
            lead: tuple[int, ...], reduction: str, check_finite: bool) -> torch.Tensor:
    """Check the per-position values (when value checks are on) and reduce them."""
    if check_finite and value_checks_enabled() and not bool(torch.isfinite(per.detach()).all()):
        raise diagnose_nonfinite(name, s, t)
    return reduce(per, real, lead, reduction)


@register_loss("embedding_mse", description="mean squared error between student and teacher sentence embeddings",
               paper="Reimers & Gurevych 2020, Making Monolingual Sentence Embeddings Multilingual using KD",
               sparse_ok=False)
def embedding_mse(student_logits: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None,
                  normalize: bool = False, reduction: str = "mean", labels: torch.Tensor | None = None,
                  temperature: float = 1.0, check_finite: bool = True) -> torch.Tensor:
    """``mean_d (s_d - t_d)^2`` per real position (``normalize``: of the unit vectors).

    ``temperature`` and ``labels`` are ignored (uniform signature).
    """
    check_reduction(reduction)
    s, t, real, lead = _pair("embedding_mse", student_logits, teacher, mask)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    return _finish("embedding_mse", (s - t).pow(2).mean(-1), s, t, real, lead, reduction, check_finite)


@register_loss("embedding_cosine", description="1 - cosine similarity of student and teacher sentence embeddings",
               paper="Reimers & Gurevych 2020 (cosine form)", sparse_ok=False)
def embedding_cosine(student_logits: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None,
                     reduction: str = "mean", labels: torch.Tensor | None = None, temperature: float = 1.0,
                     check_finite: bool = True) -> torch.Tensor:
    """``1 - cos(s, t)`` per real position."""
    check_reduction(reduction)
    s, t, real, lead = _pair("embedding_cosine", student_logits, teacher, mask)
    per = 1.0 - F.cosine_similarity(s, t, dim=-1)
    return _finish("embedding_cosine", per, s, t, real, lead, reduction, check_finite)


@register_loss("similarity_kd", description="in-batch relational KD: KL between the rows of the teacher's and the "
               "student's cosine-similarity matrices", paper="Park et al. 2019, Relational Knowledge Distillation",
               sparse_ok=False, separable=False)
def similarity_kd(student_logits: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None,
                  temperature: float = 0.05, reduction: str = "mean", labels: torch.Tensor | None = None,
                  check_finite: bool = True) -> torch.Tensor:
    """Per real position ``i``: ``T^2 KL(softmax(C^t_i/T) || softmax(C^s_i/T))`` over ``j != i``.

    Fewer than two real positions give zero (no relation to preserve).
    """
    check_reduction(reduction)
    if temperature <= 0:
        from kdforge.errors import ConfigError

        raise ConfigError(f"similarity_kd: temperature must be > 0, got {temperature}", "e.g. temperature: 0.05")
    s, t, real, lead = _pair("similarity_kd", student_logits, teacher, mask)
    n = s.shape[0]
    if n < 2:
        return reduce(s.sum(-1) * 0.0, real, lead, reduction)
    cs, ct = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    ls = torch.log_softmax((cs @ cs.T)[off].view(n, n - 1) / temperature, dim=-1)
    lt = torch.log_softmax((ct @ ct.T)[off].view(n, n - 1) / temperature, dim=-1)
    per = (lt.exp() * (lt - ls)).sum(-1) * temperature**2
    return _finish("similarity_kd", per, s, t, real, lead, reduction, check_finite)
