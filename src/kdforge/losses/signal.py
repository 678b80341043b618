"""Teacher signals: what a loss receives from the teacher.

A teacher signal is either

* dense logits, a plain ``torch.Tensor`` of shape ``[..., vocab]`` (online teacher), or
* a :class:`SparseTeacher`: the teacher's top-k token ids and their log-probabilities
  (log-softmax over the *full* vocabulary at temperature 1), shape ``[..., k]`` each. This is
  what an offline cache stores (FIRST, MiniPLM offline inference, DistillKit's sparse signal).

What happens to the probability mass outside the top-k is chosen explicitly by the loss's
``sparse_policy`` argument (see :mod:`kdforge.losses.divergences`), never by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdforge.errors import ShapeError


@dataclass(frozen=True)
class SparseTeacher:
    """Top-k teacher distribution per position.

    Attributes:
        ids: ``[..., k]`` int64 token ids (any order; padding ids may repeat with logprob -inf).
        logprobs: ``[..., k]`` float log p_teacher(id) at temperature 1, normalised over the full
            vocabulary (so ``logprobs.exp().sum(-1) <= 1``; the remainder is the tail mass).
        vocab_size: size of the full vocabulary the ids index into.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape:
            raise ShapeError(
                f"SparseTeacher ids {tuple(self.ids.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must have the same shape [..., k]",
                "build both from the same top-k call",
            )
        if self.ids.dtype not in (torch.int64, torch.int32):
            raise ShapeError(f"SparseTeacher ids must be integer, got {self.ids.dtype}", "cast with .long()")

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """Leading (position) shape, without k."""
        return self.ids.shape[:-1]

    def to(self, device: torch.device | str) -> SparseTeacher:
        return SparseTeacher(self.ids.to(device), self.logprobs.to(device), self.vocab_size)

    def flatten(self) -> SparseTeacher:
        """Merge leading dims: ``[..., k] -> [N, k]``."""
        return SparseTeacher(self.ids.reshape(-1, self.k), self.logprobs.reshape(-1, self.k), self.vocab_size)

    def __getitem__(self, index) -> SparseTeacher:
        return SparseTeacher(self.ids[index], self.logprobs[index], self.vocab_size)

    def tail_mass(self) -> torch.Tensor:
        """``1 - sum_k p_k`` per position, clamped at 0, shape ``[...]``."""
        return (1.0 - self.logprobs.float().exp().sum(-1)).clamp_min(0.0)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> SparseTeacher:
        """Top-k of dense logits (log-softmax first, so logprobs are full-vocab normalised)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(min(k, logits.shape[-1]), dim=-1)
        return cls(ids, values, int(logits.shape[-1]))

    def to_dense_logprobs(self, fill: float | None = None) -> torch.Tensor:
        """Dense ``[..., vocab]`` log-probs (for tests/diagnostics only: memory heavy).

        Tokens outside the top-k get ``fill``; by default the tail mass spread uniformly over
        them (``-inf`` when there is no tail).
        """
        out_shape = (*self.shape, self.vocab_size)
        if fill is None:
            n_missing = max(self.vocab_size - self.k, 1)
            fill_t = (self.tail_mass() / n_missing).clamp_min(1e-45).log().unsqueeze(-1)
            dense = fill_t.expand(out_shape).clone()
        else:
            dense = torch.full(out_shape, fill, dtype=torch.float32, device=self.ids.device)
        return dense.scatter(-1, self.ids.long(), self.logprobs.float())
