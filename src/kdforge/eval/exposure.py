"""Canary exposure (Carlini et al., *The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks*, USENIX Security 2019).

A *canary* ``s[r]`` (e.g. ``"my number is 4815"``) with a random secret ``r`` from a space ``R``
is planted in the training data. After training, every candidate secret ``r'`` in ``R`` is scored
by the model's log-perplexity of ``s[r']``; the rank of the true canary among them measures how
much the model memorised it:

    ``exposure = log2 |R| - log2 rank(s[r])``

with ``rank = 1 + #{r' != r : logppl(s[r']) < logppl(s[r])}`` (ties count against the canary:
``rank`` uses ``<=`` in :func:`rank_of`'s ``ties="worst"`` default). Exposure ranges from 0 (the
canary is the least likely candidate) to ``log2 |R|`` (the most likely: fully memorised); for a
model that never saw the canary the rank is uniform on ``1..|R|`` and the expected exposure is
about ``log2 e ≈ 1.44`` bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from kdforge.errors import ConfigError

__all__ = ["canary_exposure", "exposure", "rank_of", "sequence_log_perplexity"]


def rank_of(canary_score: float, candidate_scores: Sequence[float] | torch.Tensor, ties: str = "worst") -> int:
    """Rank (1 = most likely) of the canary's log-perplexity among the *other* candidates' (lower = more
    likely). ``ties="worst"`` counts equal scores as better than the canary, ``"best"`` as worse."""
    scores = torch.as_tensor(candidate_scores, dtype=torch.float64)
    better = scores <= canary_score if ties == "worst" else scores < canary_score
    return 1 + int(better.sum())


def exposure(canary_score: float, candidate_scores: Sequence[float] | torch.Tensor, ties: str = "worst") -> float:
    """``log2 |R| - log2 rank`` with ``R`` = the candidates plus the canary (module docstring).

    Args:
        canary_score: the true canary's log-perplexity.
        candidate_scores: the log-perplexities of every *other* secret of the space.
    """
    n = len(candidate_scores) + 1
    if n < 2:
        raise ConfigError("exposure needs at least one other candidate secret", "score the whole secret space R")
    return math.log2(n) - math.log2(rank_of(canary_score, candidate_scores, ties))


@torch.no_grad()
def sequence_log_perplexity(model: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, start: int,
                            batch_size: int = 512) -> torch.Tensor:
    """``-sum_{t >= start} log p(ids[:, t] | ids[:, :t])`` per row of ``ids [N, L]`` (nats), for a
    causal model returning logits ``[B, L, V]`` (or an object with ``.logits``). ``start >= 1``:
    the canary's fixed prefix is ``ids[:, :start]``, the scored secret the rest."""
    if start < 1:
        raise ConfigError("sequence_log_perplexity needs start >= 1 (the first token has no context)",
                          "put the canary's prefix before the secret")
    out = []
    for i in range(0, ids.shape[0], batch_size):
        chunk = ids[i:i + batch_size]
        logits = model(chunk)
        logits = getattr(logits, "logits", logits)
        logp = torch.log_softmax(logits[:, start - 1:-1].float(), -1)
        out.append(-logp.gather(-1, chunk[:, start:].unsqueeze(-1)).squeeze(-1).sum(-1))
    return torch.cat(out)


def canary_exposure(model: Callable[[torch.Tensor], torch.Tensor], prefix: Sequence[int],
                    secrets: torch.Tensor, true_index: int, batch_size: int = 512) -> dict[str, float]:
    """Exposure of the canary ``prefix + secrets[true_index]`` among ``prefix + secrets[j]`` for
    every row ``j`` of ``secrets [|R|, k]`` (token ids). Returns ``exposure``, ``rank``, ``space``
    and the canary's ``log_perplexity``."""
    ids = torch.cat([torch.as_tensor(prefix, dtype=torch.long).expand(secrets.shape[0], -1), secrets.long()], 1)
    scores = sequence_log_perplexity(model, ids, len(prefix), batch_size)
    canary = float(scores[true_index])
    others = torch.cat([scores[:true_index], scores[true_index + 1:]])
    return {"exposure": exposure(canary, others), "rank": float(rank_of(canary, others)),
            "space": float(secrets.shape[0]), "log_perplexity": canary}
