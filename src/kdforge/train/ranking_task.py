"""Task for ranker distillation: batches of (query, positive, negatives) groups through a bi-encoder.

A batch holds ``B`` groups of ``G = 2 + k`` texts (query, positive, ``k`` negatives), tokenised as one
block of ``B * G`` rows in that order (``input_ids``/``attention_mask`` ``[B * G, L]``), plus the
teacher's signals computed once beforehand:

* ``teacher_scores`` ``[B, 1 + k]`` — the teacher's score of the positive and of each negative;
* ``teacher_embeddings`` ``[B * G, D]`` — the teacher's embedding of every text (optional).

``signal="scores"`` (Margin-MSE, :func:`kdforge.losses.ranking.margin_mse`): the student embeds the
``B * G`` texts, scores each query against its passages (:func:`~kdforge.losses.ranking.pair_scores`,
dot or cosine) and its output is ``[B, 1 + k]`` scores, one position per query.
``signal="embeddings"`` (e.g. ``similarity_kd``): the output is the ``[B * G, D]`` embeddings
themselves, one position per text, against ``teacher_embeddings``: the same texts and cost, a
different target. A student narrower than the teacher either carries a projection, or, for a loss
that sees only cosine relations (``similarity_kd``), ``pad_to`` the teacher's width: appending zeros
changes no norm, dot product or cosine, so the loss is exactly the one on the unpadded embeddings
(it is meaningless for ``embedding_mse``, which compares coordinates).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError, DataError
from kdforge.losses.ranking import SCORE_KINDS, pair_scores
from kdforge.train.tasks import ClassificationTask, TaskOutput

__all__ = ["RANKING_SIGNALS", "RankingTask"]

RANKING_SIGNALS = ("scores", "embeddings")


class RankingTask(ClassificationTask):
    """Groups of (query, positive, negatives) -> student scores ``[B, 1 + k]`` or embeddings ``[B * G, D]``."""

    def __init__(self, signal: str = "scores", *, score: str = "dot", pad_to: int | None = None) -> None:
        if signal not in RANKING_SIGNALS:
            raise ConfigError(f"unknown ranking signal {signal!r}", f"use one of {', '.join(RANKING_SIGNALS)}")
        if score not in SCORE_KINDS:
            raise ConfigError(f"unknown score {score!r}", f"use one of {', '.join(SCORE_KINDS)}")
        if pad_to is not None and (signal != "embeddings" or pad_to < 1):
            raise ConfigError(f"pad_to={pad_to} applies to signal='embeddings' only, as a width >= 1",
                              "drop pad_to, or use it with signal='embeddings' and the teacher's width")
        self.signal, self.score, self.pad_to = signal, score, pad_to
        key = "teacher_scores" if signal == "scores" else "teacher_embeddings"
        super().__init__(input_key="input_ids", label_key="labels", teacher_key=key)

    def _check(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        for key in ("input_ids", "attention_mask", "teacher_scores"):
            if key not in batch:
                raise DataError(f"ranking batch has no {key!r} key (keys: {sorted(batch)})",
                                "collate groups of (query, positive, negatives) into input_ids, attention_mask "
                                "and the teacher's teacher_scores [B, 1 + k]")
        b, passages = batch["teacher_scores"].shape
        rows = int(batch["input_ids"].shape[0])
        if rows != b * (passages + 1):
            raise DataError(f"ranking batch has {rows} texts for {b} groups of {passages + 1}",
                            "tokenise each group as query, positive, negatives, one row each")
        return b, passages + 1

    def _inputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        self._check(batch)
        return batch["input_ids"]

    def count(self, batch: Mapping[str, Any]) -> int:
        b, group = self._check(batch)
        return b if self.signal == "scores" else b * group

    def model_inputs(self, batch: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._inputs(batch), batch["attention_mask"]), {}

    def run_student(self, student: nn.Module, batch: Mapping[str, Any], *, features: Any = None,
                    chunked: bool = False, validate: bool = True) -> TaskOutput:
        b, group = self._check(batch)
        emb = student(batch["input_ids"], batch["attention_mask"])
        if self.signal == "scores":
            grouped = emb.view(b, group, emb.shape[-1])
            out = pair_scores(grouped[:, 0], grouped[:, 1:], score=self.score)
        elif self.pad_to is not None and emb.shape[-1] < self.pad_to:
            out = torch.nn.functional.pad(emb, (0, self.pad_to - emb.shape[-1]))
        else:
            out = emb
        mask = torch.ones(out.shape[:-1], dtype=torch.bool, device=out.device)
        return TaskOutput(out, None, None, mask)
