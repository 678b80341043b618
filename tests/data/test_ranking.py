"""Retrieval triples from documents (kdforge.data.ranking): sentences, neighbour pairs, mined negatives."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.data.ranking import (
    Pair,
    mine_negatives,
    neighbour_pairs,
    sample_pairs,
    split_sentences,
)
from kdforge.errors import ConfigError


def test_split_sentences_keeps_titles_and_closing_quotes():
    text = '"Well, Mr. Knightley," said she. "It is so!" He went\n home. _Now_ we see? yes.'
    assert split_sentences(text) == ['"Well, Mr. Knightley," said she.', '"It is so!"', "He went home.",
                                     "_Now_ we see? yes."]
    assert split_sentences("  ") == []


def test_neighbour_pairs_are_consecutive_non_overlapping_and_stay_inside_paragraphs():
    docs = {"a": "One first sentence. Two second one. Three third one.\n\nFour fourth one. Five fifth one.",
            "b": "Six x. Seven seventh one. Eight eighth one."}
    pairs = neighbour_pairs(docs, min_chars=10, max_chars=40)
    assert pairs == [Pair("One first sentence.", "Two second one.", "a"),
                     Pair("Four fourth one.", "Five fifth one.", "a"),
                     Pair("Seven seventh one.", "Eight eighth one.", "b")]  # "Six x." is too short
    assert sample_pairs(pairs, 2, seed=0) == sample_pairs(pairs, 2, seed=0)
    assert sorted(sample_pairs(pairs, None, seed=1), key=str) == sorted(pairs, key=str)
    with pytest.raises(ConfigError, match="min_chars"):
        neighbour_pairs(docs, min_chars=50, max_chars=10)


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 20), st.integers(1, 2), st.integers(2, 6), st.integers(0, 1000))
def test_mined_negatives_are_never_the_positive_and_teacher_ones_come_from_its_top(n, count, top, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, n, generator=g)
    positives = torch.randperm(n, generator=g)
    top = max(min(top, n - 1), count)
    hard = mine_negatives(scores, positives, kind="teacher", count=count, top=top, seed=seed)
    rand = mine_negatives(scores, positives, kind="random", count=count, seed=seed)
    for neg in (hard, rand):
        assert neg.shape == (n, count) and not (neg == positives[:, None]).any()
        assert all(len(set(row)) == count for row in neg.tolist())  # without replacement
    others = scores.clone()
    others[torch.arange(n), positives] = float("-inf")
    allowed = others.topk(top, dim=1).indices
    assert all(set(h) <= set(a) for h, a in zip(hard.tolist(), allowed.tolist()))


def test_mine_negatives_refuses_impossible_requests():
    with pytest.raises(ConfigError, match="unknown negative kind"):
        mine_negatives(torch.zeros(3, 3), torch.arange(3), kind="bm25")
    with pytest.raises(ConfigError, match="cannot draw 3 negatives"):
        mine_negatives(torch.zeros(3, 3), torch.arange(3), count=3)
