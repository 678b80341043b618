"""CrossTokenizerTeacher: a live teacher with its own tokenizer, aligned to the student's positions.

Per micro-batch:

1. the teacher's tokenization of the batch's text: the :data:`~kdforge.teachers.crosstok.TEACHER_KEYS`
   a :class:`~kdforge.teachers.crosstok.CrossTokenizerCollator` put in the batch, or, failing
   that, :func:`~kdforge.teachers.crosstok.retokenize` of the student's ids (on-policy samples,
   existing pipelines);
2. :func:`~kdforge.teachers.alignment.align_offsets` pairs student and teacher loss positions by
   character offsets (``span_policy`` ``"merge"`` or ``"skip"``);
3. the teacher runs on its own ids (frozen, ``no_grad``); its logits at the paired positions are
   gathered onto the student's loss positions, and under ``"merge"`` its log-probability of the
   rest of each span group (``log_scale``) is summed with one scatter;
4. the signal is a :class:`~kdforge.losses.uld.CrossVocabTeacher` ``[B, T_s - 1, V_t]`` for the
   vocabulary-free losses (``uld``, ``gold``), with the string-matched shared vocabulary.

Steps 2-3 are tensor operations over the batch (the alignment is numpy per example); nothing loops
over tokens in Python. Use it with :class:`~kdforge.train.CausalLMTask` (loss position ``t``
predicts token ``t + 1``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError, DataError
from kdforge.teachers.alignment import SPAN_POLICIES, TokenAlignment, align_offsets
from kdforge.teachers.crosstok import TEACHER_KEYS, retokenize, shared_vocabulary
from kdforge.teachers.forward import check_lm_input, run_model
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

log = logging.getLogger(__name__)

__all__ = ["CACHED_KEYS", "CachedCrossTokenizerTeacher", "CrossTokenizerTeacher", "aligned_signal"]


class CrossTokenizerTeacher(TeacherSource):
    """A frozen teacher whose tokenizer differs from the student's.

    Args:
        teacher: the teacher model (``nn.Module``) or an :class:`~kdforge.teachers.OnlineTeacher`.
        teacher_tokenizer / student_tokenizer: fast tokenizers (character offsets).
        span_policy: ``"merge"`` (every span group compared at its start, split spans folded in by
            the chain rule) or ``"skip"`` (only spans both tokenizers cut alike).
        device / dtype: as :class:`~kdforge.teachers.OnlineTeacher` (a given device pins it).

    Attributes:
        last_alignment: the :class:`~kdforge.teachers.alignment.TokenAlignment` of the last batch
            (for agreement metrics and logs).
    """

    provides = frozenset({"cross"})
    scores_new_samples = True
    #: the student's ids are not the teacher's: the trainer must not check them against the teacher
    tokenizes_itself = True

    def __init__(self, teacher: Any, teacher_tokenizer: Any, student_tokenizer: Any, *,
                 span_policy: str = "merge", device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None) -> None:
        from kdforge.teachers.online import OnlineTeacher

        if span_policy not in SPAN_POLICIES:
            raise ConfigError(f"unknown span_policy {span_policy!r}", f"use one of: {', '.join(SPAN_POLICIES)}")
        self.online = teacher if isinstance(teacher, OnlineTeacher) else OnlineTeacher(teacher, device, dtype)
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.span_policy = span_policy
        self.shared_student_ids, self.shared_teacher_ids = shared_vocabulary(student_tokenizer, teacher_tokenizer)
        self.last_alignment: TokenAlignment | None = None
        self._checked = False
        log.info("cross-tokenizer teacher: %d tokens shared by string (student vocabulary %d, teacher %d)",
                 len(self.shared_student_ids), len(student_tokenizer.get_vocab()), len(teacher_tokenizer.get_vocab()))

    @property
    def model(self) -> nn.Module:
        return self.online.model

    def modules(self) -> list[nn.Module]:
        return self.online.modules()

    def place(self, device: torch.device | str) -> None:
        self.online.place(device)

    def teacher_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's :data:`TEACHER_KEYS` (from the collator, or re-tokenized from the student's ids)."""
        present = [k for k in TEACHER_KEYS if k in batch]
        if len(present) == len(TEACHER_KEYS):
            return {k: batch[k] for k in TEACHER_KEYS}
        if present:
            missing = sorted(set(TEACHER_KEYS) - set(present))
            raise DataError(f"the batch has some cross-tokenizer keys but not {missing}",
                            "collate with kdforge.teachers.CrossTokenizerCollator (it writes all of them)")
        ids = batch["input_ids"]
        return retokenize(ids.cpu(), None if batch.get("attention_mask") is None else batch["attention_mask"].cpu(),
                          self.student_tokenizer, self.teacher_tokenizer)

    def align(self, batch: Mapping[str, Any]) -> tuple[TokenAlignment, dict[str, torch.Tensor]]:
        """The alignment of ``batch``'s student and teacher tokenizations, and the teacher's keys."""
        keys = self.teacher_batch(batch)
        s_mask = batch.get("attention_mask")
        alignment = align_offsets(keys["student_offsets"], keys["teacher_offsets"],
                                  student_mask=None if s_mask is None else s_mask.cpu(),
                                  teacher_mask=keys["teacher_attention_mask"].cpu(), policy=self.span_policy)
        return alignment, keys

    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        from kdforge.losses.uld import CrossVocabTeacher

        if features is not None:
            raise ConfigError("feature terms cannot compare a teacher with another tokenizer (positions differ)",
                              "remove the feature terms, or distil from a teacher with the student's tokenizer")
        alignment, keys = self.align(batch)
        input_ids = batch["input_ids"]
        device = input_ids.device
        t_ids = keys["teacher_input_ids"]
        student_pos = task.to_loss_positions(input_ids, batch, what="student ids")
        if tuple(student_pos.shape) != tuple(alignment.mask.shape):
            raise DataError(f"student loss positions {tuple(student_pos.shape)} are not the alignment's "
                            f"{tuple(alignment.mask.shape)}", "use CausalLMTask with a CrossTokenizerTeacher")
        if t_ids.shape[1] < 2:  # nothing to predict on the teacher side
            b, p = alignment.mask.shape
            vocab = self.online.vocab_size or self.model.get_output_embeddings().weight.shape[0]
            logits = torch.zeros(b, p, vocab, device=device)
            cross = CrossVocabTeacher(logits, mask=torch.zeros(b, p, dtype=torch.bool, device=device))
            return TeacherSignal(cross=cross)
        if not self._checked:
            check_lm_input(self.model, t_ids, "teacher")
            self._checked = True
        logits = run_model(self.model, input_ids=t_ids, attention_mask=keys["teacher_attention_mask"])
        if self.online.vocab_size is not None:
            logits = logits[..., : self.online.vocab_size]
        # teacher loss positions: position u predicts token u + 1
        cross, a = aligned_signal(logits[:, :-1].to(device), t_ids, alignment, input_ids, self.span_policy,
                                  self.shared_student_ids, self.shared_teacher_ids)
        self.last_alignment = a
        return TeacherSignal(cross=cross)


