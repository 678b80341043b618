"""MiniLLM's policy-gradient loss against its definition (Gu et al., ICLR 2024).

Hand computations on a 3-token vocabulary, the importance weights against their formula, the
future rewards with and without length normalisation, and unbiasedness: the expectation of the
surrogate's gradient over sequences (exact enumeration and Monte Carlo) equals the exact
gradient of the sequence-level reverse KL of a 2-step, 3-token toy model.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError, NonFiniteError, ShapeError
from kdforge.losses import LOSSES, SparseTeacher, loss_spec, minillm_loss, reverse_kl
from kdforge.losses.minillm import future_rewards, importance_weights, mixture_log_probs

D = torch.float64  # exact comparisons below


def _softmax(z):
    e = [math.exp(v) for v in z]
    s = sum(e)
    return [v / s for v in e]


# -- hand computation ----------------------------------------------------------------------------

S = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 0.0]]  # student logits at 3 positions
T = [[0.0, 1.0, 0.0], [1.0, -1.0, 0.5], [0.3, 0.3, 0.3]]  # teacher logits
Y = [2, 0, 1]  # sampled tokens


def _hand(alpha=0.0, length_norm=True):
    """Per-position value and gradient wrt the student logits, written out from the paper."""
    q = [_softmax(z) for z in S]
    p = [_softmax(z) for z in T]
    kl = [sum(qi * math.log(qi / pi) for qi, pi in zip(q[t], p[t])) for t in range(3)]
    r = [math.log(p[t][Y[t]]) - math.log(q[t][Y[t]]) for t in range(3)]
    w = [q[t][Y[t]] / (alpha * p[t][Y[t]] + (1 - alpha) * q[t][Y[t]]) for t in range(3)]
    values, grads = [], []
    for t in range(3):
        future = r[t + 1:]
        big_r = (sum(future) / len(future) if future else 0.0) if length_norm else sum(future)
        values.append(w[t] * kl[t])
        # d KL(q||p)/dz_j = q_j (log q_j - log p_j - KL);  d log q_y/dz_j = [j = y] - q_j
        g = [w[t] * (q[t][j] * (math.log(q[t][j] / p[t][j]) - kl[t]) - big_r * ((j == Y[t]) - q[t][j]))
             for j in range(3)]
        grads.append(g)
    return values, grads


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("length_norm", [True, False])
def test_per_token_value_and_gradient_match_a_hand_computation_on_a_3_token_vocabulary(alpha, length_norm):
    s = torch.tensor([S], dtype=D, requires_grad=True)
    loss = minillm_loss(s, torch.tensor([T], dtype=D), labels=torch.tensor([Y]), alpha=alpha, length_norm=length_norm,
                        reduction="none")
    values, grads = _hand(alpha, length_norm)
    assert loss[0].tolist() == pytest.approx(values, rel=1e-12)
    loss.sum().backward()
    assert s.grad[0].tolist() == [pytest.approx(g, rel=1e-10, abs=1e-12) for g in grads]


def test_the_value_is_the_reverse_kl_and_the_reductions_agree():
    s, t, y = torch.tensor([S], dtype=D), torch.tensor([T], dtype=D), torch.tensor([Y])
    total = minillm_loss(s, t, labels=y, reduction="sum")
    assert float(total) == pytest.approx(float(reverse_kl(s, t, reduction="sum")), rel=1e-12)
    assert float(minillm_loss(s, t, labels=y, reduction="mean")) == pytest.approx(float(total) / 3, rel=1e-12)


def test_prompt_and_padding_positions_are_ignored_and_do_not_reach_the_returns():
    s, t = torch.tensor([S], dtype=D), torch.tensor([T], dtype=D)
    labels = torch.tensor([[-100, Y[1], Y[2]]])  # position 0 is prompt
    per = minillm_loss(s, t, labels=labels, reduction="none")
    assert float(per[0, 0]) == 0.0
    # the same as the loss on positions 1..2 alone
    alone = minillm_loss(s[:, 1:], t[:, 1:], labels=labels[:, 1:], reduction="none")
    assert per[0, 1:].tolist() == pytest.approx(alone[0].tolist(), rel=1e-12)
    s1 = s.clone().requires_grad_(True)
    s2 = s[:, 1:].clone().requires_grad_(True)
    minillm_loss(s1, t, labels=labels, reduction="sum").backward()
    minillm_loss(s2, t[:, 1:], labels=labels[:, 1:], reduction="sum").backward()
    assert s1.grad[0, 0].abs().max() == 0
    assert torch.allclose(s1.grad[:, 1:], s2.grad)


# -- importance weights and returns -------------------------------------------------------------

def test_importance_weights_follow_their_definition():
    q = torch.tensor([0.5, 0.1, 0.9], dtype=D)
    p = torch.tensor([0.2, 0.6, 0.9], dtype=D)
    for alpha in (0.2, 0.5, 0.8):
        expected = q / (alpha * p + (1 - alpha) * q)
        assert importance_weights(q.log(), p.log(), alpha).tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    assert importance_weights(q.log(), p.log(), 0.0).tolist() == [1.0, 1.0, 1.0]  # alpha 0: the student's samples
    assert importance_weights(q.log(), p.log(), 1.0).tolist() == pytest.approx((q / p).tolist(), rel=1e-12)
    mix = mixture_log_probs(q.log(), p.log(), 0.3).exp()
    assert mix.tolist() == pytest.approx((0.3 * p + 0.7 * q).tolist(), rel=1e-12)


def test_future_rewards_sum_or_average_the_rewards_after_each_position_within_the_mask():
    r = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]], dtype=D)
    mask = torch.tensor([[False, True, True, False, True]])  # prompt, two tokens, a hole, one token
    assert future_rewards(r, mask, length_norm=False).tolist() == [[0.0, 20.0, 16.0, 0.0, 0.0]]
    assert future_rewards(r, mask, length_norm=True).tolist() == [[0.0, 10.0, 16.0, 0.0, 0.0]]


def test_length_normalisation_makes_a_repeated_sequence_get_the_returns_of_a_short_one():
    # a sequence whose every step has the same reward: normalised returns do not grow with length
    for n in (2, 5, 9):
        r = torch.full((1, n), -0.7)
        m = torch.ones(1, n, dtype=torch.bool)
        norm = future_rewards(r, m, length_norm=True)[0, :-1]
        assert norm.tolist() == pytest.approx([-0.7] * (n - 1))
        assert float(future_rewards(r, m, length_norm=False)[0, 0]) == pytest.approx(-0.7 * (n - 1))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_alpha_zero_value_is_the_masked_reverse_kl_sum_for_any_batch(b, t, v, seed):
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(b, t, v, generator=g, dtype=D) * 3, torch.randn(b, t, v, generator=g, dtype=D) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = -100
    got = minillm_loss(s, te, labels=labels, reduction="sum")
    want = reverse_kl(s, te, mask=labels != -100, reduction="sum")
    assert float(got) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    assert float(got) >= 0


# -- unbiasedness on a 2-step, 3-token toy --------------------------------------------------------

V = 3


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta1 = torch.randn(V, generator=g, dtype=D, requires_grad=True)  # student: step-1 logits
    theta2 = torch.randn(V, V, generator=g, dtype=D, requires_grad=True)  # student: step-2 logits given y1
    p1, p2 = torch.randn(V, generator=g, dtype=D), torch.randn(V, V, generator=g, dtype=D)  # teacher
    return theta1, theta2, p1, p2


def _exact_gradient(theta1, theta2, p1, p2):
    """Gradient of KL(q(y1,y2) || p(y1,y2)) by autograd over the 9 sequences."""
    lq1, lq2 = torch.log_softmax(theta1, -1), torch.log_softmax(theta2, -1)
    lp1, lp2 = torch.log_softmax(p1, -1), torch.log_softmax(p2, -1)
    kl = sum((lq1[a] + lq2[a, b]).exp() * (lq1[a] + lq2[a, b] - lp1[a] - lp2[a, b])
             for a, b in itertools.product(range(V), range(V)))
    return torch.autograd.grad(kl, (theta1, theta2))


def _surrogate(theta1, theta2, p1, p2, ys, alpha=0.0):
    """The minillm loss summed over sequences ``ys`` ``[N, 2]`` (one row = one sampled sequence)."""
    s = torch.stack([theta1.expand(len(ys), V), theta2[ys[:, 0]]], 1)
    t = torch.stack([p1.expand(len(ys), V), p2[ys[:, 0]]], 1)
    return minillm_loss(s, t, labels=ys, alpha=alpha, length_norm=False, reduction="none").sum(-1)


def test_expected_surrogate_gradient_equals_the_exact_reverse_kl_gradient_by_enumeration():
    theta1, theta2, p1, p2 = _toy()
    ys = torch.tensor(list(itertools.product(range(V), range(V))))
    with torch.no_grad():
        prob = (torch.log_softmax(theta1, -1)[ys[:, 0]] + torch.log_softmax(theta2, -1)[ys[:, 0], ys[:, 1]]).exp()
    expected = torch.autograd.grad((prob * _surrogate(theta1, theta2, p1, p2, ys)).sum(), (theta1, theta2))
    exact = _exact_gradient(theta1, theta2, p1, p2)
    for e, x in zip(expected, exact):
        assert torch.allclose(e, x, atol=1e-12)


def test_monte_carlo_surrogate_gradient_converges_to_the_exact_gradient():
    theta1, theta2, p1, p2 = _toy(seed=3)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    with torch.no_grad():
        y1 = torch.multinomial(torch.softmax(theta1, -1), n, replacement=True, generator=g)
        y2 = torch.multinomial(torch.softmax(theta2, -1)[y1], 1, generator=g).squeeze(-1)
    ys = torch.stack([y1, y2], 1)
    mc = torch.autograd.grad(_surrogate(theta1, theta2, p1, p2, ys).mean(), (theta1, theta2))
    exact = _exact_gradient(theta1, theta2, p1, p2)
    for m, x in zip(mc, exact):
        assert torch.allclose(m, x, atol=0.02), (m, x)
    # and the estimate is not trivially close: the gradient is far from zero
    assert max(float(x.abs().max()) for x in exact) > 0.1


def test_teacher_mixed_samples_with_importance_weights_are_unbiased_for_one_step():
    # one step: the per-token weight is the exact likelihood ratio q/p~, so E_{y~p~}[w * grad] = grad KL
    theta1, _, p1, _ = _toy(seed=5)
    alpha = 0.4
    ys = torch.arange(V)[:, None]
    with torch.no_grad():
        mix = alpha * torch.softmax(p1, -1) + (1 - alpha) * torch.softmax(theta1, -1)
    per = minillm_loss(theta1.expand(V, V)[:, None], p1.expand(V, V)[:, None], labels=ys, alpha=alpha,
                       reduction="none")[:, 0]
    expected = torch.autograd.grad((mix * per).sum(), theta1)[0]
    lq, lp = torch.log_softmax(theta1, -1), torch.log_softmax(p1, -1)
    exact = torch.autograd.grad((lq.exp() * (lq - lp)).sum(), theta1)[0]
    assert torch.allclose(expected, exact, atol=1e-12)


# -- contract --------------------------------------------------------------------------------------

def test_registered_with_its_needs_and_never_chunked():
    spec = loss_spec("minillm")
    assert spec is LOSSES.get("minillm")
    assert spec.needs_labels and not spec.sparse_ok and not spec.separable
    assert spec.kernel is None


def test_misuse_is_a_config_error_naming_the_fix():
    s, t, y = torch.tensor([S], dtype=D), torch.tensor([T], dtype=D), torch.tensor([Y])
    sparse = SparseTeacher(torch.zeros(1, 3, 2, dtype=torch.long), torch.full((1, 3, 2), -0.7, dtype=D), vocab_size=3)
    with pytest.raises(ConfigError, match="dense teacher"):
        minillm_loss(s, sparse, labels=y)
    with pytest.raises(ConfigError, match="temperature"):
        minillm_loss(s, t, labels=y, temperature=0.0)
    with pytest.raises(ConfigError, match="labels"):
        minillm_loss(s, t)
    with pytest.raises(ConfigError, match="alpha"):
        minillm_loss(s, t, labels=y, alpha=1.5)
    with pytest.raises(ShapeError, match="time, vocab"):
        minillm_loss(s[0, 0], t[0, 0], labels=y[0, 0])
    # [T, V] is one sequence: the same as a batch of one
    assert torch.equal(minillm_loss(s[0], t[0], labels=y[0], reduction="none"),
                       minillm_loss(s, t, labels=y, reduction="none")[0])


def test_temperature_scales_both_distributions_and_a_nan_is_reported():
    s, t, y = torch.tensor([S], dtype=D), torch.tensor([T], dtype=D), torch.tensor([Y])
    assert torch.equal(minillm_loss(s, t, labels=y, temperature=2.0), minillm_loss(s / 2, t / 2, labels=y))
    bad = s.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        minillm_loss(bad, t, labels=y)
    assert torch.isnan(minillm_loss(bad, t, labels=y, check_finite=False))
