"""What a teacher says about one batch: :class:`TeacherSignal`.

A :class:`~kdforge.teachers.sources.TeacherSource` turns a batch into a signal; the trainer hands
the signal's distribution to the losses and its features to the feature terms. A signal names
what it carries, so no code guesses the teacher from batch keys:

* ``logits`` — dense teacher logits ``[..., V]`` (an online teacher),
* ``sparse`` — a :class:`~kdforge.losses.signal.SparseTeacher` ``[..., k]`` (top-k, optionally a
  sampled tail; a cache or a served teacher's top-logprobs),
* ``features`` — the teacher's captured intermediate features
  (:class:`kdforge.features.taps.Features`: hidden states, attentions, hooked module outputs), at
  the model's input positions (feature terms mask them themselves),
* ``sequences`` — token ids the teacher generated (elicitation, sequence-level KD),
* ``weights`` — optional per-position weights ``[...]`` (an ensemble member's weight in the mixture),
* ``members`` — an ensemble's member signals, each with its ``weights``, for objective terms
  with ``per_teacher: true`` (one term per teacher instead of one against the mixture; only when
  the :class:`~kdforge.teachers.sources.EnsembleTeacher` is built with ``per_member_signals``),
* ``cross`` — a teacher with *another tokenizer*, already at the student's positions
  (:class:`kdforge.losses.uld.CrossVocabTeacher`: logits ``[..., V_t]`` + the alignment; from
  :class:`~kdforge.teachers.sources.CrossTokenizerTeacher`, for the vocabulary-free losses).

Distributions are at the student's *loss positions*: for a causal LM, position ``t`` holds the
distribution of token ``t + 1`` (``[B, T-1, ...]``), for a classifier one position per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kdforge.losses.signal import SparseTeacher

__all__ = ["TeacherSignal"]


@dataclass(frozen=True)
class TeacherSignal:
    """A teacher's output for one batch (see the module docstring for each field)."""

    logits: torch.Tensor | None = None
    sparse: SparseTeacher | None = None
    features: Any = None
    sequences: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    cross: Any = None
    members: tuple[TeacherSignal, ...] | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.logits, self.sparse, self.cross)) > 1:
            raise ValueError("a TeacherSignal carries dense logits, a sparse top-k or a cross-tokenizer teacher, "
                             "only one of them")

    @property
    def kind(self) -> str:
        """``"dense"``, ``"sparse"`` or ``"none"`` (features or sequences only)."""
        if self.logits is not None:
            return "dense"
        if self.cross is not None:
            return "cross"
        return "sparse" if self.sparse is not None else "none"

    @property
    def distribution(self) -> Any:
        """What a loss takes as ``teacher``: the dense logits, the sparse top-k or the cross-tokenizer
        teacher (None if none)."""
        if self.cross is not None:
            return self.cross
        return self.logits if self.logits is not None else self.sparse

    @property
    def vocab_size(self) -> int | None:
        if self.logits is not None:
            return int(self.logits.shape[-1])
        if self.cross is not None:
            return int(self.cross.vocab_size)
        return self.sparse.vocab_size if self.sparse is not None else None

    def positions(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TeacherSignal:
        """The signal with ``fn`` (a slice over leading dims) applied to the distribution and weights."""
        sparse = self.sparse
        if sparse is not None:
            sparse = SparseTeacher(fn(sparse.ids), fn(sparse.logprobs), sparse.vocab_size, sparse.num_exact)
        return replace(self, logits=None if self.logits is None else fn(self.logits), sparse=sparse,
                       weights=None if self.weights is None else fn(self.weights),
                       cross=None if self.cross is None else self.cross.positions(fn),
                       members=None if self.members is None else tuple(m.positions(fn) for m in self.members))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TeacherSignal:
        """Distribution (and weights) on ``device``; dense logits also cast to ``dtype``."""
        logits = self.logits
        if logits is not None:
            logits = logits.to(device=device, dtype=dtype or logits.dtype)
        sparse = None
        if self.sparse is not None:
            sparse = SparseTeacher(self.sparse.ids.to(device).long(), self.sparse.logprobs.to(device).float(),
                                   self.sparse.vocab_size, self.sparse.num_exact)
        weights = None if self.weights is None else self.weights.to(device)
        cross = None if self.cross is None else self.cross.to(device, dtype)
        members = None if self.members is None else tuple(m.to(device, dtype) for m in self.members)
        return replace(self, logits=logits, sparse=sparse, weights=weights, cross=cross, members=members)
