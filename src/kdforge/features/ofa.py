"""OFA-KD: intermediate student features projected into logit space, distilled with adaptive target enhancement.

Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation" (NeurIPS 2023, arXiv:2310.19444). A learned head per tapped student stage maps its
features to class logits ``z_s`` (architecture-specific information is dropped in that shared
space, which is what lets a CNN learn from a ViT and back). Each head is trained against the
teacher's logits ``z_t`` with the OFA loss, for target class ``y``, ``p = softmax(z / T)``:

.. math::

    \\ell_{OFA} = -\\sum_{c} \\big[(p^t_c + \\mathbb{1}[c = y])^{\\gamma} - \\mathbb{1}[c = y]\\big] \\log p^s_c

i.e. weight ``(1 + p^t_y)^γ - 1`` on the target class and ``(p^t_c)^γ`` on the others (the form of
the authors' released code; the paper writes the target weight as ``(1 + p^t_y)^γ`` next to a
separate cross-entropy). With ``γ = 1`` it is the cross-entropy to the teacher, i.e. vanilla KD up
to the teacher's entropy; with ``γ > 1`` the target class is *enhanced* the more the teacher is
confident in it, and non-target classes are damped.
"""

from __future__ import annotations

import torch
from torch import nn

from kdforge.errors import ShapeError
from kdforge.features.losses import Reduction, _check_mask, _reduce, _up

__all__ = ["OFAHead", "ofa_loss", "ofa_targets"]


def ofa_targets(labels: torch.Tensor | None, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Target class per sample: the label where there is one, else the teacher's argmax."""
    guess = teacher_logits.argmax(-1)
    if labels is None:
        return guess
    labels = labels.to(guess.device).long()
    return torch.where((labels >= 0) & (labels < teacher_logits.shape[-1]), labels, guess)


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             mask: torch.Tensor | None = None, *, gamma: float = 1.0, temperature: float = 1.0,
             reduction: Reduction = "mean") -> torch.Tensor:
    """OFA loss per sample (module docstring).

    Args:
        student_logits: ``[B, K]`` logits of one OFA head (or the student's output).
        teacher_logits: ``[B, K]`` teacher logits (detached).
        target: ``[B]`` target class (see :func:`ofa_targets`).
        mask: ``[B]`` bool, real samples (None: all).
        gamma: the modulating exponent ``γ >= 1`` (1: plain KD cross-entropy).
        temperature: ``T`` applied to both sides.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ShapeError(f"ofa_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must both be [B, K]",
                         "give each OFA head the teacher's number of classes")
    s, t = _up(student_logits) / temperature, _up(teacher_logits.detach()) / temperature
    log_ps = torch.log_softmax(s, dim=-1)
    pt = torch.softmax(t, dim=-1)
    onehot = torch.zeros_like(pt).scatter_(-1, target.long().to(pt.device)[:, None], 1.0)
    weight = (pt + onehot).pow(gamma) - onehot
    per_sample = -(weight * log_ps).sum(-1)
    mask = _check_mask(per_sample, mask if mask is not None else torch.ones_like(per_sample, dtype=torch.bool),
                       "ofa_loss")
    return _reduce(per_sample, mask, reduction)


class OFAHead(nn.Module):
    """Projects one stage's features into logit space.

    A conv map ``[B, C, H, W]``: depthwise-separable 3x3 conv, BatchNorm, ReLU, global average
    pooling, linear to ``K`` classes (OFA's CNN branch, one block). A vector ``[B, D]`` (or tokens
    ``[B, T, D]``, mean over ``T``): LayerNorm then linear. ``conv`` is decided when the term is
    bound (from the tapped module's type), so no parameter sits unused.
    """

    def __init__(self, width: int, num_classes: int, *, conv: bool) -> None:
        super().__init__()
        self.conv = conv
        if conv:
            self.body: nn.Module = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.Conv2d(width, width, 1, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            self.body = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            if x.dim() != 4:
                raise ShapeError(f"OFA conv head expects [B, C, H, W] features, got {tuple(x.shape)}",
                                 "tap a convolutional stage, or a Linear layer for a vector head")
        else:
            if x.dim() == 3:
                x = x.mean(1)
            elif x.dim() != 2:
                raise ShapeError(f"OFA vector head expects [B, D] or [B, T, D] features, got {tuple(x.shape)}",
                                 "tap a Linear/Flatten output, or a convolutional stage for a conv head")
        return self.fc(self.body(x))
