"""Task for sentence-embedding distillation: one position per sentence, the embedding as its output.

:class:`SentenceEmbeddingTask` is :class:`~kdforge.train.ClassificationTask` with two differences:
the student reads ``input_ids`` and ``attention_mask`` (a :class:`kdforge.students.encoder.SentenceEncoder`),
and its ``[B, D]`` output is a sentence embedding, not class logits. The teacher's embeddings are
precomputed into the batch (``teacher_embeddings``, ``[B, D]``), so the objective's embedding losses
(``embedding_mse``, ``embedding_cosine``, ``similarity_kd``; :mod:`kdforge.losses.embedding`) see
the dense pair like any dense logit loss. There are no labels (a sentence's target is its teacher
vector); every sentence of the batch is a real position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdforge.errors import DataError
from kdforge.train.tasks import ClassificationTask, TaskOutput

__all__ = ["SentenceEmbeddingTask"]


class SentenceEmbeddingTask(ClassificationTask):
    """Batches ``{"input_ids", "attention_mask", "teacher_embeddings"}`` -> student embeddings ``[B, D]``."""

    def __init__(self, teacher_key: str = "teacher_embeddings") -> None:
        super().__init__(input_key="input_ids", label_key="labels", teacher_key=teacher_key)

    def _inputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        for key in ("input_ids", "attention_mask"):
            if key not in batch:
                raise DataError(f"batch has no {key!r} key (keys: {sorted(batch)})",
                                "tokenise the sentences with padding into input_ids and attention_mask")
        return batch["input_ids"]

    def model_inputs(self, batch: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._inputs(batch), batch["attention_mask"]), {}

    def run_student(self, student: nn.Module, batch: Mapping[str, Any], *, features: Any = None,
                    chunked: bool = False, validate: bool = True) -> TaskOutput:
        emb = student(self._inputs(batch), batch["attention_mask"])
        mask = torch.ones(emb.shape[:-1], dtype=torch.bool, device=emb.device)
        return TaskOutput(emb, None, None, mask)
