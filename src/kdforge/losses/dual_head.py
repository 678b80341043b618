"""Dual-head KD: the distillation term trains an auxiliary classifier head, CE trains the main one.

Yang et al., *Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary
Head* (2024): the gradients of two output losses conflict in the shared linear classifier (it
collapses) but not in the backbone; giving each loss its own head over the *same* backbone
features keeps the backbone benefit of both and removes the conflict. The auxiliary head is
dropped after training: the deployed student is the original model with its main head.

The student is wrapped in :class:`kdforge.students.DualHeadStudent`: its output is the main head's
logits (what the trainer and evaluation see) and it keeps the auxiliary head's logits of the same
forward pass for this loss (``heads=`` the wrapper; or pass ``aux_logits=`` directly). Per position

    ``ce_weight * CE(main, y) + kd_weight * D(aux, teacher) + main_kd_weight * D(main, teacher)``

with ``D`` any registered teacher loss (``kd_loss``, default ``forward_kl`` at ``temperature``;
the paper pairs a logit-level loss on the auxiliary head with the probability-level one on the
main head, ``main_kd_weight > 0``). The brief default ``main_kd_weight = 0`` is the strict form:
the teacher signal reaches the main head only through the shared backbone. With ``kd_weight = 0``
(and ``main_kd_weight = 0``) it is CE training of the main head (tested).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    Teacher,
    check_reduction,
    check_student,
    diagnose_nonfinite,
    value_checks_enabled,
)
from kdforge.losses.registry import LOSSES
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import register_loss
from kdforge.losses.supervised import cross_entropy

__all__ = ["dual_head_kd"]

log = logging.getLogger(__name__)
_WARNED = False


@register_loss("dual_head_kd",
               description="dual-head KD: CE on the main head, the KD loss on an auxiliary head (DualHeadStudent)",
               paper="Yang et al. 2024, Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an "
                     "Auxiliary Head", needs_labels=True, sparse_ok=False)
def dual_head_kd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    main_kd_weight: float = 0.0,
    kd_loss: str = "forward_kl",
    kd_params: dict[str, Any] | None = None,
    heads: nn.Module | None = None,
    aux_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> torch.Tensor:
    """Dual-head KD (module docstring).

    Args:
        student_logits: the main head's logits ``[..., C]``.
        teacher: dense teacher logits ``[..., C]``.
        kd_weight: weight of ``D(aux, teacher)``.
        ce_weight: weight of ``CE(main, labels)`` (labels ``-100`` skipped).
        main_kd_weight: weight of ``D(main, teacher)`` (0: the teacher reaches the main head only
            through the backbone).
        kd_loss: the registered teacher loss ``D`` (``kdforge losses``), e.g. ``forward_kl``, ``dkd``.
        kd_params: extra parameters of ``kd_loss``.
        heads: the :class:`~kdforge.students.DualHeadStudent` that produced ``student_logits``
            (its auxiliary logits of that forward pass are used); or
        aux_logits: the auxiliary head's logits ``[..., C]`` directly. With neither, both terms
            act on the one head (plain CE + KD, logged once as a warning).
        temperature: ``D``'s temperature.
        mask, labels, reduction, check_finite: as :func:`~kdforge.losses.forward_kl`; ``"mean"``
            divides by the real positions (``"sum"`` is what the trainer uses).
    """
    check_student(student_logits)
    check_reduction(reduction)
    if min(kd_weight, ce_weight, main_kd_weight) < 0:
        raise ConfigError("dual_head_kd weights must be >= 0", "use e.g. kd_weight=1.0, ce_weight=1.0")
    if kd_loss == "dual_head_kd" or kd_loss not in LOSSES:
        raise ConfigError(f"dual_head_kd: kd_loss {kd_loss!r} is not a registered teacher loss",
                          f"use one of: {', '.join(n for n in LOSSES.names() if n not in ('dual_head_kd', 'cross_entropy'))}")
    if isinstance(teacher, SparseTeacher):
        raise ConfigError("dual_head_kd needs dense teacher logits, got a SparseTeacher",
                          "use an online or cached dense teacher")
    if heads is not None and aux_logits is not None:
        raise ConfigError("dual_head_kd takes heads= or aux_logits=, not both",
                          "pass the DualHeadStudent as heads= (or its auxiliary logits as aux_logits=)")
    main = student_logits
    if heads is not None:
        aux = heads.take_aux()
    elif aux_logits is not None:
        aux = aux_logits
    else:  # one shared head: plain ce_weight * CE + kd_weight * D (the conflict the paper removes)
        global _WARNED
        if not _WARNED:
            _WARNED = True
            log.warning("dual_head_kd got no auxiliary head (heads=/aux_logits=): both terms act on the one head; "
                        "wrap the student in kdforge.students.DualHeadStudent and pass heads= for dual-head KD")
        aux = main
    if aux.shape != main.shape:
        raise ShapeError(f"dual_head_kd: auxiliary logits {tuple(aux.shape)} differ from the main ones "
                         f"{tuple(main.shape)}", "the auxiliary head must map the same features to the same classes")
    d = LOSSES.get(kd_loss)
    params = {"temperature": temperature, **(kd_params or {})}
    if "check_finite" in d.param_names:
        params.setdefault("check_finite", check_finite)
    sub = "sum" if reduction != "none" else "none"
    total = ce_weight * cross_entropy(main, None, labels=labels, mask=mask, reduction=sub, check_finite=check_finite)
    if kd_weight:
        total = total + kd_weight * d(aux, teacher, mask=mask, labels=labels, reduction=sub, **params)
    if main_kd_weight:
        total = total + main_kd_weight * d(main, teacher, mask=mask, labels=labels, reduction=sub, **params)
    if check_finite and value_checks_enabled() and not bool(torch.isfinite(total.detach()).all()):
        raise diagnose_nonfinite("dual_head_kd", main, teacher)
    if reduction == "mean":
        n = main.shape[:-1].numel() if mask is None else mask.sum().clamp(min=1)
        total = total / n
    return total
