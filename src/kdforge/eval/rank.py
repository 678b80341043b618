"""Rank statistics shared by the evaluators (DisWOT's check, embedding similarity agreement)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kdforge.errors import ShapeError

__all__ = ["average_ranks", "spearman"]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..n-1`` of a 1-D tensor, float64, ties sharing their mean rank."""
    sorted_x, order = torch.sort(x)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    if bool((counts > 1).any()):
        first = torch.cumsum(counts, 0) - counts
        ranks[order] = (first + (counts - 1) / 2.0).double()[inverse]
    return ranks


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 2 points or a
    constant side."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if len(x) != len(y):
        raise ShapeError(f"spearman needs equal lengths, got {len(x)} and {len(y)}", "pass paired values")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denom if denom else math.nan