def aligned_signal(logits: torch.Tensor, teacher_ids: torch.Tensor, alignment: TokenAlignment,
                   input_ids: torch.Tensor, span_policy: str, shared_student_ids: torch.Tensor,
                   shared_teacher_ids: torch.Tensor) -> tuple[Any, TokenAlignment]:
    """The teacher's distributions at its loss positions, moved onto the student's.

    Args:
        logits: ``[B, T_t - 1, V_t]`` teacher logits (or log-probs) at its loss positions
            (position ``u`` predicts teacher token ``u + 1``), on the student's device.
        teacher_ids: ``[B, T_t]`` the teacher's token ids.
        alignment: the batch's :class:`TokenAlignment`.
        input_ids: ``[B, T_s]`` the student's ids.

    Returns:
        ``(CrossVocabTeacher [B, T_s - 1, V_t], alignment on the device)``. Under ``"merge"`` the
        teacher's log-probability of the rest of each span group (``log_softmax`` of ``logits`` at
        its later positions, gathered at the actual next tokens) is summed with one scatter.
    """
    from kdforge.losses.uld import CrossVocabTeacher

    device = logits.device
    a = alignment.to(device)
    t_next = teacher_ids[:, 1:].to(device)
    log_scale_t = torch.zeros(t_next.shape, dtype=torch.float32, device=device)
    later = a.teacher_merge >= 0
    if span_policy == "merge":  # the teacher's log-probability of the rest of each span group
        rows = logits[later].float()
        lp = rows.gather(-1, t_next[later][:, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1)
        log_scale_t = log_scale_t.index_put((later.nonzero()[:, 0], a.teacher_merge[later]), lp, accumulate=True)
    pos = a.teacher_pos
    gathered = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    cross = CrossVocabTeacher(
        gathered,
        mask=a.mask,
        log_scale=log_scale_t.gather(1, pos) if span_policy == "merge" else None,
        student_merge=a.student_merge if span_policy == "merge" else None,
        student_next=input_ids[:, 1:].to(device),
        shared_student_ids=shared_student_ids.to(device),
        shared_teacher_ids=shared_teacher_ids.to(device),
    )
    return cross, a


#: batch keys of the cached teacher's top-k (at the teacher's positions) for cross-tokenizer KD
CACHED_KEYS = ("cached_teacher_ids", "cached_teacher_logprobs")


class CachedCrossTokenizerTeacher(TeacherSource):
    """Cross-tokenizer KD from a teacher cache built with token offsets (no live teacher).

    Batches come from :class:`~kdforge.teachers.cache.CrossTokenizerCacheDataset` through a
    :class:`~kdforge.teachers.cache.CachedCrossTokenizerCollator`: the student's tokenization of
    the texts, the teacher's cached ids/offsets (:data:`~kdforge.teachers.crosstok.TEACHER_KEYS`)
    and its cached top-k ``[B, T_t, k]`` (:data:`CACHED_KEYS`). Per batch: the same
    :func:`~kdforge.teachers.alignment.align_offsets` as the live :class:`CrossTokenizerTeacher`;
    the top-k is completed to ``[B, T_t - 1, V_t]`` log-probs (the tail mass ``1 - Σ_k p`` spread
    uniformly over the other tokens, :meth:`SparseTeacher.to_dense_logprobs`) and moved onto the
    student's positions by :func:`aligned_signal`. With ``k = V_t`` and a lossless encoding the
    signal equals the live teacher's (tested); with a smaller ``k`` the top-k entries are exact and
    the rest is the uniform tail (in a span merge, a next token outside the top-k gets that tail
    probability).

    Args:
        teacher_tokenizer / student_tokenizer: fast tokenizers (for the string-shared vocabulary).
        vocab_size: the teacher's vocabulary (``TeacherCache.vocab_size``).
        span_policy: ``"merge"`` or ``"skip"`` (as :class:`CrossTokenizerTeacher`).
    """

    provides = frozenset({"cross"})
    tokenizes_itself = True

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any, *, vocab_size: int,
                 span_policy: str = "merge") -> None:
        if span_policy not in SPAN_POLICIES:
            raise ConfigError(f"unknown span_policy {span_policy!r}", f"use one of: {', '.join(SPAN_POLICIES)}")
        self.span_policy, self.vocab_size = span_policy, int(vocab_size)
        self.shared_student_ids, self.shared_teacher_ids = shared_vocabulary(student_tokenizer, teacher_tokenizer)
        self.last_alignment: TokenAlignment | None = None

    def present_in(self, batch: Mapping[str, Any]) -> bool:
        return all(k in batch for k in CACHED_KEYS)

    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        from kdforge.losses.signal import SparseTeacher

        if features is not None:
            raise ConfigError("feature terms cannot compare a teacher with another tokenizer (positions differ)",
                              "remove the feature terms, or distil from a teacher with the student's tokenizer")
        missing = [k for k in (*CACHED_KEYS, *TEACHER_KEYS) if k not in batch]
        if missing:
            raise DataError(f"the teacher is a cross-tokenizer cache, but the batch lacks {missing}",
                            "train on kdforge.teachers.cache.CrossTokenizerCacheDataset batches collated by "
                            "CachedCrossTokenizerCollator")
        input_ids = batch["input_ids"]
        student_pos = task.to_loss_positions(input_ids, batch, what="student ids")
        s_mask = batch.get("attention_mask")
        alignment = align_offsets(batch["student_offsets"], batch["teacher_offsets"],
                                  student_mask=None if s_mask is None else s_mask.cpu(),
                                  teacher_mask=batch["teacher_attention_mask"].cpu(), policy=self.span_policy)
        if tuple(student_pos.shape) != tuple(alignment.mask.shape):
            raise DataError(f"student loss positions {tuple(student_pos.shape)} are not the alignment's "
                            f"{tuple(alignment.mask.shape)}", "use CausalLMTask with a cross-tokenizer teacher")
        device = input_ids.device
        ids, lps = batch["cached_teacher_ids"][:, :-1], batch["cached_teacher_logprobs"][:, :-1]
        dense = SparseTeacher(ids.to(device).long(), lps.to(device).float(), self.vocab_size).to_dense_logprobs()
        cross, a = aligned_signal(dense, batch["teacher_input_ids"], alignment, input_ids, self.span_policy,
                                  self.shared_student_ids, self.shared_teacher_ids)
        self.last_alignment = a
        return TeacherSignal(cross=cross)
