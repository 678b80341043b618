""":class:`CachedTeacher`: the teacher signal stored in the batch by a top-k teacher cache.

Batches from :class:`~kdforge.teachers.cache.TeacherCacheDataset` carry ``teacher_ids`` and
``teacher_logprobs`` ``[B, T, k]`` (or ``[B, T-1, k]``) and, for a sampled-tail cache,
``teacher_num_exact``. This source turns them into a sparse :class:`TeacherSignal` at the loss
positions; it cannot score new sequences (on-policy KD needs a live or served teacher).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdforge.errors import DataError
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

__all__ = ["BatchLogitsTeacher", "CachedTeacher"]


class CachedTeacher(TeacherSource):
    """Sparse teacher signal read from cached batch keys.

    Args:
        ids_key / logprobs_key / num_exact_key: the batch keys written by the teacher cache.
        vocab_size: the full vocabulary the ids index into (default: the student's, set by the
            trainer's vocabulary alignment).
    """

    provides = frozenset({"sparse"})

    def __init__(self, ids_key: str = "teacher_ids", logprobs_key: str = "teacher_logprobs",
                 num_exact_key: str = "teacher_num_exact", vocab_size: int | None = None) -> None:
        self.ids_key, self.logprobs_key, self.num_exact_key = ids_key, logprobs_key, num_exact_key
        self.vocab_size = vocab_size

    def present_in(self, batch: Mapping[str, Any]) -> bool:
        return self.ids_key in batch

    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        if self.ids_key not in batch or self.logprobs_key not in batch:
            missing = [k for k in (self.ids_key, self.logprobs_key) if k not in batch]
            raise DataError(
                f"the teacher is a cache, but the batch has no {', '.join(map(repr, missing))} "
                f"(keys: {sorted(batch)})",
                "train on batches of TeacherCacheDataset (collate_teacher_cache), or pass an online teacher",
            )
        if features is not None:
            from kdforge.errors import ConfigError

            raise ConfigError(
                "feature terms need the teacher's intermediate features, but the teacher is a cache "
                "(it stores only top-k logits)",
                "train these terms with the online teacher model, or remove the feature terms",
            )
        ids = task.to_loss_positions(batch[self.ids_key], batch, what="cached teacher top-k")
        logprobs = task.to_loss_positions(batch[self.logprobs_key], batch, what="cached teacher top-k")
        num_exact = batch.get(self.num_exact_key)
        exact = int(num_exact.reshape(-1)[0]) if torch.is_tensor(num_exact) else num_exact
        # 0 = "the student's": the trainer's vocabulary alignment fills it in (and checks the ids)
        vocab = self.vocab_size if self.vocab_size is not None else 0
        return TeacherSignal(sparse=SparseTeacher(ids.long(), logprobs.float(), vocab, num_exact=exact))


class BatchLogitsTeacher(TeacherSource):
    """Dense teacher logits precomputed into the batch (``batch[key]``, ``[B, C]`` for a classifier)."""

    provides = frozenset({"dense"})

    def __init__(self, key: str = "teacher_logits") -> None:
        self.key = key

    def present_in(self, batch: Mapping[str, Any]) -> bool:
        return self.key in batch

    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        if self.key not in batch:
            raise DataError(f"the batch has no precomputed teacher logits {self.key!r} (keys: {sorted(batch)})",
                            "precompute the teacher's logits into the batch, or pass the teacher model")
        return TeacherSignal(logits=task.to_loss_positions(batch[self.key], batch, what="precomputed teacher logits"))
