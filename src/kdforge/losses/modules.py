"""Thin ``nn.Module`` wrappers around the pure losses (torchtune style).

They hold the hyper-parameters so a loss can be built once from a config and called like any
criterion::

    criterion = ForwardKL(temperature=2.0)
    loss = criterion(student_logits, teacher_logits, mask=attention_mask.bool())

Call-time keyword arguments override the stored ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.losses.registry import LOSSES

__all__ = [
    "DKD",
    "TAID",
    "AdaptiveKL",
    "CrossEntropy",
    "DistillationLoss",
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "TVD",
]


class DistillationLoss(nn.Module):
    """Any registered loss, by name, with stored keyword arguments.

    Args:
        name: a name of :data:`~kdforge.losses.LOSSES` (``kdforge losses`` lists them).
        **params: stored keyword arguments (``temperature``, ``reduction``, ``beta``...).
    """

    loss_name: str = ""

    def __init__(self, name: str | None = None, **params: Any) -> None:
        super().__init__()
        self.name = name or self.loss_name
        self.fn = LOSSES.get(self.name)
        self.params = params

    def forward(self, student_logits: torch.Tensor, teacher: Any = None, **kwargs: Any) -> torch.Tensor:
        return self.fn(student_logits, teacher, **{**self.params, **kwargs})

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name!r}{', ' if args else ''}{args}"


def _make(class_name: str, registry_name: str, doc: str) -> type[DistillationLoss]:
    def __init__(self, **params: Any) -> None:
        DistillationLoss.__init__(self, registry_name, **params)

    return type(class_name, (DistillationLoss,), {"__init__": __init__, "loss_name": registry_name,
                                                   "__doc__": doc})


ForwardKL = _make("ForwardKL", "forward_kl", "Module form of :func:`kdforge.losses.forward_kl`.")
ReverseKL = _make("ReverseKL", "reverse_kl", "Module form of :func:`kdforge.losses.reverse_kl`.")
GeneralizedJSD = _make("GeneralizedJSD", "generalized_jsd", "Module form of :func:`kdforge.losses.generalized_jsd`.")
TVD = _make("TVD", "tvd", "Module form of :func:`kdforge.losses.tvd`.")
SkewForwardKL = _make("SkewForwardKL", "skew_forward_kl", "Module form of :func:`kdforge.losses.skew_forward_kl`.")
SkewReverseKL = _make("SkewReverseKL", "skew_reverse_kl", "Module form of :func:`kdforge.losses.skew_reverse_kl`.")
AdaptiveKL = _make("AdaptiveKL", "adaptive_kl", "Module form of :func:`kdforge.losses.adaptive_kl`.")
DKD = _make("DKD", "dkd", "Module form of :func:`kdforge.losses.dkd`.")
CrossEntropy = _make("CrossEntropy", "cross_entropy", "Module form of :func:`kdforge.losses.cross_entropy`.")
TAID = _make("TAID", "taid", "Module form of :func:`kdforge.losses.taid` (pass ``t=`` per call or store it).")
