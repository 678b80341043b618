"""Teacher sources: where the teacher signal comes from (see :mod:`.base` for the contract).

* :class:`~kdforge.teachers.online.OnlineTeacher` — a live frozen model (dense logits, features),
* :class:`CachedTeacher` — the top-k cache's keys in the batch (sparse),
* :class:`ServedTeacher` — a model behind an OpenAI-compatible (vLLM) endpoint (sparse top-k),
* :class:`SelfTeacher` — the student itself: an EMA copy or a periodic snapshot (dense),
* :class:`EnsembleTeacher` — several sources mixed by a weighting rule (dense or sparse),
* :class:`MutualTeacher` — peers that train together with the student (online / mutual KD),
* :class:`PSKDTeacher` — the student's own previous-epoch predictions, stored compactly (PS-KD),
* :class:`CrossTokenizerTeacher` — a live model with another tokenizer, aligned by character offsets,
* :class:`CachedCrossTokenizerTeacher` — the same from a cache built with the teacher's token offsets,
* :func:`as_source` — the one place that turns what a user passes as ``teacher=`` into a source.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdforge.errors import ConfigError
from kdforge.teachers.sources.base import TeacherSource
from kdforge.teachers.sources.cached import CachedTeacher
from kdforge.teachers.sources.cross_tokenizer import (
    CachedCrossTokenizerTeacher,
    CrossTokenizerTeacher,
)
from kdforge.teachers.sources.ensemble import EnsembleTeacher
from kdforge.teachers.sources.mutual import MutualTeacher
from kdforge.teachers.sources.pskd import IndexedDataset, PSKDTeacher
from kdforge.teachers.sources.self_teacher import SelfTeacher
from kdforge.teachers.sources.served import ServedTeacher

__all__ = [
    "CachedCrossTokenizerTeacher", "CachedTeacher", "CrossTokenizerTeacher", "EnsembleTeacher", "IndexedDataset", "MutualTeacher", "PSKDTeacher", "SelfTeacher", "ServedTeacher",
    "TeacherSource", "as_source",
]


def as_source(teacher: Any) -> TeacherSource | None:
    """The :class:`TeacherSource` for ``teacher=``: a source as is, an ``nn.Module`` wrapped in an
    :class:`~kdforge.teachers.online.OnlineTeacher`, ``"cache"`` a :class:`CachedTeacher`, a list or
    tuple of any of these an equal-weight :class:`EnsembleTeacher`, None none."""
    from kdforge.teachers.online import OnlineTeacher

    if teacher is None or isinstance(teacher, TeacherSource):
        return teacher
    if teacher == "cache":
        return CachedTeacher()
    if isinstance(teacher, list | tuple):
        return EnsembleTeacher(teacher)
    if isinstance(teacher, nn.Module):
        return OnlineTeacher(teacher)
    model = getattr(teacher, "model", None)
    if isinstance(model, nn.Module):
        return OnlineTeacher(model, vocab_size=getattr(teacher, "vocab_size", None))
    raise ConfigError(
        f"teacher must be an nn.Module, a TeacherSource, 'cache' or a list of them, got {type(teacher).__name__}",
        "pass the model itself, kdforge.teachers.OnlineTeacher(model), CachedTeacher() or another source",
    )
