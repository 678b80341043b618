"""Offline top-k teacher cache: build once, replay for any number of students.

See docs/teacher-cache.md. Public API::

    build_teacher_cache(teacher, sequences, out_dir, k=16, encoding="compact-u8-zstd")
    TeacherCacheDataset(out_dir)           # torch Dataset for training
    open_teacher_cache(out_dir)            # low-level reader
    build_teacher_cache(..., data_parallel=True)   # on every rank of an accelerate launch
    build_teacher_cache(..., k=16, tail_samples=16)  # + 16 draws from the tail (unbiased, forward KL)
    build_cross_tokenizer_cache(teacher, teacher_tok, texts, out_dir, k=64)   # + token offsets
    CrossTokenizerCacheDataset(out_dir, texts)  # for a student with another tokenizer
"""

from kdforge.teachers.cache.codec import ENCODINGS, Encoding, get_encoding
from kdforge.teachers.cache.corpus import pack_tokens, read_texts
from kdforge.teachers.cache.crosstok import (
    CachedCrossTokenizerCollator,
    CrossTokenizerCacheDataset,
    build_cross_tokenizer_cache,
)
from kdforge.teachers.cache.dataset import (
    BATCH_KEYS,
    TeacherCacheDataset,
    batch_sparse_teacher,
    collate_teacher_cache,
)
from kdforge.teachers.cache.parallel import BuildGroup, join_launch_group
from kdforge.teachers.cache.reader import TeacherCache, open_teacher_cache
from kdforge.teachers.cache.writer import (
    build_teacher_cache,
    row_seed,
    sampled_topk_fn,
    write_teacher_cache,
)

__all__ = [
    "BATCH_KEYS",
    "BuildGroup",
    "CachedCrossTokenizerCollator",
    "CrossTokenizerCacheDataset",
    "ENCODINGS",
    "Encoding",
    "TeacherCache",
    "TeacherCacheDataset",
    "batch_sparse_teacher",
    "build_cross_tokenizer_cache",
    "build_teacher_cache",
    "collate_teacher_cache",
    "get_encoding",
    "join_launch_group",
    "open_teacher_cache",
    "pack_tokens",
    "read_texts",
    "row_seed",
    "sampled_topk_fn",
    "write_teacher_cache",
]
