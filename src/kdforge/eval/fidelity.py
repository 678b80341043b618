"""Fidelity of a student to its teacher over real positions: top-1 agreement, KL in both
directions, JS, reduced per token, per sample, or not at all.

The per-position definitions are the losses layer's (:mod:`kdforge.losses.fidelity`: the
divergences' own kernels on the losses' dense / sparse pairs, chunked over positions); this
module masks and reduces them. Only real positions count (``mask`` true / labels not ``-100``).
The metrics reduce per token (every real position weighs the same), per sample (mean over each
sequence's real positions, then over sequences) or not at all.

``kl_to_teacher`` is ``KL(p_teacher || q_student)``, ``kl_from_teacher`` ``KL(q || p)``,
``js_to_teacher`` the Jensen-Shannon divergence (nats, ``<= ln 2``), all at temperature 1; for a
sparse top-k teacher over the top-k tokens plus one tail bucket (a lower bound of the full
divergence; agreement stays exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from kdforge.errors import ShapeError
from kdforge.losses._core import check_student, check_teacher
from kdforge.losses.fidelity import FIDELITY_KEYS, fidelity_per_position
from kdforge.losses.signal import SparseTeacher

Reduction = Literal["token", "sample", "none"]
TeacherSignal = torch.Tensor | SparseTeacher

__all__ = [
    "FIDELITY_KEYS",
    "FidelityAccumulator",
    "fidelity",
    "fidelity_on_real_positions",
    "fidelity_per_position",
]


def _resolve_mask(mask: torch.Tensor | None, lead: torch.Size, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(lead):
        raise ShapeError(
            f"mask shape {tuple(mask.shape)} does not match the positions {tuple(lead)}",
            "pass a [batch, seq] mask aligned with the (shifted) logits; True marks real tokens",
        )
    return mask.to(device=device).bool()


def fidelity_on_real_positions(student_logits: torch.Tensor, teacher: TeacherSignal, m: torch.Tensor, *,
                               chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """:func:`fidelity_per_position` computed at the real positions only (``m`` true), zeros elsewhere.

    Chat and prompt/completion data score a minority of positions (the response tokens); the
    vocabulary-wide divergences of the others would be computed only to be masked out.

    Args:
        student_logits: ``[batch, seq, vocab]`` (or ``[N, vocab]``).
        teacher: dense logits of the same shape or a ``SparseTeacher`` ``[batch, seq, k]``.
        m: bool ``[batch, seq]`` (or ``[N]``), True at the positions to score.

    Returns:
        ``{key: float32 [batch, seq]}`` for every key of ``FIDELITY_KEYS`` (0 where ``m`` is false).
    """
    if bool(m.all()):
        return fidelity_per_position(student_logits, teacher, chunk_size=chunk_size)
    check_student(student_logits)
    check_teacher(student_logits, teacher)  # the losses' shape messages before any indexing
    vocab = student_logits.shape[-1]
    flat = m.reshape(-1)
    s_real = student_logits.reshape(-1, vocab)[flat]
    t_real = teacher.flatten()[flat] if isinstance(teacher, SparseTeacher) else teacher.reshape(-1, vocab)[flat]
    per = fidelity_per_position(s_real, t_real, chunk_size=chunk_size)
    out = {}
    for k, v in per.items():
        full = torch.zeros(flat.shape[0], dtype=v.dtype, device=v.device)
        full[flat] = v
        out[k] = full.reshape(m.shape)
    return out


@dataclass
class FidelityAccumulator:
    """Streaming fidelity over many batches (an eval loop calls :meth:`update` per batch).

    Token reduction: ``sum_i m_i * x_i / sum_i m_i`` over all real positions seen.
    Sample reduction: mean over sequences of each sequence's per-token mean (sequences with no
    real position are skipped). Inputs of shape ``[N, vocab]`` count as one sequence each row.
    """

    chunk_size: int = 1024
    token_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FIDELITY_KEYS, 0.0))
    sample_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FIDELITY_KEYS, 0.0))
    n_tokens: int = 0
    n_samples: int = 0

    def update(
        self,
        student_logits: torch.Tensor,
        teacher: TeacherSignal,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: logits ``[batch, seq, vocab]`` (or ``[N, vocab]``), mask ``[batch, seq]``."""
        m = _resolve_mask(mask, student_logits.shape[:-1], student_logits.device)
        self.add(fidelity_on_real_positions(student_logits, teacher, m, chunk_size=self.chunk_size), m)

    def add(self, per: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> None:
        """Add per-position values already computed (:func:`fidelity_per_position`, each ``[batch, seq]``
        or ``[N]``), so that several accumulators (all positions, one domain) share one pass."""
        ref = per[FIDELITY_KEYS[0]]
        m = _resolve_mask(mask, ref.shape, ref.device)
        mf = m.float()
        if mf.dim() == 1:
            mf = mf.unsqueeze(-1)
        seq_count = mf.reshape(mf.shape[0], -1).sum(-1)
        has = seq_count > 0
        for k, v in per.items():
            vm = torch.where(m, v, torch.zeros_like(v)).reshape(mf.shape[0], -1)
            self.token_sums[k] += float(vm.sum())
            self.sample_sums[k] += float((vm.sum(-1)[has] / seq_count[has]).sum())
        self.n_tokens += int(m.sum())
        self.n_samples += int(has.sum())

    def compute(self, reduction: Literal["token", "sample"] = "token") -> dict[str, float]:
        """Reduced metrics (``nan`` when no real position was seen) plus ``n_tokens``."""
        if reduction not in ("token", "sample"):
            raise ShapeError(f"unknown reduction {reduction!r}", "use 'token' or 'sample'")
        sums, n = (self.token_sums, self.n_tokens) if reduction == "token" else (
            self.sample_sums,
            self.n_samples,
        )
        out = {k: (sums[k] / n if n else math.nan) for k in FIDELITY_KEYS}
        out["n_tokens"] = float(self.n_tokens)
        return out


def fidelity(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    mask: torch.Tensor | None = None,
    *,
    reduction: Reduction = "token",
    chunk_size: int = 1024,
) -> dict[str, float] | dict[str, torch.Tensor]:
    """Fidelity of a student to a teacher over real positions.

    Args:
        student_logits: ``[batch, seq, vocab]`` (or ``[N, vocab]``) student logits.
        teacher: dense teacher logits of the same shape, or a ``SparseTeacher`` ``[batch, seq, k]``.
        mask: ``[batch, seq]`` bool, True at real positions (default: all real).
        reduction: ``"token"`` (mean over real tokens), ``"sample"`` (mean over sequences of the
            per-sequence mean) or ``"none"`` (per-position tensors; masked positions are ``nan``).
        chunk_size: positions per chunk.

    Returns:
        ``{"agreement", "kl_to_teacher" (KL(p_T||p_S)), "kl_from_teacher" (KL(p_S||p_T)),
        "js_to_teacher"}`` as floats (plus ``n_tokens``), or tensors with ``reduction="none"``.

    Example:
        >>> s = torch.randn(2, 5, 11); t = torch.randn(2, 5, 11)
        >>> round(fidelity(s, s)["kl_to_teacher"], 6)
        0.0
    """
    if reduction == "none":
        per = fidelity_per_position(student_logits, teacher, chunk_size=chunk_size)
        m = _resolve_mask(mask, student_logits.shape[:-1], student_logits.device)
        return {k: torch.where(m, v, torch.full_like(v, math.nan)) for k, v in per.items()}
    acc = FidelityAccumulator(chunk_size=chunk_size)
    acc.update(student_logits, teacher, mask)
    return acc.compute(reduction)
