"""KD3 instance selection: which points of a *shifted* pool (web-collected images, another
domain) to distil on, by the combined predictions of teacher and student ("Distribution Shift
Matters for Knowledge Distillation with Webly Collected Images", Tang et al., ICCV 2023, its
first component; the feature/classifier alignment and MixDistribution are not implemented).

For pool point ``i`` with teacher logits ``t_i`` and student logits ``s_i``:

    p_i = w * softmax(t_i / T) + (1 - w) * softmax(s_i / T)        (combined prediction)
    conf_i = max_c p_i[c],   y_i = argmax_c p_i[c]
    agree_i = [argmax t_i == argmax s_i]
    score_i = conf_i * agree_i    (require_agreement)   or   conf_i

Points the two networks confidently agree on are likely in the teacher's domain (its soft label
is trustworthy there); points they disagree on or are unsure about are likely shifted / out of
distribution. :func:`kd3_select` keeps the top ``k`` scores or every score ``>= threshold``; run
it again as the student improves (the paper re-selects dynamically during training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdforge.errors import ConfigError

__all__ = ["KD3Scores", "kd3_scores", "kd3_select"]


@dataclass(frozen=True)
class KD3Scores:
    """Per-point combined prediction ``probs [N, C]``, ``confidence``, ``label``, ``agree`` and ``score`` ``[N]``."""

    probs: torch.Tensor
    confidence: torch.Tensor
    label: torch.Tensor
    agree: torch.Tensor
    score: torch.Tensor


def kd3_scores(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, teacher_weight: float = 0.5,
               temperature: float = 1.0, require_agreement: bool = True) -> KD3Scores:
    """KD3 scores of a pool (see the module docstring); logits ``[N, C]``."""
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2:
        raise ConfigError(f"KD3 needs teacher and student logits of one shape [N, C], got "
                          f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}",
                          "score the same pool with both models")
    if not 0.0 <= teacher_weight <= 1.0 or temperature <= 0:
        raise ConfigError(f"KD3: teacher_weight in [0, 1] and temperature > 0, got {teacher_weight}, {temperature}",
                          "e.g. teacher_weight=0.5, temperature=1")
    pt = torch.softmax(teacher_logits.float() / temperature, -1)
    ps = torch.softmax(student_logits.float() / temperature, -1)
    probs = teacher_weight * pt + (1.0 - teacher_weight) * ps
    confidence, label = probs.max(-1)
    agree = teacher_logits.argmax(-1) == student_logits.argmax(-1)
    score = confidence * agree.float() if require_agreement else confidence
    return KD3Scores(probs, confidence, label, agree, score)


def kd3_select(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, k: int | None = None,
               threshold: float | None = None, balanced: bool = False, **kwargs: float | bool) -> torch.Tensor:
    """Indices of the selected pool points, best score first: the top ``k``, or all with
    ``score >= threshold`` (exactly one of the two).

    ``balanced`` (with ``k``): the top ``k`` *per combined label* in turn (round-robin over the
    classes by rank), so confident-but-easy classes cannot fill the whole selection; a class with too
    few points leaves its share to the others.
    """
    if (k is None) == (threshold is None):
        raise ConfigError("kd3_select takes exactly one of k (keep the top k) or threshold (keep score >= t)",
                          "e.g. kd3_select(t, s, k=2000)")
    scores = kd3_scores(teacher_logits, student_logits, **kwargs)  # type: ignore[arg-type]
    s = scores.score
    order = s.argsort(descending=True, stable=True)
    if k is None:
        return order[s[order] >= float(threshold)]  # type: ignore[arg-type]
    k = max(0, min(int(k), len(order)))
    if not balanced:
        return order[:k]
    label = scores.label[order]
    rank = torch.zeros_like(order)  # rank of each ordered point within its class
    for c in label.unique():
        rows = (label == c).nonzero().squeeze(1)
        rank[rows] = torch.arange(len(rows))
    take = torch.argsort(rank * (len(order) + 1) + torch.arange(len(order)), stable=True)[:k]
    return order[take]
