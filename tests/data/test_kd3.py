"""KD3 selection score against a hand computation; selection by top-k and threshold."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.data.select import kd3_scores, kd3_select
from kdforge.errors import ConfigError


def test_kd3_score_matches_a_hand_computation():
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    out = kd3_scores(t, s, teacher_weight=0.5)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731 - two-class softmax
    p0 = 0.5 * sig(2.0) + 0.5 * sig(1.0)
    p1 = 0.5 * sig(1.0) + 0.5 * sig(-1.0)  # row 1: class 1 = 0.5*sig(1)+0.5*sig(-1) = 0.5
    p2 = 0.5 * sig(3.0) + 0.5 * 0.5
    assert out.confidence.tolist() == pytest.approx([p0, max(p1, 1 - p1), p2], abs=1e-6)
    assert out.agree.tolist() == [True, False, True]  # row 2: student's argmax of a tie is class 0
    assert out.score.tolist() == pytest.approx([p0, 0.0, p2], abs=1e-6)
    loose = kd3_scores(t, s, teacher_weight=0.5, require_agreement=False)
    assert loose.score[1].item() == pytest.approx(0.5, abs=1e-6)
    hot = kd3_scores(t, s, teacher_weight=1.0, temperature=2.0)
    assert hot.confidence[0].item() == pytest.approx(sig(1.0), abs=1e-6)


def test_kd3_select_top_k_and_threshold():
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert kd3_select(t, s, k=2).tolist() == [0, 2]  # 0.806 > 0.726
    assert kd3_select(t, s, threshold=0.8).tolist() == [0]
    with pytest.raises(ConfigError, match="exactly one"):
        kd3_select(t, s)
    with pytest.raises(ConfigError, match="one shape"):
        kd3_scores(t, s[:2])


def test_balanced_selection_takes_classes_in_turn_by_rank():
    # class 0 has the three most confident points; balanced k=4 takes 2 from each class
    t = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.5, 0.0], [0.0, 1.0], [0.0, 0.5]])
    s = t.clone()
    assert kd3_select(t, s, k=4).tolist() == [0, 1, 2, 3]
    assert kd3_select(t, s, k=4, balanced=True).tolist() == [0, 3, 1, 4]
    assert kd3_select(t, s, k=5, balanced=True).tolist() == [0, 3, 1, 4, 2]
