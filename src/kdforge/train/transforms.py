"""Batch transforms: a chain of steps that rewrite a micro-batch before the loss sees it.

A :class:`BatchTransform` is called as ``transform(batch, ctx) -> batch`` with a
:class:`StepContext` (optimizer step, micro-batch index, the unwrapped student, the teacher
source). The trainer applies its transforms in order to every training micro-batch.
On-policy GKD is one (:class:`OnPolicyTransform`: the student's or teacher's own continuations
replace the data); mixing, HARD or mixup augmentations are others — one new class each, passed
as ``Distiller(..., transforms=[...])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from kdforge.train.onpolicy import GenerateFn, OnPolicyBatcher, OnPolicyConfig

__all__ = ["BatchTransform", "OnPolicyTransform", "StepContext"]


@dataclass(frozen=True)
class StepContext:
    """Where the trainer is when it transforms a micro-batch."""

    step: int
    micro: int
    student: nn.Module
    teacher: Any


class BatchTransform(Protocol):
    """``transform(batch, ctx) -> batch``; may keep state (``state_dict``/``load_state_dict``)."""

    def __call__(self, batch: Mapping[str, Any], ctx: StepContext) -> Mapping[str, Any]: ...


class OnPolicyTransform:
    """GKD (Agarwal et al. 2024): with probability ``lmbda`` the micro-batch is replaced by the
    student's own continuations of its prompts, scored by the teacher (see
    :class:`~kdforge.train.onpolicy.OnPolicyBatcher`)."""

    needs_scoring_teacher = True

    def __init__(self, config: OnPolicyConfig, generate_fn: GenerateFn | None = None, seed: int = 0) -> None:
        self.batcher = OnPolicyBatcher(config, generate_fn, seed=seed)

    @property
    def config(self) -> OnPolicyConfig:
        return self.batcher.config

    def __call__(self, batch: Mapping[str, Any], ctx: StepContext) -> Mapping[str, Any]:
        out, _ = self.batcher(batch, student=ctx.student, teacher=ctx.teacher, step=ctx.step, micro=ctx.micro)
        return out
