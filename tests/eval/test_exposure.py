"""Canary exposure as Carlini et al. (2019) define it: log2 |R| - log2 rank."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError
from kdforge.eval import canary_exposure, exposure, rank_of, sequence_log_perplexity


def test_exposure_by_hand():
    # |R| = 8; the canary (log-ppl 1.0) beats all 7 others: rank 1, exposure log2 8 = 3
    assert exposure(1.0, [2.0, 3, 4, 5, 6, 7, 8]) == pytest.approx(3.0)
    # two others are more likely: rank 3
    assert rank_of(1.0, [0.5, 0.7, 4.0]) == 3
    assert exposure(1.0, [0.5, 0.7, 4.0]) == pytest.approx(2.0 - math.log2(3))
    # least likely of all: rank |R|, exposure 0
    assert exposure(9.0, [1.0, 2.0, 3.0]) == pytest.approx(0.0)
    assert rank_of(1.0, [1.0, 2.0]) == 2 and rank_of(1.0, [1.0, 2.0], ties="best") == 1
    with pytest.raises(ConfigError):
        exposure(1.0, [])


@settings(max_examples=30, deadline=None)
@given(scores=st.lists(st.floats(-50, 50), min_size=1, max_size=40), canary=st.floats(-50, 50))
def test_exposure_is_between_zero_and_log2_space(scores, canary):
    e = exposure(canary, scores)
    assert -1e-9 <= e <= math.log2(len(scores) + 1) + 1e-9


def test_canary_exposure_of_a_model_that_memorised_the_secret():
    vocab, secret = 5, [3, 1]

    class Memoriser(torch.nn.Module):
        """Predicts token 3 after the prefix, then 1: the canary's secret."""

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*ids.shape, vocab)
            logits[:, 1, 3] = 5.0  # position 1 predicts token 2 (the first secret token)
            logits[:, 2, 1] = 5.0
            return logits

    space = torch.tensor([[a, b] for a in range(vocab) for b in range(vocab)])
    true = space.tolist().index(secret)
    out = canary_exposure(Memoriser(), [0, 4], space, true)
    assert out["rank"] == 1 and out["exposure"] == pytest.approx(math.log2(25))
    ids = torch.tensor([[0, 4, 3, 1]])
    logp = torch.log_softmax(Memoriser()(ids), -1)
    expected = -(logp[0, 1, 3] + logp[0, 2, 1])
    assert sequence_log_perplexity(Memoriser(), ids, 2)[0] == pytest.approx(float(expected), rel=1e-6)
