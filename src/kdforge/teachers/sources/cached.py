""":class:`CachedTeacher`: the teacher signal stored in the batch by a top-k teacher cache.

Batches from :class:`~kdforge.teachers.cache.TeacherCacheDataset` carry ``teacher_ids`` and
``teacher_logprobs`` ``[B, T, k]`` (or ``[B, T-1, k]``) and, for a sampled-tail cache,
``teacher_num_exact``. This source turns them into a sparse :class:`TeacherSignal` at the loss
positions; it cannot score new sequences (on-policy KD needs a live or served teacher).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from kdforge.errors import DataError
from kdforge.features.taps import Features
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

__all__ = ["BatchLogitsTeacher", "CachedHiddenStates", "CachedTeacher", "TeacherShape"]


class CachedTeacher(TeacherSource):
    """Sparse teacher signal read from cached batch keys.

    Args:
        ids_key / logprobs_key / num_exact_key: the batch keys written by the teacher cache.
        vocab_size: the full vocabulary the ids index into (default: the student's, set by the
            trainer's vocabulary alignment).
    """

    #: "features": hidden states when the cache stores them (``feature_layers``); a batch without
    #: them refuses feature terms with the fix
    provides = frozenset({"sparse", "features"})

    def __init__(self, ids_key: str = "teacher_ids", logprobs_key: str = "teacher_logprobs",
                 num_exact_key: str = "teacher_num_exact", vocab_size: int | None = None, *,
                 hidden_key: str = "teacher_hidden_states", layers_key: str = "teacher_feature_layers") -> None:
        self.ids_key, self.logprobs_key, self.num_exact_key = ids_key, logprobs_key, num_exact_key
        self.hidden_key, self.layers_key = hidden_key, layers_key
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
        feats = None if features is None else self._features(batch, features)
        ids = task.to_loss_positions(batch[self.ids_key], batch, what="cached teacher top-k")
        logprobs = task.to_loss_positions(batch[self.logprobs_key], batch, what="cached teacher top-k")
        num_exact = batch.get(self.num_exact_key)
        exact = int(num_exact.reshape(-1)[0]) if torch.is_tensor(num_exact) else num_exact
        # 0 = "the student's": the trainer's vocabulary alignment fills it in (and checks the ids)
        vocab = self.vocab_size if self.vocab_size is not None else 0
        return TeacherSignal(sparse=SparseTeacher(ids.long(), logprobs.float(), vocab, num_exact=exact),
                             features=feats)

    def _features(self, batch: Mapping[str, Any], request: Any) -> Features:
        """The cached hidden states as :class:`~kdforge.features.Features` (full positions)."""
        from kdforge.errors import ConfigError

        if self.hidden_key not in batch or getattr(request, "attentions", False) or getattr(request, "modules", ()):
            raise ConfigError(
                "feature terms need the teacher's intermediate features, but this teacher cache stores only "
                + ("top-k logits" if self.hidden_key not in batch else
                   "top-k logits and hidden states (no attentions or module outputs)"),
                "build the cache with feature_layers=[...] for hidden-state terms (hidden_mse, cosine_hidden, "
                "cka, trg); train the other terms with the online teacher model, or remove the feature terms",
            )
        hidden = batch[self.hidden_key]  # [B, F, T, H]
        layers = [int(x) for x in batch[self.layers_key].reshape(-1, hidden.shape[1])[0]]
        items: list[torch.Tensor | None] = [None] * (max(layers) + 1)
        for j, layer in enumerate(layers):
            items[layer] = hidden[:, j]
        return Features(hidden_states=CachedHiddenStates(items, layers))

    @classmethod
    def with_features(cls, cache: Any, **kwargs: Any) -> CachedTeacher:
        """A :class:`CachedTeacher` for a cache built with ``feature_layers``: its ``model`` is a
        parameter-free stand-in carrying the teacher's depth and width (``config.num_hidden_layers``,
        ``config.hidden_size``), so :meth:`~kdforge.train.Objective.bind` can map layers and size
        projectors without the teacher's weights."""
        from kdforge.errors import CacheError

        info = cache.manifest.get("features")
        if info is None:
            raise CacheError(f"the teacher cache at {cache.cache_dir} stores no hidden states",
                             "rebuild it with feature_layers=[...], or train the feature terms with the live teacher")
        source = cls(vocab_size=kwargs.pop("vocab_size", cache.vocab_size), **kwargs)
        source.model = TeacherShape(int(info["num_layers"]), int(info["hidden_size"]))
        return source


class CachedHiddenStates(tuple):
    """``hidden_states`` of a cached teacher: the stored layers at their indices; reading another
    layer raises a :class:`~kdforge.errors.CacheError` naming the stored ones."""

    stored: list[int]

    def __new__(cls, items: list[torch.Tensor | None], stored: list[int]) -> CachedHiddenStates:
        obj = super().__new__(cls, items)
        obj.stored = stored
        return obj

    def __getitem__(self, index: Any) -> Any:
        from kdforge.errors import CacheError

        try:
            value = super().__getitem__(index)
        except IndexError:
            value = None
        if value is None:
            raise CacheError(f"the teacher cache stores hidden_states layers {self.stored}, not layer {index}",
                             "rebuild the cache with feature_layers including it, or map the feature term to stored "
                             "layers (params layers: {student: teacher, ...})")
        return value


class TeacherShape(nn.Module):
    """A parameter-free stand-in for a cached teacher: only ``config.num_hidden_layers`` and
    ``config.hidden_size`` (what feature terms need to map layers and size projectors)."""

    def __init__(self, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=num_layers, hidden_size=hidden_size)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from kdforge.errors import ConfigError

        raise ConfigError("a cached teacher has no weights to run", "score new sequences with the live teacher")


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
