"""BD-KD: entropy-chosen forward/reverse KL weights (Amara et al. 2022)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError
from kdforge.losses import LOSSES, SparseTeacher, bdkd, forward_kl, reverse_kl
from kdforge.losses.bdkd import bdkd_weights


def test_weights_move_toward_reverse_kl_when_the_student_is_more_confident():
    teacher = torch.tensor([[1.0, 0.5, 0.0, -0.5]])  # fairly flat
    confident = torch.tensor([[8.0, 0.0, 0.0, 0.0]])  # peaked: lower entropy than the teacher
    unsure = torch.zeros(1, 4)  # uniform: higher entropy than the teacher
    lp = teacher.log_softmax(-1)
    w_f, w_r = bdkd_weights(confident.log_softmax(-1), lp, high=1.5, low=0.5)
    assert (w_f.item(), w_r.item()) == (0.5, 1.5)
    w_f, w_r = bdkd_weights(unsure.log_softmax(-1), lp, high=1.5, low=0.5)
    assert (w_f.item(), w_r.item()) == (1.5, 0.5)


def test_value_is_the_hand_computed_mix():
    s = torch.tensor([[3.0, 0.0, -1.0], [0.0, 0.1, 0.0]])
    t = torch.tensor([[1.0, 0.5, 0.0], [2.0, -1.0, 0.0]])
    q, p = s.softmax(-1), t.softmax(-1)
    fkl = (p * (p.log() - q.log())).sum(-1)
    rkl = (q * (q.log() - p.log())).sum(-1)
    h_q, h_p = -(q * q.log()).sum(-1), -(p * p.log()).sum(-1)
    assert h_q[0] < h_p[0] and h_q[1] > h_p[1]  # row 0 confident student, row 1 not
    expected = torch.stack([0.5 * fkl[0] + 1.5 * rkl[0], 1.5 * fkl[1] + 0.5 * rkl[1]])
    assert torch.allclose(bdkd(s, t, reduction="none"), expected, atol=1e-6)
    assert LOSSES.get("bdkd") is bdkd or LOSSES.get("bdkd").fn is bdkd  # registered


def test_equal_weights_are_forward_plus_reverse_kl_and_temperature_scales_by_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    both = forward_kl(s, t, temperature=2.0) + reverse_kl(s, t, temperature=2.0)
    assert torch.allclose(bdkd(s, t, high=1.0, low=1.0, temperature=2.0), both, atol=1e-6)


def test_no_gradient_flows_through_the_weights():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 5, generator=g)
    w_f, w_r = bdkd_weights(s.detach().log_softmax(-1), t.log_softmax(-1))
    by_hand = (w_f * forward_kl(s, t, reduction="none") + w_r * reverse_kl(s, t, reduction="none")).sum()
    g1 = torch.autograd.grad(bdkd(s, t, reduction="sum"), s)[0]
    g2 = torch.autograd.grad(by_hand, s)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(2, 9), st.integers(0, 10_000))
def test_a_full_top_k_teacher_equals_the_dense_one(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, v, generator=g), torch.randn(n, v, generator=g) * 2
    lp, ids = t.log_softmax(-1).topk(v, -1)
    sparse = SparseTeacher(ids, lp, v)
    assert torch.allclose(bdkd(s, sparse), bdkd(s, t), atol=1e-5)


def test_negative_weights_are_refused():
    with pytest.raises(ConfigError, match="high=1.5, low=0.5"):
        bdkd(torch.zeros(1, 3), torch.zeros(1, 3), high=-1.0)
