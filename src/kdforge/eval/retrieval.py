"""Ranking metrics of a retriever: MRR@k, nDCG@k and recall@k from a query x passage score matrix.

With ``scores [Q, N]`` (higher = more relevant) and binary relevance ``relevant [Q, N]`` (or ``[Q]``:
the index of each query's one relevant passage), passages ranked by descending score (ties broken
by index), ranks counted from 1:

* ``mrr@k`` — mean over queries of ``1 / rank`` of the first relevant passage, 0 if it is below ``k``
  (MS MARCO's MRR@10);
* ``ndcg@k`` — ``DCG@k / IDCG@k`` with ``DCG@k = sum_{rank r <= k, relevant} 1 / log2(r + 1)`` and
  ``IDCG@k`` the DCG of a perfect ranking (Järvelin & Kekäläinen 2002, binary gains);
* ``recall@k`` — the fraction of a query's relevant passages in its top ``k``, averaged over queries
  (with one relevant passage: hit@k).

Queries with no relevant passage are refused (their metrics are undefined).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdforge.errors import ShapeError

__all__ = ["cosine_scores", "retrieval_metrics"]


def cosine_scores(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """``[Q, N]`` cosine similarities of ``[Q, D]`` query and ``[N, D]`` passage embeddings (float64)."""
    return F.normalize(queries.double(), dim=-1) @ F.normalize(passages.double(), dim=-1).T


def _relevance(relevant: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    q, n = shape
    if relevant.dtype == torch.bool:
        if tuple(relevant.shape) != shape:
            raise ShapeError(f"relevance {tuple(relevant.shape)} does not match the scores {shape}",
                             "give a bool [Q, N] matrix or one relevant passage index per query")
        rel = relevant
    else:
        if tuple(relevant.shape) != (q,) or (q and (int(relevant.min()) < 0 or int(relevant.max()) >= n)):
            raise ShapeError(f"relevant indices must be [Q] = ({q},) in [0, {n}), got shape {tuple(relevant.shape)}",
                             "give each query the index of its relevant passage")
        rel = torch.zeros(q, n, dtype=torch.bool)
        rel[torch.arange(q), relevant.long()] = True
    if not bool(rel.any(1).all()):
        raise ShapeError("some queries have no relevant passage", "drop them or add their relevant passage to the pool")
    return rel


def retrieval_metrics(scores: torch.Tensor, relevant: torch.Tensor, *, ks: Sequence[int] = (1, 10),
                      cutoff: int = 10) -> dict[str, float]:
    """``{"mrr@cutoff", "ndcg@cutoff", "recall@k" for k in ks}`` averaged over the ``Q`` queries."""
    if scores.ndim != 2:
        raise ShapeError(f"scores must be [Q, N], got {tuple(scores.shape)}", "score every query against the pool")
    q, n = scores.shape
    rel = _relevance(relevant, (q, n)).to(scores.device)
    depth = min(max([cutoff, *ks]), n)
    # stable sort: equal scores keep index order, so ties are broken deterministically
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :depth]
    hits = rel.gather(1, order).double()  # [Q, depth] relevance by rank
    ranks = torch.arange(1, depth + 1, dtype=torch.float64, device=scores.device)
    c = min(cutoff, n)
    first = torch.where(hits[:, :c].any(1), 1.0 / (hits[:, :c].argmax(1).double() + 1.0), torch.zeros(q).double())
    discount = 1.0 / torch.log2(ranks + 1.0)
    dcg = (hits[:, :c] * discount[:c]).sum(1)
    n_rel = rel.sum(1)
    ideal = torch.cumsum(discount[:c], 0)[(n_rel.clamp(max=c) - 1)]
    out = {f"mrr@{cutoff}": float(first.mean()), f"ndcg@{cutoff}": float((dcg / ideal).mean())}
    for k in ks:
        out[f"recall@{k}"] = float((hits[:, :min(k, n)].sum(1) / n_rel).mean())
    return out
