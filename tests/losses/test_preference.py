"""DPO loss and sequence log-probs against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ShapeError
from kdforge.losses.preference import dpo_loss, sequence_logprobs

finite = st.floats(-50, 50, allow_nan=False)


def test_dpo_matches_a_hand_computation():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    margin = (-3.0 - -4.0) - (-5.0 - -4.5)  # 1.5
    expected = -math.log(1 / (1 + math.exp(-0.5 * margin)))
    assert dpo_loss(pc, pr, rc, rr, beta=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_dpo_gradient_is_beta_sigmoid_minus_margin():
    pc = torch.tensor([-2.0, -1.0], requires_grad=True)
    pr = torch.tensor([-3.0, -0.5], requires_grad=True)
    rc, rr = torch.tensor([-2.5, -1.0]), torch.tensor([-2.0, -1.0])
    beta = 0.3
    dpo_loss(pc, pr, rc, rr, beta=beta, reduction="sum").backward()
    m = (pc - rc) - (pr - rr)
    w = beta * torch.sigmoid(-beta * m.detach())
    torch.testing.assert_close(pc.grad, -w)
    torch.testing.assert_close(pr.grad, w)


@settings(max_examples=50, deadline=None)
@given(finite, finite, st.floats(0.01, 5))
def test_chosen_equal_rejected_gives_log2_and_zero_gradient(logp, ref, beta):
    pc = torch.tensor([logp], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([logp], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([ref], dtype=torch.float64)
    loss = dpo_loss(pc, pr, r, r, beta=beta)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # the gradient w.r.t. the shared sequence log-prob cancels
    assert (pc.grad + pr.grad).abs().item() < 1e-12


@settings(max_examples=50, deadline=None)
@given(finite, finite, st.floats(0.01, 5))
def test_reference_equal_policy_gives_log2(c, r, beta):
    pc, pr = torch.tensor([c]), torch.tensor([r])
    assert dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta).item() == pytest.approx(math.log(2), rel=1e-6)


@settings(max_examples=50, deadline=None)
@given(finite, finite, finite, finite, st.floats(0.01, 5))
def test_swapping_chosen_and_rejected_mirrors_the_margin(pc, pr, rc, rr, beta):
    t = [torch.tensor([v], dtype=torch.float64) for v in (pc, pr, rc, rr)]
    a = dpo_loss(t[0], t[1], t[2], t[3], beta=beta)
    b = dpo_loss(t[1], t[0], t[3], t[2], beta=beta)
    # -log sig(x) - -log sig(-x) = -x
    m = (pc - rc) - (pr - rr)
    assert (a - b).item() == pytest.approx(-beta * m, abs=1e-9)


def test_label_smoothing_and_reductions():
    pc, pr, rc, rr = (torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.zeros(2), torch.zeros(2))
    per = dpo_loss(pc, pr, rc, rr, beta=1.0, reduction="none")
    assert per.shape == (2,)
    assert dpo_loss(pc, pr, rc, rr, beta=1.0, reduction="sum").item() == pytest.approx(per.sum().item())
    smooth = dpo_loss(pc, pr, rc, rr, beta=1.0, label_smoothing=0.5, reduction="none")
    torch.testing.assert_close(smooth[0], smooth[1])  # eps=0.5: symmetric in the margin's sign


def test_reference_is_not_differentiated():
    rc = torch.tensor([-1.0], requires_grad=True)
    pc = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pc, torch.tensor([-2.0]), rc, torch.tensor([-2.0])).backward()
    assert rc.grad is None


def test_dpo_rejects_mismatched_shapes():
    with pytest.raises(ShapeError, match="one sequence log-prob per pair"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


def test_sequence_logprobs_sum_only_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 5, -100], [1, -100, -100, -100]])
    lp = torch.log_softmax(logits, -1)
    expected = torch.stack([lp[0, 1, 3] + lp[0, 2, 5], lp[1, 0, 1]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), expected)
    torch.testing.assert_close(sequence_logprobs(logits, labels, average=True), expected / torch.tensor([2.0, 1.0]))
    with pytest.raises(ShapeError):
        sequence_logprobs(logits, labels[:, :3])
