"""Fidelity of a student to its teacher: top-1 agreement, KL in both directions, JS.

Per position ``i`` with teacher distribution ``p_i`` and student distribution ``q_i`` (both at
temperature 1, over the full vocabulary):

* agreement ``a_i = [argmax p_i == argmax q_i]``
* forward KL ``KL(p||q) = sum_v p_v (log p_v - log q_v)`` (teacher-weighted; the quantity Hinton
  KD minimises; the ``eval/kl_to_teacher`` of ``docs/run-format.md``)
* reverse KL ``KL(q||p) = sum_v q_v (log q_v - log p_v)`` (student-weighted; MiniLLM)
* Jensen-Shannon ``JS = 0.5 KL(p||m) + 0.5 KL(q||m)``, ``m = (p + q) / 2`` (in nats, ``<= ln 2``)

Only real positions count (``mask`` true / labels not ``-100``). The metrics reduce per token
(every real position weighs the same), per sample (mean over each sequence's real positions,
then over sequences) or not at all.

**Memory.** Positions are processed in chunks of ``chunk_size``: the float32 log-softmax of
both models exists only for one chunk, so ``[tokens, vocab]`` float32 tensors for both models
never coexist for a whole batch (vocabularies are 32k-256k).

**Sparse teachers.** With a :class:`~kdforge.losses.signal.SparseTeacher` (top-k ids and their
full-vocabulary log-probabilities) the divergences are computed on the *coarse-grained*
distributions over ``k + 1`` outcomes: the teacher's top-k tokens plus one "tail" bucket
holding everything else (``p_tail = 1 - sum_k p``; the student's ``q_tail = 1 - sum_k q`` over
the same ids). By the data-processing inequality these are lower bounds of the full-vocabulary
divergences, exact when ``k`` covers the vocabulary (the tail bucket is then dropped). Entries
with teacher log-prob ``-inf`` (padding of a cache) are ignored. Agreement compares the
student's full-vocabulary argmax with the teacher's top-1 id, which is exact for any ``k >= 1``.

References: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015); Gu et al.,
"MiniLLM" (2024) for reverse KL; Agarwal et al., "On-Policy Distillation of Language Models"
(GKD, 2024) for JS-type divergences as fidelity measures.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from kdforge.errors import ShapeError, VocabMismatchError
from kdforge.losses.signal import SparseTeacher

Reduction = Literal["token", "sample", "none"]
TeacherSignal = torch.Tensor | SparseTeacher

#: Keys of every fidelity result, in display order.
FIDELITY_KEYS: tuple[str, ...] = ("agreement", "kl_to_teacher", "kl_from_teacher", "js_to_teacher")
_TAIL_EPS = 1e-8  # floor for a tail bucket that rounding drove to <= 0 while k < vocab
_LN2 = math.log(2.0)

__all__ = [
    "FIDELITY_KEYS",
    "FidelityAccumulator",
    "fidelity",
    "fidelity_per_position",
]


def _check_shapes(student_logits: torch.Tensor, teacher: TeacherSignal) -> None:
    if isinstance(teacher, SparseTeacher):
        lead, vocab = tuple(teacher.shape), teacher.vocab_size
    else:
        lead, vocab = tuple(teacher.shape[:-1]), int(teacher.shape[-1])
    if tuple(student_logits.shape[:-1]) != lead:
        raise ShapeError(
            f"student logits have positions {tuple(student_logits.shape[:-1])} but the teacher "
            f"signal has {lead}",
            "pass teacher and student outputs for the same batch (same [batch, seq]); shift "
            "both the same way for next-token prediction",
        )
    if int(student_logits.shape[-1]) != vocab:
        raise VocabMismatchError(
            f"student vocabulary {student_logits.shape[-1]} != teacher vocabulary {vocab}",
            "slice both logits to the shared tokenizer vocabulary (logits[..., :len(tokenizer)]) "
            "or use a cross-tokenizer method; fidelity needs one shared vocabulary",
        )


def _chunks(n: int, chunk_size: int) -> Iterator[slice]:
    step = max(int(chunk_size), 1)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _xlogy_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum p (log p - log q)`` over the last dim, with ``0 log 0 = 0`` (p given in log space)."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


def _js(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    log_m = torch.logaddexp(log_p, log_q) - _LN2
    return 0.5 * _xlogy_kl(log_p, log_m) + 0.5 * _xlogy_kl(log_q, log_m)


def _dense_chunk(s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    log_q = torch.log_softmax(s_logits.float(), dim=-1)
    log_p = torch.log_softmax(t_logits.float(), dim=-1)
    return {
        "agreement": (log_q.argmax(-1) == log_p.argmax(-1)).float(),
        "kl_to_teacher": _xlogy_kl(log_p, log_q),
        "kl_from_teacher": _xlogy_kl(log_q, log_p),
        "js_to_teacher": _js(log_p, log_q),
    }


def _bucket_logs(log_k: torch.Tensor, valid: torch.Tensor, with_tail: bool) -> torch.Tensor:
    """``[n, k]`` log-probs of the top-k ids -> ``[n, k(+1)]`` log-probs incl. the tail bucket."""
    log_k = torch.where(valid, log_k, torch.full_like(log_k, -math.inf))
    if not with_tail:
        return log_k
    tail = (1.0 - log_k.double().exp().sum(-1, keepdim=True)).clamp_min(_TAIL_EPS)
    return torch.cat([log_k, tail.log().to(log_k.dtype)], dim=-1)


def _sparse_chunk(s_logits: torch.Tensor, teacher: SparseTeacher) -> dict[str, torch.Tensor]:
    log_q_full = torch.log_softmax(s_logits.float(), dim=-1)
    ids = teacher.ids.long()
    t_logp = teacher.logprobs.float()
    valid = torch.isfinite(t_logp)
    # a repeated (padding) id must not count the student's mass twice: keep the first valid one
    if ids.shape[-1] > 1:
        key = ids * 2 + (~valid).long()  # equal ids: the valid entry sorts first
        sorted_key, perm = key.sort(dim=-1, stable=True)
        sorted_ids = sorted_key // 2
        dup_sorted = torch.zeros_like(sorted_ids, dtype=torch.bool)
        dup_sorted[..., 1:] = sorted_ids[..., 1:] == sorted_ids[..., :-1]
        valid = valid & ~torch.zeros_like(dup_sorted).scatter(-1, perm, dup_sorted)
    with_tail = teacher.k < teacher.vocab_size
    log_p = _bucket_logs(t_logp, valid, with_tail)
    log_q = _bucket_logs(log_q_full.gather(-1, ids), valid, with_tail)
    top1 = ids.gather(-1, torch.where(valid, t_logp, -math.inf).argmax(-1, keepdim=True)).squeeze(-1)
    return {
        "agreement": (log_q_full.argmax(-1) == top1).float(),
        "kl_to_teacher": _xlogy_kl(log_p, log_q),
        "kl_from_teacher": _xlogy_kl(log_q, log_p),
        "js_to_teacher": _js(log_p, log_q),
    }


@torch.no_grad()
def fidelity_per_position(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Per-position fidelity metrics, no masking, no reduction.

    Args:
        student_logits: ``[..., vocab]`` student logits (any float dtype; upcast per chunk).
        teacher: dense teacher logits ``[..., vocab]`` or a ``SparseTeacher`` ``[..., k]``.
        chunk_size: positions per chunk (bounds the float32 working set to
            ``2 * chunk_size * vocab`` floats).

    Returns:
        ``{"agreement", "kl_to_teacher", "kl_from_teacher", "js_to_teacher"}``, each a float32
        tensor of the leading shape ``[...]``.
    """
    _check_shapes(student_logits, teacher)
    lead = student_logits.shape[:-1]
    s_flat = student_logits.reshape(-1, student_logits.shape[-1])
    if isinstance(teacher, SparseTeacher):
        t_flat: TeacherSignal = teacher.flatten()
    else:
        t_flat = teacher.reshape(-1, teacher.shape[-1])
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in FIDELITY_KEYS}
    for sl in _chunks(s_flat.shape[0], chunk_size):
        if isinstance(t_flat, SparseTeacher):
            out = _sparse_chunk(s_flat[sl], t_flat[sl])
        else:
            out = _dense_chunk(s_flat[sl], t_flat[sl])
        for k in FIDELITY_KEYS:
            parts[k].append(out[k])
    device = student_logits.device
    return {
        k: (torch.cat(v) if v else torch.zeros(0, device=device)).reshape(lead)
        for k, v in parts.items()
    }


def _resolve_mask(mask: torch.Tensor | None, lead: torch.Size, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(lead):
        raise ShapeError(
            f"mask shape {tuple(mask.shape)} does not match the positions {tuple(lead)}",
            "pass a [batch, seq] mask aligned with the (shifted) logits; True marks real tokens",
        )
    return mask.to(device=device).bool()


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
        per = fidelity_per_position(student_logits, teacher, chunk_size=self.chunk_size)
        m = _resolve_mask(mask, student_logits.shape[:-1], student_logits.device)
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
