"""DKD against its published formula (Zhao et al. 2022) and the FKL decomposition it starts from."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses import SparseTeacher, dkd, forward_kl

P = [0.8, 0.1, 0.1]
Q = [0.4, 0.4, 0.2]


def kl_hand(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_dkd_matches_hand_computed_tckd_and_nckd():
    tckd = kl_hand([0.8, 0.2], [0.4, 0.6])
    nckd = kl_hand([0.5, 0.5], [2 / 3, 1 / 3])
    got = dkd(logits_of(Q)[None], logits_of(P)[None], labels=torch.tensor([0]), alpha=1.0, beta=8.0,
              temperature=1.0)
    assert got.item() == pytest.approx(tckd + 8.0 * nckd, rel=1e-9)


def test_dkd_with_coupled_weights_recovers_forward_kl():
    # KL(p||q) = TCKD + (1 - p_y) NCKD  (the decomposition in the paper, Eq. 3)
    s = torch.randn(6, 9, dtype=torch.float64)
    t = torch.randn(6, 9, dtype=torch.float64)
    y = torch.randint(0, 9, (6,))
    p_y = torch.softmax(t / 2.0, -1).gather(-1, y[:, None]).squeeze(-1)
    tckd = dkd(s, t, labels=y, alpha=1.0, beta=0.0, temperature=2.0, reduction="none")
    nckd = dkd(s, t, labels=y, alpha=0.0, beta=1.0, temperature=2.0, reduction="none")
    torch.testing.assert_close(tckd + (1 - p_y) * nckd, forward_kl(s, t, temperature=2.0, reduction="none"))


def test_dkd_matches_mdistiller_style_reference_implementation():
    s = torch.randn(8, 10, dtype=torch.float64)
    t = torch.randn(8, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    T, alpha, beta = 4.0, 1.0, 8.0
    gt = torch.nn.functional.one_hot(y, 10).bool()
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    bs = torch.stack([(ps * gt).sum(-1), (ps * ~gt).sum(-1)], -1)
    bt = torch.stack([(pt * gt).sum(-1), (pt * ~gt).sum(-1)], -1)
    tckd = (bt * (bt.log() - bs.log())).sum(-1)
    pt2 = torch.softmax(t / T - 1000.0 * gt, -1)
    ls2 = torch.log_softmax(s / T - 1000.0 * gt, -1)
    nckd = (pt2 * (pt2.clamp_min(1e-300).log() - ls2)).sum(-1)
    expected = ((alpha * tckd + beta * nckd) * T**2).mean()
    torch.testing.assert_close(dkd(s, t, labels=y, alpha=alpha, beta=beta, temperature=T), expected)


def test_dkd_gradient_matches_finite_differences():
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, -100, 5])
    assert torch.autograd.gradcheck(lambda x: dkd(x, t, labels=y, temperature=2.0), (s,), fast_mode=True)


def test_dkd_ignores_ignore_index_and_masked_positions():
    s = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5)
    y = torch.tensor([[1, -100, 2], [0, 4, 3]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    per_pos = dkd(s, t, labels=y, mask=mask, reduction="none")
    assert per_pos[0, 1] == 0 and per_pos[1, 1] == 0
    torch.testing.assert_close(dkd(s, t, labels=y, mask=mask), per_pos.sum() / 4)
    per_pos.sum().backward()
    assert torch.all(s.grad[0, 1] == 0) and torch.all(s.grad[1, 1] == 0)


def test_dkd_without_labels_or_with_sparse_teacher_is_a_clear_error():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ShapeError, match="labels"):
        dkd(s, t)
    with pytest.raises(ConfigError, match="dense teacher"):
        dkd(s, SparseTeacher.from_logits(t, 2), labels=torch.tensor([0, 1]))


def test_dkd_is_finite_for_extreme_logits_and_bf16():
    s = (torch.randn(4, 10) * 1e4).bfloat16().requires_grad_()
    t = (torch.randn(4, 10) * 1e4).bfloat16()
    out = dkd(s, t, labels=torch.tensor([0, 1, 2, 3]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad.float()).all()
