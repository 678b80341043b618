"""DAC-KL: KL restricted to the teacher's semantically dense region (distribution-adaptive clipping).

Liu et al., *Multi-Granularity Semantic Revision for Large Language Model Distillation* (2024),
token-level part. Their DAC-KL ("distribution adaptive clipping KL") keeps only the *dense* part
of the teacher's output distribution — the few classes/tokens that carry most of its mass — and
the ground-truth token, so that the long flat tail of an LLM's distribution does not dominate the
divergence; the region's bounds are predicted per token by a learnable sub-network.

kdforge's version (per position, at temperature ``T``):

1. ``R`` = the smallest set of classes, taken in decreasing teacher probability, whose teacher
   mass reaches ``mass`` (a per-position *adaptive* size: 1 class for a confident teacher, many
   for a flat one; at most ``max_k`` when given), plus the labelled class when ``labels`` are
   given (``keep_label``);
2. the rest is *clipped* into one bucket: ``p' = [p_v for v in R] + [1 - sum_R p]``, the same for
   the student ``q'`` (its own mass outside ``R``);
3. ``DAC-KL = T^2 * KL(p' || q')``.

The tail's *shape* no longer matters, only its total mass (renormalising on ``R`` alone instead
would give a confident teacher's one-class region a zero loss whatever the student says).
``mass = 1`` keeps every class with positive teacher probability: the loss is then the plain
forward KL (tested). What is **not** implemented: the paper's *learned* sub-network that predicts
the region bounds (the region here is the rule above, with ``mass`` a fixed or scheduled
parameter); the abstract gives no training objective for it, and a sub-network trained on the KL
alone would shrink the region to nothing.
"""

from __future__ import annotations

import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    NEG_INF,
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

__all__ = ["dac_kl", "dense_region"]


def dense_region(logp: torch.Tensor, mass: float, max_k: int | None = None,
                 target: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[n, V]``: per row, the fewest top classes of ``exp(logp)`` reaching ``mass``
    (cut at ``max_k``), plus ``target[i]`` where ``target[i] >= 0``."""
    probs, order = logp.exp().sort(dim=-1, descending=True)
    before = probs.cumsum(-1) - probs  # teacher mass strictly above each class
    keep_sorted = before < mass
    keep_sorted[..., 0] = True
    if max_k is not None:
        keep_sorted[..., max_k:] = False
    region = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if target is not None:
        has = target >= 0
        rows = has.nonzero(as_tuple=True)[0]
        region[rows, target[has]] = True
    return region


def _clip(logd: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``[n, V + 1]``: the log-probabilities inside ``region`` (``-inf`` outside) and, last, the log
    of the mass outside it (``-inf`` when the region is everything)."""
    inside = logd.masked_fill(~region, NEG_INF)
    full = region.all(-1, keepdim=True)  # no tail: keep logsumexp off an all -inf row (NaN gradient)
    tail = torch.logsumexp(torch.where(full, 0.0, logd.masked_fill(region, NEG_INF)), -1, keepdim=True)
    return torch.cat([inside, torch.where(full, NEG_INF, tail)], -1)


@register_loss("dac_kl", description="DAC-KL: forward KL on the teacher's dense region (top mass + label), the rest clipped to one bucket",
               paper="Liu et al. 2024, Multi-Granularity Semantic Revision for Large Language Model Distillation",
               sparse_ok=False)
def dac_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mass: float = 0.9,
    max_k: int | None = None,
    keep_label: bool = True,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """``T^2 * KL(p' || q')`` on the teacher's dense region ``R`` plus one tail bucket (module docstring).

    Args:
        student_logits: ``[..., V]``.
        teacher: dense teacher logits ``[..., V]`` (a top-k teacher is already clipped: use
            ``forward_kl`` with ``sparse_policy="renormalize"`` for it).
        mass: teacher probability mass the region must reach, in ``(0, 1]``.
        max_k: at most this many classes from the teacher's top (None: no cap).
        keep_label: add the labelled class to the region (needs ``labels``; ``-100`` = none).
        mask, temperature, reduction, check_finite: as :func:`~kdforge.losses.forward_kl`.
        labels: int ``[...]`` (optional; used by ``keep_label``).
    """
    check_student(student_logits)
    if isinstance(teacher, SparseTeacher):
        raise ConfigError("dac_kl needs dense teacher logits, got a SparseTeacher",
                          "a top-k teacher is already a clipped region: use forward_kl with sparse_policy=renormalize")
    check_teacher(student_logits, teacher)
    check_temperature(temperature)
    check_reduction(reduction)
    if not 0.0 < mass <= 1.0:
        raise ConfigError(f"dac_kl mass must be in (0, 1], got {mass}", "use e.g. mass=0.9")
    if max_k is not None and max_k < 1:
        raise ConfigError(f"dac_kl max_k must be >= 1, got {max_k}", "use max_k=null for no cap")
    lead = tuple(student_logits.shape[:-1])
    check_positions("mask", mask, lead)
    real = real_positions(lead, mask, student_logits.device)
    s = upcast(select(student_logits, real)) / temperature
    t = upcast(select(teacher.detach(), real)) / temperature
    target = None
    if keep_label and labels is not None:
        check_positions("labels", labels, lead)
        target = select(labels.to(student_logits.device).unsqueeze(-1), real).squeeze(-1).long()
        target = torch.where(target == IGNORE_INDEX, -1, target)
        if value_checks_enabled() and target.numel() and int(target.max()) >= s.shape[-1]:
            raise ShapeError(f"labels outside [0, {s.shape[-1]})", "labels must index the classes (-100 for none)")
    with torch.no_grad():
        region = dense_region(torch.log_softmax(t, -1), mass, max_k, target)
    logq = _clip(torch.log_softmax(s, -1), region)
    logp = _clip(torch.log_softmax(t, -1), region)
    per_pos = kl(logp, logq) * temperature**2
    if check_finite and value_checks_enabled() and per_pos.numel() and not bool(torch.isfinite(per_pos.detach()).all()):
        raise diagnose_nonfinite("dac_kl", s, t)
    return reduce(per_pos, real, lead, reduction)
