"""Retrieval metrics (kdforge.eval.retrieval) against hand computations and their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ShapeError
from kdforge.eval.retrieval import cosine_scores, retrieval_metrics


def test_one_relevant_passage_per_query_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5],   # relevant 0 at rank 1
                           [0.9, 0.1, 0.5],   # relevant 2 at rank 2
                           [0.9, 0.1, 0.5]])  # relevant 1 at rank 3
    got = retrieval_metrics(scores, torch.tensor([0, 2, 1]), ks=(1, 2), cutoff=2)
    assert got["mrr@2"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert got["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3) + 0) / 3)
    assert got["recall@1"] == pytest.approx(1 / 3) and got["recall@2"] == pytest.approx(2 / 3)


def test_several_relevant_passages_ndcg_uses_the_ideal_ranking():
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    rel = torch.tensor([[False, True, False, True]])  # relevant at ranks 2 and 4
    got = retrieval_metrics(scores, rel, ks=(2, 4), cutoff=4)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert got["ndcg@4"] == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    assert got["mrr@4"] == pytest.approx(0.5)
    assert got["recall@2"] == pytest.approx(0.5) and got["recall@4"] == pytest.approx(1.0)


def test_ties_are_broken_by_index_and_the_cutoff_may_exceed_the_pool():
    got = retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 2]), ks=(1, 50), cutoff=10)
    assert got["recall@1"] == 0.5 and got["recall@50"] == 1.0 and got["mrr@10"] == pytest.approx((1 + 1 / 3) / 2)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_a_perfect_ranker_scores_one_and_metrics_lie_in_the_unit_interval(n, seed):
    g = torch.Generator().manual_seed(seed)
    rel = torch.randperm(n, generator=g)
    perfect = torch.zeros(n, n)
    perfect[torch.arange(n), rel] = 1.0
    assert all(v == pytest.approx(1.0) for v in retrieval_metrics(perfect, rel, ks=(1, n)).values())
    noisy = retrieval_metrics(torch.randn(n, n, generator=g), rel, ks=(1, n))
    assert all(0.0 <= v <= 1.0 for v in noisy.values()) and noisy[f"recall@{n}"] == pytest.approx(1.0)


def test_cosine_scores_and_errors():
    q, p = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    torch.testing.assert_close(cosine_scores(q, p), torch.tensor([[0.0, 2 ** -0.5]], dtype=torch.float64))
    with pytest.raises(ShapeError, match="no relevant passage"):
        retrieval_metrics(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"in \[0, 2\)"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 5]))
