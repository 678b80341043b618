"""Replay a teacher cache as a torch Dataset for training.

Each item is one cached sequence::

    input_ids         int64   [T]      tokens the teacher read
    attention_mask    int64   [T]      ones (sequences are packed, no padding)
    labels            int64   [T]      = input_ids (Hugging Face convention: the trainer shifts);
                                       -100 on tokens the cache's loss mask does not train
                                       (prompt / non-assistant tokens and padding of chat data)
    teacher_ids       int64   [T, k]   top-k ids at logit position t
    teacher_logprobs  float32 [T, k]   their full-vocabulary log-probs at T=1
    teacher_num_exact int64   []       only for a cache with sampled tail entries: the number k of
                                       exact entries; the [T, k + m] signal's last m entries are
                                       tail draws with log weights (SparseTeacher.num_exact)
    teacher_hidden_states  float32 [F, T, H]  only for a cache built with feature_layers: the
                                       teacher's hidden states of those layers (decoded)
    teacher_feature_layers int64 [F]   their hidden_states indices (0 = embeddings)

Position ``t`` of ``teacher_ids``/``teacher_logprobs`` is the teacher's distribution over token
``t+1`` given tokens ``<= t``: it lines up with the student's ``logits[:, t]`` (the same
positions the trainer scores against ``labels[:, t+1]``). The last position predicts past the
sequence end and is dropped by the usual shift.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kdforge.constants import IGNORE_INDEX
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.cache.reader import TeacherCache

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "teacher_ids", "teacher_logprobs")


class TeacherCacheDataset(Dataset):
    """Torch Dataset over a finished teacher cache.

    Args:
        cache_dir: the cache folder.
        sequences: optional token sequences the caller means to train on; when given they must
            be the ones the cache was built over (CacheError otherwise).
        teacher: optional teacher (or weights SHA-256) to check against the manifest.
        tokenizer: optional tokenizer (or fingerprint) to check against the manifest.
        verify: check shard SHA-256 checksums when opening (default True).
        features: return the stored hidden states (``teacher_hidden_states``) of a cache built
            with ``feature_layers`` (default True); False skips reading and decoding them, for a
            run whose losses use only the top-k (see :meth:`with_features`).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        sequences: Any = None,
        *,
        teacher: Any = None,
        tokenizer: Any = None,
        verify: bool = True,
        features: bool = True,
    ) -> None:
        self.cache = TeacherCache(cache_dir, verify=verify)
        self.cache.check_compatible(teacher=teacher, tokenizer=tokenizer, sequences=sequences)
        self.features = features

    def with_features(self, features: bool) -> TeacherCacheDataset:
        """This dataset over the same opened cache, with its items' hidden states on or off."""
        view = copy.copy(self)
        view.features = features
        return view

    @property
    def vocab_size(self) -> int:
        return self.cache.vocab_size

    @property
    def k(self) -> int:
        """Exact top-k entries per position."""
        return self.cache.k

    @property
    def num_exact(self) -> int | None:
        """``k`` for a cache with sampled tail entries (each item then has ``k + m`` entries), else None."""
        return self.cache.num_exact

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids, ids, lp = self.cache.read(int(index))
        x = torch.from_numpy(input_ids)
        labels = x.clone()
        mask = self.cache.loss_mask(int(index))
        if mask is not None:
            labels[~torch.from_numpy(mask)] = IGNORE_INDEX
        item = {
            "input_ids": x,
            "attention_mask": torch.ones_like(x),
            "labels": labels,
            "teacher_ids": torch.from_numpy(ids),
            "teacher_logprobs": torch.from_numpy(lp),
        }
        if self.cache.num_exact is not None:
            item["teacher_num_exact"] = torch.tensor(self.cache.num_exact, dtype=torch.int64)
        if self.features and self.cache.feature_layers is not None:
            item["teacher_hidden_states"] = torch.from_numpy(self.cache.features(int(index)))
            item["teacher_feature_layers"] = torch.tensor(self.cache.feature_layers, dtype=torch.int64)
        return item


def collate_teacher_cache(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items of :class:`TeacherCacheDataset` into ``[B, T]`` / ``[B, T, k]`` tensors."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def batch_num_exact(batch: dict[str, torch.Tensor]) -> int | None:
    """``num_exact`` of a collated batch (None for a top-k-only cache)."""
    value = batch.get("teacher_num_exact")
    if value is None:
        return None
    return int(value.reshape(-1)[0])


def batch_sparse_teacher(batch: dict[str, torch.Tensor], vocab_size: int) -> SparseTeacher:
    """The :class:`SparseTeacher` ``[B, T, e]`` of a collated batch (``num_exact`` carried over)."""
    return SparseTeacher(batch["teacher_ids"], batch["teacher_logprobs"], vocab_size, batch_num_exact(batch))
