"""The distillation loss of a causal LM batch, in Hugging Face Trainer's conventions.

A Trainer batch holds ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` with *unshifted*
labels (``-100`` where there is no target: padding, prompt tokens of a response-only mask). The
student's ``logits[:, t]`` predict token ``t + 1``, so the loss positions are ``logits[:, :-1]``
against ``labels[:, 1:]``, and the real positions are ``labels[:, 1:] != -100``.

The total is

    L = (kd_weight * sum_i KD_i + ce_weight * sum_i CE_i) / N

over the real positions ``i`` of the micro-batch, with ``KD`` any loss of
:data:`kdforge.losses.LOSSES` (computed with ``reduction="sum"``) and ``N`` either
``num_items_in_batch`` (Trainer's count of real targets over *all* gradient-accumulation
micro-batches, so accumulating 4 micro-batches of 2 equals one batch of 8 whatever the token
counts) or, when it is None, the micro-batch's own number of real positions.

The teacher is dense logits ``[B, T, V]`` (or already at the loss positions, ``[B, T-1, V]``) or
a :class:`~kdforge.losses.SparseTeacher` of the same leading shape (the top-k of a teacher cache,
see :func:`sparse_teacher_from_batch`). Nothing here densifies a sparse teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import DataError, ShapeError
from kdforge.losses.registry import LOSSES
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.supervised import cross_entropy
from kdforge.teachers.forward import extract_logits
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.vocab import VOCAB_POLICIES, align_signal

__all__ = [
    "VOCAB_POLICIES",
    "KDLossOutput",
    "distillation_loss",
    "distillation_loss_from_hidden",
    "loss_positions",
    "normaliser",
    "sparse_teacher_from_batch",
]


@dataclass(frozen=True)
class KDLossOutput:
    """Result of :func:`distillation_loss`.

    Attributes:
        loss: differentiable ``(kd_weight * KD_sum + ce_weight * CE_sum) / num_items``.
        kd: detached ``KD_sum / num_items`` (unweighted).
        ce: detached ``CE_sum / num_items`` (unweighted; 0 when ``ce_weight == 0``).
        num_items: the normaliser ``N`` used (a float or a 0-dim tensor).
        num_positions: real positions of this micro-batch (0-dim int tensor).
    """

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    num_items: torch.Tensor | float
    num_positions: torch.Tensor


def _at_loss_positions(x: Any, batch_shape: tuple[int, int], what: str) -> Any:
    """``x[:, :-1]`` for ``[B, T, ...]`` input, ``x`` itself when already ``[B, T-1, ...]``."""
    b, t = batch_shape
    lead = tuple(x.shape[:2])
    if lead == (b, t):
        return x[:, :-1]
    if lead == (b, t - 1):
        return x
    raise ShapeError(
        f"{what} has leading shape {lead}; the batch is [B, T] = {(b, t)}, so expected [B, T, ...] or "
        f"[B, T-1, ...] (already shifted)",
        "give teacher and student the same batch (same padding and sequence length)",
    )


def loss_positions(
    student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | SparseTeacher | None, torch.Tensor, torch.Tensor]:
    """Apply the causal shift: ``(logits [B,T-1,V], teacher [B,T-1,...], labels [B,T-1], mask [B,T-1])``.

    ``labels`` are the Trainer's unshifted ``[B, T]`` labels; ``mask = labels[:, 1:] != -100``.
    """
    if labels.dim() != 2:
        raise ShapeError(f"labels must be [B, T], got {tuple(labels.shape)}",
                         "pass the batch's unshifted labels (Hugging Face convention)")
    shape = (int(labels.shape[0]), int(labels.shape[1]))
    logits = _at_loss_positions(student_logits, shape, "student logits")
    shifted = labels[:, 1:].to(logits.device).long()
    mask = shifted != IGNORE_INDEX
    if teacher is not None:
        teacher = _at_loss_positions(teacher, shape, "teacher signal")
        teacher = teacher.to(logits.device)
    return logits, teacher, shifted, mask


def normaliser(mask: torch.Tensor, num_items_in_batch: torch.Tensor | int | float | None) -> torch.Tensor | float:
    """``num_items_in_batch`` when given (Trainer's global count), else the real positions of ``mask``."""
    if num_items_in_batch is None:
        return mask.sum().clamp_min(1)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(mask.device).clamp_min(1)
    return max(float(num_items_in_batch), 1.0)


def _align_vocab(logits: torch.Tensor, teacher: Any, policy: str) -> tuple[torch.Tensor, Any]:
    """Student logits and teacher distribution on one vocabulary (:func:`kdforge.teachers.vocab.align_signal`)."""
    if teacher is None:
        return logits, None
    signal = TeacherSignal(sparse=teacher) if isinstance(teacher, SparseTeacher) else TeacherSignal(logits=teacher)
    aligned, student_slice = align_signal(signal, vocab_size=int(logits.shape[-1]), positions=tuple(logits.shape[:-1]),
                                          device=logits.device, dtype=logits.dtype, policy=policy, validate=False)
    if student_slice is not None:
        logits = logits[..., :student_slice]
    return logits, aligned.distribution


def distillation_loss(
    student_outputs: Any,
    teacher: torch.Tensor | SparseTeacher | None,
    labels: torch.Tensor,
    *,
    loss: str = "forward_kl",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float | None = None,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    vocab_policy: str = "exact",
    **params: Any,
) -> KDLossOutput:
    """KD (+ optional CE) loss of a causal-LM micro-batch, normalised the way HF Trainer expects.

    Args:
        student_outputs: the student's output (``.logits [B, T, V]``) or the logits tensor.
        teacher: dense teacher logits ``[B, T, V]`` / ``[B, T-1, V]``, a ``SparseTeacher`` with
            the same leading shape (``[..., k]``), or None when ``kd_weight == 0``.
        labels: unshifted ``[B, T]`` labels, ``-100`` where there is no target (they define the
            real positions of both terms: response-only masks follow from them).
        loss: a name of :data:`kdforge.losses.LOSSES` (``kdforge losses`` lists them).
        kd_weight, ce_weight: weights of the two sums (explicit; nothing is mixed silently).
        temperature: the KD loss's temperature (its result is scaled by ``T^2``); None keeps the
            loss's own default (1, or 4 for DKD). CE is always at ``T = 1``.
        num_items_in_batch: Trainer's count of real targets over the whole accumulated batch;
            None divides by this micro-batch's real positions.
        vocab_policy: ``"exact"`` (widths must match) or ``"shared_prefix"`` (padded embeddings:
            compare the first ``min(V_t, V_s)`` entries).
        **params: extra parameters of the loss (``beta``, ``sparse_policy``, ``t``...).

    Returns:
        :class:`KDLossOutput` (``.loss`` is what to backpropagate).

    Example:
        >>> out = distillation_loss(student(**inputs), teacher_logits, inputs["labels"],
        ...                         loss="reverse_kl", num_items_in_batch=num_items_in_batch)
        >>> out.loss.backward()
    """
    logits = extract_logits(student_outputs)
    if kd_weight != 0 and teacher is None:
        raise DataError("kd_weight != 0 but no teacher signal was given",
                        "pass teacher logits or a SparseTeacher, or set kd_weight=0")
    logits, teacher, shifted, mask = loss_positions(logits, teacher, labels)
    kd_logits, teacher = _align_vocab(logits, teacher, vocab_policy)
    zero = logits.new_zeros((), dtype=torch.float32)
    kd_sum = ce_sum = zero
    if kd_weight != 0:
        kw = dict(params)
        if temperature is not None:
            kw["temperature"] = temperature
        kd_sum = LOSSES.get(loss)(kd_logits, teacher, mask=mask, reduction="sum", labels=shifted, **kw)
    if ce_weight != 0:
        ce_sum = cross_entropy(logits, None, labels=shifted, mask=mask, reduction="sum")
    n = normaliser(mask, num_items_in_batch)
    total = (kd_weight * kd_sum + ce_weight * ce_sum) / n
    return KDLossOutput(total, (kd_sum / n).detach(), (ce_sum / n).detach(), n, mask.sum())


def distillation_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher | None,
    labels: torch.Tensor,
    *,
    loss: str = "forward_kl",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float | None = None,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    chunk_size: int | str = "auto",
    lm_head_bias: torch.Tensor | None = None,
    **params: Any,
) -> KDLossOutput:
    """:func:`distillation_loss` from the student's last hidden states, chunked over positions.

    Same value and gradients as the dense path, computed by
    :func:`kdforge.losses.chunked_distillation_loss` so the ``[B, T, V]`` student logits never
    exist at once (big vocabularies, long sequences).

    Args:
        hidden: ``[B, T, H]`` (or ``[B, T-1, H]``) final hidden states (after the final norm).
        lm_head_weight: ``[V, H]`` student LM head.
        teacher, labels, loss, kd_weight, ce_weight, temperature, num_items_in_batch, params:
            as in :func:`distillation_loss`.
        chunk_size: positions per chunk, or ``"auto"``.
    """
    from kdforge.losses.chunked import chunked_distillation_loss

    if kd_weight != 0 and teacher is None:
        raise DataError("kd_weight != 0 but no teacher signal was given",
                        "pass teacher logits or a SparseTeacher, or set kd_weight=0")
    hidden, teacher, shifted, mask = loss_positions(hidden, teacher, labels)
    if isinstance(teacher, SparseTeacher) and teacher.vocab_size in (0, lm_head_weight.shape[0]):
        teacher = SparseTeacher(teacher.ids, teacher.logprobs, int(lm_head_weight.shape[0]), teacher.num_exact)
    out = chunked_distillation_loss(
        hidden, lm_head_weight, teacher if kd_weight != 0 else None, loss=loss, labels=shifted, mask=mask,
        kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature, chunk_size=chunk_size,
        lm_head_bias=lm_head_bias, reduction="sum", **params,
    )
    n = normaliser(mask, num_items_in_batch)
    return KDLossOutput(out["loss"] / n, out["kd"] / n, out["ce"] / n, n, mask.sum())


def sparse_teacher_from_batch(
    batch: Mapping[str, Any],
    vocab_size: int = 0,
    *,
    ids_key: str = "teacher_ids",
    logprobs_key: str = "teacher_logprobs",
    num_exact_key: str = "teacher_num_exact",
) -> SparseTeacher:
    """The cached top-k of a batch (``teacher_ids``/``teacher_logprobs`` ``[B, T, k]``) as a SparseTeacher.

    ``vocab_size`` 0 means "the student's" (filled in by :func:`distillation_loss`).

    Raises:
        DataError: the batch lacks the cache keys.
    """
    missing = [k for k in (ids_key, logprobs_key) if k not in batch]
    if missing:
        raise DataError(
            f"the batch has no cached teacher keys {', '.join(map(repr, missing))} (keys: {sorted(batch)})",
            "build batches from a teacher cache (kdforge cache-teacher; TeacherCacheDataset), keep the keys "
            "through the collator, or give the trainer a teacher model",
        )
    num_exact = batch.get(num_exact_key)
    exact = int(num_exact.reshape(-1)[0]) if torch.is_tensor(num_exact) else num_exact
    return SparseTeacher(batch[ids_key].long(), batch[logprobs_key].float(), int(vocab_size), exact)
