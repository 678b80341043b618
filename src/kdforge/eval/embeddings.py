"""How well a student's sentence embeddings keep the teacher's: similarity, retrieval, a task probe.

All functions take float ``[n, D]`` embeddings (any widths: only cosine relations are compared, so a
384-wide student is measured against a 768-wide teacher directly):

* :func:`similarity_agreement` — Spearman's rho between the two models' pairwise cosine
  similarities over every pair of ``n`` sentences (the STS-style "do they rank pairs alike");
* :func:`neighbour_agreement` — retrieval: the fraction of queries whose nearest other sentence is
  the same for both models, and recall@k of the teacher's nearest neighbour in the student's top k;
* :func:`knn_accuracy` — a task probe without training: cosine k-nearest-neighbour majority vote
  of labelled reference embeddings (e.g. Rotten Tomatoes fresh/rotten).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.errors import ShapeError
from kdforge.eval.rank import spearman

__all__ = ["knn_accuracy", "neighbour_agreement", "similarity_agreement"]


def _cos(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    a = F.normalize(a.double(), dim=-1)
    return a @ (a if b is None else F.normalize(b.double(), dim=-1)).T


def _same_rows(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[0] != teacher.shape[0]:
        raise ShapeError(f"embeddings {tuple(student.shape)} and {tuple(teacher.shape)} must be [n, D] with the same n",
                         "embed the same sentences, in the same order, with both models")


def similarity_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Spearman's rho of the two models' cosine similarities over all ``n (n - 1) / 2`` pairs."""
    _same_rows(student, teacher)
    n = student.shape[0]
    if n < 3:
        raise ShapeError(f"similarity agreement needs at least 3 sentences, got {n}", "embed more sentences")
    iu = torch.triu_indices(n, n, offset=1)
    return spearman(_cos(student)[iu[0], iu[1]], _cos(teacher)[iu[0], iu[1]])


def neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor, *, k: int = 10) -> dict[str, float]:
    """``top1``: same nearest other sentence under both models; ``recall_at_k``: the teacher's
    nearest neighbour is among the student's ``k`` nearest (self excluded on both sides)."""
    _same_rows(student, teacher)
    n = student.shape[0]
    if n < 2:
        raise ShapeError("neighbour agreement needs at least 2 sentences", "embed more sentences")
    eye = torch.eye(n, dtype=torch.bool)
    cs, ct = _cos(student).masked_fill(eye, -2.0), _cos(teacher).masked_fill(eye, -2.0)
    t_nn = ct.argmax(1)
    s_top = cs.topk(min(k, n - 1), dim=1).indices
    return {"top1": float((s_top[:, 0] == t_nn).double().mean()),
            "recall_at_k": float((s_top == t_nn[:, None]).any(1).double().mean()), "k": float(min(k, n - 1))}


def knn_accuracy(reference: torch.Tensor, reference_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, *, k: int = 10) -> float:
    """Accuracy of a cosine ``k``-NN majority vote (ties: the smallest label) of ``queries``."""
    if reference.shape[0] != reference_labels.shape[0] or queries.shape[0] != query_labels.shape[0]:
        raise ShapeError("each embedding needs one label", "pass labels aligned with the embeddings")
    k = min(k, reference.shape[0])
    idx = _cos(queries, reference).topk(k, dim=1).indices
    votes = F.one_hot(reference_labels.long()[idx], int(reference_labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == query_labels.long()).double().mean())
