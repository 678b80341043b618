"""Thin ``nn.Module`` wrappers of the feature losses, for use outside an :class:`~kdforge.train.Objective`.

Each holds only what the pure function cannot: a learned projector (hints) or fixed options.
Shapes and reductions are those of :mod:`kdforge.features.losses`. Example::

    hint = HiddenMSE(student_width=256, teacher_width=576)   # learned nn.Linear(256, 576)
    loss = hint(h_student, h_teacher, mask)                    # [B, T, 256], [B, T, 576], [B, T]
    optimizer = torch.optim.AdamW([*student.parameters(), *hint.parameters()])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kdforge.errors import ConfigError
from kdforge.features.losses import (
    Reduction,
    attention_kl,
    cka_loss,
    cosine_hidden,
    hidden_mse,
    value_relation_kl,
)

__all__ = ["CKALoss", "AttentionKL", "CosineHidden", "HiddenMSE", "ValueRelationKL", "make_projector"]


def make_projector(student_width: int, teacher_width: int,
                   mode: Literal["auto", "linear", "identity"] = "auto") -> nn.Module:
    """FitNets regressor ``r: R^{H_s} -> R^{H_t}``.

    ``"auto"``: identity when the widths match, else linear; ``"linear"``: always a learned
    ``nn.Linear`` (a square one starts as the identity, zero bias); ``"identity"``: no parameters
    (widths must match).
    """
    if mode == "identity" or (mode == "auto" and student_width == teacher_width):
        if student_width != teacher_width:
            raise ConfigError(f"identity projector between widths {student_width} and {teacher_width}",
                              "use a linear projector")
        return nn.Identity()
    if mode not in ("auto", "linear"):
        raise ConfigError(f"unknown projector {mode!r}", "use 'auto', 'linear' or 'identity'")
    proj = nn.Linear(student_width, teacher_width)
    with torch.no_grad():
        if student_width == teacher_width:
            proj.weight.copy_(torch.eye(student_width))
        proj.bias.zero_()
    return proj


class _Hint(nn.Module):
    def __init__(self, student_width: int, teacher_width: int,
                 projector: Literal["auto", "linear", "identity"] = "auto", reduction: Reduction = "mean") -> None:
        super().__init__()
        self.projector = make_projector(student_width, teacher_width, projector)
        self.reduction = reduction

    def _project(self, student: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        axis = mask.dim() if mask is not None else student.dim() - 1
        if axis == student.dim() - 1:
            return self.projector(student)
        return self.projector(student.movedim(axis, -1)).movedim(-1, axis)


class HiddenMSE(_Hint):
    """FitNets hint: :func:`~kdforge.features.losses.hidden_mse` of ``projector(student)`` and ``teacher``.

    The projector acts on the first feature axis (the width ``H`` of ``[B, T, H]``, the channels of
    ``[B, C, H, W]`` with a ``[B]`` mask: a 1x1 convolution). ``normalize=True`` standardises each
    position's features on both sides first (scale-free).
    """

    def __init__(self, student_width: int, teacher_width: int,
                 projector: Literal["auto", "linear", "identity"] = "auto", reduction: Reduction = "mean",
                 normalize: bool = False) -> None:
        super().__init__(student_width, teacher_width, projector, reduction)
        self.normalize = normalize

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_mse(self._project(student, mask), teacher, mask, reduction=self.reduction,
                          normalize=self.normalize)


class CosineHidden(_Hint):
    """:func:`~kdforge.features.losses.cosine_hidden` of ``projector(student)`` and ``teacher``."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return cosine_hidden(self._project(student, mask), teacher, mask, reduction=self.reduction)


class AttentionKL(nn.Module):
    """:func:`~kdforge.features.losses.attention_kl` with fixed ``heads`` and ``reduction``."""

    def __init__(self, heads: Literal["auto", "match", "average"] = "auto", reduction: Reduction = "mean") -> None:
        super().__init__()
        self.heads, self.reduction = heads, reduction

    def forward(self, student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return attention_kl(student_attn, teacher_attn, mask, heads=self.heads, reduction=self.reduction)


class ValueRelationKL(nn.Module):
    """:func:`~kdforge.features.losses.value_relation_kl` with fixed ``relation_heads``/``causal``."""

    def __init__(self, relation_heads: int = 1, causal: bool = False, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.relation_heads, self.causal, self.reduction = relation_heads, causal, reduction

    def forward(self, student_values: torch.Tensor, teacher_values: torch.Tensor, mask: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return value_relation_kl(student_values, teacher_values, mask, relation_heads=self.relation_heads,
                                 key_mask=key_mask, causal=self.causal, reduction=self.reduction)


class CKALoss(nn.Module):
    """``1 - CKA`` (:func:`~kdforge.features.losses.cka_loss`); no projector (widths may differ)."""

    def __init__(self, reduction: Literal["mean", "sum"] = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return cka_loss(student, teacher, mask, reduction=self.reduction)
