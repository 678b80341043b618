"""Supervised (ground-truth) losses, registered next to the divergences so a trainer can mix
``ce_weight * cross_entropy + kd_weight * <divergence>`` by name."""

from __future__ import annotations

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ShapeError
from kdforge.losses._core import (
    Teacher,
    check_positions,
    check_reduction,
    check_student,
    diagnose_nonfinite,
    real_positions,
    reduce,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.spec import register_loss

__all__ = ["IGNORE_INDEX", "cross_entropy"]


def label_positions(labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int = IGNORE_INDEX
                    ) -> torch.Tensor:
    """Bool ``[...]``: positions with a label (``!= ignore_index``) that are also real under ``mask``."""
    real = labels != ignore_index
    if mask is not None:
        real = real & real_positions(tuple(labels.shape), mask, labels.device)
    return real


@register_loss("cross_entropy",
               description="cross-entropy with the ground-truth labels (ignore_index -100); teacher unused",
               needs_teacher=False, needs_labels=True)
def cross_entropy(
    student_logits: torch.Tensor,
    teacher: Teacher | None = None,
    *,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """Cross-entropy ``-log softmax(z_s)[y]`` at positions with ``y != ignore_index`` (and ``mask``).

    Args:
        student_logits: ``[..., V]``.
        teacher: ignored (uniform signature), may be None.
        labels: int ``[...]`` target ids, ``ignore_index`` (-100) where there is no target.
            Labels are *not* shifted here: align them with the logits first.
        mask: optional bool ``[...]``, combined with the labels' own ignore mask.
        temperature: ignored (CE is always at T = 1).
        reduction: ``"mean"`` over labelled positions (0.0 when none), ``"sum"``, ``"none"``.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """
    check_student(student_logits)
    check_reduction(reduction)
    lead = tuple(student_logits.shape[:-1])
    if labels is None:
        raise ShapeError("cross_entropy needs labels", "pass labels=[...] token/class ids (-100 to ignore)")
    check_positions("labels", labels, lead)
    check_positions("mask", mask, lead)
    if labels.dtype.is_floating_point:
        raise ShapeError(f"labels must be integer ids, got {labels.dtype}", "pass class/token ids, e.g. labels.long()")
    real = label_positions(labels.to(student_logits.device), mask)
    logits = student_logits[real]
    targets = labels.to(student_logits.device)[real].long()
    checks = value_checks_enabled()
    if checks and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= student_logits.shape[-1]):
        raise ShapeError(
            f"labels outside [0, {student_logits.shape[-1]}) (other than ignore_index={ignore_index})",
            "labels must index the student's vocabulary/classes; use -100 for positions without a target",
        )
    if logits.shape[0] == 0:
        per_pos = upcast(logits).sum(-1)
    else:
        per_pos = torch.nn.functional.cross_entropy(upcast(logits), targets, reduction="none",
                                                    label_smoothing=label_smoothing)
        if check_finite and checks and not bool(torch.isfinite(per_pos.detach()).all()):
            raise diagnose_nonfinite("cross_entropy", logits, None)
    return reduce(per_pos, real, lead, reduction)
