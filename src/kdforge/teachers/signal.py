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
* ``weights`` — optional per-position weights ``[...]`` (an ensemble's confidence weighting).

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

    def __post_init__(self) -> None:
        if self.logits is not None and self.sparse is not None:
            raise ValueError("a TeacherSignal carries dense logits or a sparse top-k, not both")

    @property
    def kind(self) -> str:
        """``"dense"``, ``"sparse"`` or ``"none"`` (features or sequences only)."""
        if self.logits is not None:
            return "dense"
        return "sparse" if self.sparse is not None else "none"

    @property
    def distribution(self) -> torch.Tensor | SparseTeacher | None:
        """What a loss takes as ``teacher``: the dense logits or the sparse top-k (None if neither)."""
        return self.logits if self.logits is not None else self.sparse

    @property
    def vocab_size(self) -> int | None:
        if self.logits is not None:
            return int(self.logits.shape[-1])
        return self.sparse.vocab_size if self.sparse is not None else None

    def positions(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TeacherSignal:
        """The signal with ``fn`` (a slice over leading dims) applied to the distribution and weights."""
        sparse = self.sparse
        if sparse is not None:
            sparse = SparseTeacher(fn(sparse.ids), fn(sparse.logprobs), sparse.vocab_size, sparse.num_exact)
        return replace(self, logits=None if self.logits is None else fn(self.logits), sparse=sparse,
                       weights=None if self.weights is None else fn(self.weights))

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
        return replace(self, logits=logits, sparse=sparse, weights=weights)
