"""Cross-tokenizer KD from a teacher cache: build it over texts with the teacher's token offsets,
replay it for a student with another tokenizer.

* :func:`build_cross_tokenizer_cache` tokenizes the texts with the teacher's tokenizer (offsets
  on), right-pads them to one length, runs :func:`~kdforge.teachers.cache.build_teacher_cache`
  and stores each row's token offsets and length plus the texts' SHA-256
  (:mod:`kdforge.teachers.cache.offsets`). Right padding does not change a causal teacher's
  distributions at the real positions.
* :class:`CrossTokenizerCacheDataset` pairs cached row ``i`` with ``texts[i]`` (checked against
  the stored fingerprint); :class:`CachedCrossTokenizerCollator` tokenizes the student's side and
  stacks the teacher's cached ids, offsets and top-k. The source is
  :class:`~kdforge.teachers.sources.CachedCrossTokenizerTeacher`.

A student truncated to ``max_length`` tokens covers a prefix of a text; the teacher read the whole
text, so its tokens past the student's last character have no counterpart and are simply not
compared (the alignment closes groups only at shared boundaries). For the same positions as the
live :class:`~kdforge.teachers.CrossTokenizerCollator`, build the cache over the texts the student
covers (:func:`~kdforge.teachers.crosstok.encode_student` returns them): the recipe does this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.errors import CacheError, ConfigError, DataError
from kdforge.teachers.cache.offsets import text_fingerprint
from kdforge.teachers.cache.reader import TeacherCache

__all__ = ["CachedCrossTokenizerCollator", "CrossTokenizerCacheDataset", "build_cross_tokenizer_cache",
           "teacher_tokenize"]


def teacher_tokenize(texts: Sequence[str], teacher_tokenizer: Any, seq_len: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids [N, T], offsets [N, T, 2], lengths [N])`` of ``texts`` under the teacher's tokenizer
    (its special tokens added as in :func:`~kdforge.teachers.encode_texts`), right-padded with its
    pad id (else 0) to ``seq_len`` (default: the longest; longer texts are truncated)."""
    from kdforge.teachers.crosstok import _require_fast

    _require_fast(teacher_tokenizer, "teacher")
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise DataError("a cross-tokenizer cache is built over a non-empty list of strings",
                        "pass texts=[text, ...] (one string per cached sequence)")
    enc = teacher_tokenizer(list(texts), return_offsets_mapping=True, truncation=seq_len is not None,
                            max_length=seq_len)
    width = seq_len or max(len(r) for r in enc["input_ids"])
    pad_id = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
    ids = np.full((len(texts), width), pad_id, dtype=np.int64)
    offsets = np.zeros((len(texts), width, 2), dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, (row, off) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        ids[i, : len(row)], lengths[i] = row, len(row)
        if len(row):
            offsets[i, : len(row)] = np.asarray(off, dtype=np.int64).reshape(-1, 2)
    return ids, offsets, lengths


def build_cross_tokenizer_cache(teacher: Any, teacher_tokenizer: Any, texts: Sequence[str], out_dir: str | Path, *,
                                seq_len: int | None = None, k: int = 64, encoding: str = "compact-u8-zstd",
                                **kwargs: Any) -> Path:
    """Cache ``teacher``'s top-``k`` over ``texts`` with its token offsets (cross-tokenizer use).

    Args:
        teacher: causal LM (or :class:`~kdforge.teachers.OnlineTeacher`).
        teacher_tokenizer: its fast tokenizer (character offsets; its fingerprint is recorded).
        texts: one string per cached sequence (only their SHA-256 is stored: train on the same list).
        seq_len: teacher tokens per row (default: the longest text's).
        k / encoding / kwargs: as :func:`~kdforge.teachers.cache.build_teacher_cache`
            (``batch_size``, ``shard_size``, ``overwrite``, ...; not ``tail_samples``).
    """
    from kdforge.teachers.cache.writer import build_teacher_cache

    if kwargs.get("tail_samples") or kwargs.get("loss_mask") is not None:
        raise ConfigError("a cross-tokenizer cache stores top-k only (no tail_samples, no loss_mask)",
                          "drop tail_samples / loss_mask (the alignment decides which positions are compared)")
    ids, offsets, lengths = teacher_tokenize(texts, teacher_tokenizer, seq_len)
    return build_teacher_cache(teacher, ids, out_dir, k=k, encoding=encoding, tokenizer=teacher_tokenizer,
                               token_offsets=(offsets, lengths), texts=list(texts), **kwargs)


class CrossTokenizerCacheDataset(Dataset):
    """A teacher cache with token offsets, paired with the texts it was built over.

    Items: ``text``, ``teacher_input_ids`` / ``teacher_attention_mask`` ``[T_t]``,
    ``teacher_offsets`` ``[T_t, 2]``, ``cached_teacher_ids`` / ``cached_teacher_logprobs``
    ``[T_t, k]`` (position ``u`` predicts teacher token ``u + 1``).

    Args:
        cache_dir: the cache folder.
        texts: the texts the cache was built over, in order (their SHA-256 must match).
        teacher_tokenizer: optional, checked against the cache's tokenizer fingerprint.
        verify: check shard checksums on open.

    Raises:
        CacheError: the cache has no token offsets (built for a same-tokenizer student), has
            sampled tail entries, or was built over other texts.
    """

    def __init__(self, cache_dir: str | Path, texts: Sequence[str], *, teacher_tokenizer: Any = None,
                 verify: bool = True) -> None:
        self.cache = TeacherCache(cache_dir, verify=verify)
        self.cache.check_compatible(tokenizer=teacher_tokenizer)
        if not self.cache.has_token_offsets:
            self.cache.token_offsets(0)  # raises the CacheError that names the fix
        if self.cache.tail_samples:
            raise CacheError(f"the cache at {cache_dir} has sampled tail entries; cross-tokenizer KD reads top-k only",
                             "rebuild it with build_cross_tokenizer_cache (tail_samples=0)")
        self.texts = list(texts)
        if text_fingerprint(self.texts) != self.cache.text_fingerprint:
            raise CacheError(
                f"the cache at {cache_dir} was built over other texts ({len(self.cache)} sequences; "
                f"{len(self.texts)} texts given, fingerprint differs)",
                "pass the exact texts (same order and cut) the cache was built over, or rebuild it over these",
            )

    @property
    def vocab_size(self) -> int:
        return self.cache.vocab_size

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        input_ids, ids, lp = self.cache.read(i)
        offsets, length = self.cache.token_offsets(i)
        mask = torch.zeros(len(input_ids), dtype=torch.long)
        mask[:length] = 1
        return {
            "text": self.texts[i],
            "teacher_input_ids": torch.from_numpy(input_ids),
            "teacher_attention_mask": mask,
            "teacher_offsets": torch.from_numpy(offsets),
            "cached_teacher_ids": torch.from_numpy(ids),
            "cached_teacher_logprobs": torch.from_numpy(lp),
        }


class CachedCrossTokenizerCollator:
    """``collate_fn`` for :class:`CrossTokenizerCacheDataset`: the student's tokenization of the
    items' texts (:func:`~kdforge.teachers.crosstok.encode_student`, truncated to ``max_length``)
    plus the cached teacher keys stacked (cut to the batch's longest teacher row)."""

    def __init__(self, student_tokenizer: Any, *, max_length: int | None = None) -> None:
        from kdforge.teachers.crosstok import _require_fast

        _require_fast(student_tokenizer, "student")
        self.student_tokenizer, self.max_length = student_tokenizer, max_length

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        from kdforge.teachers.crosstok import encode_student

        batch, _ = encode_student([it["text"] for it in items], self.student_tokenizer, max_length=self.max_length)
        width = max(int(it["teacher_attention_mask"].sum()) for it in items)
        width = max(width, 1)
        for key in ("teacher_input_ids", "teacher_attention_mask", "teacher_offsets", "cached_teacher_ids",
                    "cached_teacher_logprobs"):
            batch[key] = torch.stack([it[key][:width] for it in items])
        return batch
