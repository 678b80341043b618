"""Teachers: sources of the teacher signal (online model, top-k cache, served endpoint, ensemble, the
student itself), the cache builder, vocabulary checks."""

from kdforge.teachers.alignment import TokenAlignment, align_offsets
from kdforge.teachers.budget import BudgetedTeacher, BudgetExceededError, QueryBudget
from kdforge.teachers.cache import (
    ENCODINGS,
    CachedCrossTokenizerCollator,
    CrossTokenizerCacheDataset,
    TeacherCache,
    TeacherCacheDataset,
    build_cross_tokenizer_cache,
    build_teacher_cache,
    collate_teacher_cache,
    open_teacher_cache,
    pack_tokens,
)
from kdforge.teachers.crosstok import CrossTokenizerCollator, encode_texts, shared_vocabulary
from kdforge.teachers.guidance import (
    GuidanceEstimate,
    estimate_label_weight,
    optimal_label_weight,
    penultimate_features,
    ridge_smoother,
)
from kdforge.teachers.online import OnlineTeacher, load_teacher, topk_logprobs
from kdforge.teachers.sources import (
    CachedCrossTokenizerTeacher,
    CachedTeacher,
    CrossTokenizerTeacher,
    EnsembleTeacher,
    IndexedDataset,
    MutualTeacher,
    PSKDTeacher,
    SelfTeacher,
    ServedTeacher,
    TeacherSource,
    as_source,
)
from kdforge.teachers.vocab import (
    VocabAlignment,
    check_vocab,
    slice_logits,
    tokenizer_fingerprint,
    tokenizer_size,
)

__all__ = [
    "GuidanceEstimate", "estimate_label_weight", "optimal_label_weight", "penultimate_features", "ridge_smoother",
    "BudgetExceededError", "BudgetedTeacher", "QueryBudget",
    "ENCODINGS",
    "CachedCrossTokenizerCollator",
    "CachedCrossTokenizerTeacher",
    "CachedTeacher",
    "CrossTokenizerCacheDataset",
    "build_cross_tokenizer_cache",
    "CrossTokenizerCollator",
    "CrossTokenizerTeacher",
    "EnsembleTeacher",
    "IndexedDataset",
    "MutualTeacher",
    "OnlineTeacher",
    "PSKDTeacher",
    "SelfTeacher",
    "ServedTeacher",
    "TeacherCache",
    "TeacherCacheDataset",
    "TeacherSource",
    "TokenAlignment",
    "align_offsets",
    "VocabAlignment",
    "as_source",
    "build_teacher_cache",
    "check_vocab",
    "collate_teacher_cache",
    "encode_texts",
    "load_teacher",
    "open_teacher_cache",
    "pack_tokens",
    "shared_vocabulary",
    "slice_logits",
    "tokenizer_fingerprint",
    "tokenizer_size",
    "topk_logprobs",
]
