"""Divergences against hand-computed values, their properties, reductions, masks and numerics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.losses import (
    LOSSES,
    SparseTeacher,
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from kdforge.losses.divergences import akl_weights

# p = teacher, q = student, chosen so every value below is computable by hand.
P = [0.8, 0.1, 0.1]
Q = [0.4, 0.4, 0.2]
LN2 = math.log(2.0)

DIVERGENCES = ["forward_kl", "reverse_kl", "generalized_jsd", "jsd", "tvd", "skew_forward_kl",
               "skew_reverse_kl", "adaptive_kl", "taid"]


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def kl_hand(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def call(name: str, s: torch.Tensor, teacher, /, **kw) -> torch.Tensor:
    return LOSSES.get(name)(s, teacher, **kw)


# ------------------------------------------------------------------------------ hand values


def test_forward_kl_matches_hand_computed_value():
    # 0.8 ln 2 + 0.1 ln(1/4) + 0.1 ln(1/2) = 0.5 ln 2
    assert forward_kl(logits_of(Q), logits_of(P)).item() == pytest.approx(0.5 * LN2, rel=1e-9)


def test_reverse_kl_matches_hand_computed_value():
    # 0.4 ln(1/2) + 0.4 ln 4 + 0.2 ln 2 = 0.6 ln 2
    assert reverse_kl(logits_of(Q), logits_of(P)).item() == pytest.approx(0.6 * LN2, rel=1e-9)


def test_forward_and_reverse_kl_are_not_swapped():
    s, t = logits_of(Q), logits_of(P)
    assert forward_kl(s, t).item() == pytest.approx(kl_hand(P, Q))
    assert reverse_kl(s, t).item() == pytest.approx(kl_hand(Q, P))
    assert forward_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item())


def test_tvd_matches_hand_computed_value():
    assert tvd(logits_of(Q), logits_of(P)).item() == pytest.approx(0.5 * (0.4 + 0.3 + 0.1))


def test_jsd_matches_hand_computed_value():
    m = [0.5 * (a + b) for a, b in zip(P, Q)]
    expected = 0.5 * kl_hand(P, m) + 0.5 * kl_hand(Q, m)
    assert jsd(logits_of(Q), logits_of(P)).item() == pytest.approx(expected, rel=1e-9)
    assert generalized_jsd(logits_of(Q), logits_of(P), beta=0.5).item() == pytest.approx(expected, rel=1e-9)


def test_generalized_jsd_uses_trl_beta_convention_for_the_mixture():
    beta = 0.3
    m = [beta * a + (1 - beta) * b for a, b in zip(P, Q)]  # beta weights the teacher
    expected = beta * kl_hand(P, m) + (1 - beta) * kl_hand(Q, m)
    assert generalized_jsd(logits_of(Q), logits_of(P), beta=beta).item() == pytest.approx(expected, rel=1e-9)


def test_generalized_jsd_endpoints_are_exact_forward_and_reverse_kl():
    s, t = logits_of(Q), logits_of(P)
    assert generalized_jsd(s, t, beta=0.0).item() == pytest.approx(forward_kl(s, t).item(), rel=1e-12)
    assert generalized_jsd(s, t, beta=1.0).item() == pytest.approx(reverse_kl(s, t).item(), rel=1e-12)


def test_skew_forward_kl_matches_distillm_formula():
    a = 0.1
    m = [a * x + (1 - a) * y for x, y in zip(P, Q)]
    assert skew_forward_kl(logits_of(Q), logits_of(P), alpha=a).item() == pytest.approx(kl_hand(P, m), rel=1e-9)


def test_skew_reverse_kl_matches_distillm_formula():
    a = 0.1
    m = [a * y + (1 - a) * x for x, y in zip(P, Q)]
    assert skew_reverse_kl(logits_of(Q), logits_of(P), alpha=a).item() == pytest.approx(kl_hand(Q, m), rel=1e-9)


def test_skew_kls_with_alpha_zero_are_plain_kls():
    s, t = logits_of(Q), logits_of(P)
    assert skew_forward_kl(s, t, alpha=0.0).item() == pytest.approx(forward_kl(s, t).item())
    assert skew_reverse_kl(s, t, alpha=0.0).item() == pytest.approx(reverse_kl(s, t).item())


def test_adaptive_kl_weights_head_and_tail_gaps_by_hand():
    # teacher sorted: 0.8 | 0.1, 0.1 -> head = {0}; head gap |0.8-0.4| = 0.4, tail gap 0.3 + 0.1 = 0.4
    expected = 0.5 * (0.5 * LN2) + 0.5 * (0.6 * LN2)
    assert adaptive_kl(logits_of(Q), logits_of(P), mu=0.5).item() == pytest.approx(expected, rel=1e-9)


def test_adaptive_kl_is_forward_kl_when_only_the_head_is_wrong():
    p = [0.6, 0.2, 0.2]
    q = [0.2, 0.4, 0.4]  # with mu=0.5 the head is token 0; tail gaps 0.2+0.2 vs head gap 0.4
    s, t = logits_of(q), logits_of(p)
    w = 0.4 / 0.8
    expected = w * kl_hand(p, q) + (1 - w) * kl_hand(q, p)
    assert adaptive_kl(s, t).item() == pytest.approx(expected, rel=1e-9)


def test_temperature_scales_by_t_squared_and_softens_both_sides():
    T = 2.0
    s, t = logits_of(Q), logits_of(P)
    soft = lambda probs: [math.sqrt(x) / sum(math.sqrt(y) for y in probs) for x in probs]  # noqa: E731
    expected = T**2 * kl_hand(soft(P), soft(Q))
    assert forward_kl(s, t, temperature=T).item() == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------ direction


def _fit_unimodal_student(loss_fn) -> tuple[float, float]:
    """Fit a discretised Gaussian (mean, log-std) to a bimodal teacher; return (mean, std).

    The student starts between the modes, nearer the right one (mean 25, std 2).
    """
    grid = torch.arange(41, dtype=torch.float64)
    bump = lambda c: -((grid - c) ** 2) / (2 * 2.0**2)  # noqa: E731
    teacher = torch.logaddexp(bump(10.0), bump(30.0))  # modes at 10 and 30
    mean = torch.tensor(25.0, dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor(math.log(2.0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mean, log_std], lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        student = -((grid - mean) ** 2) / (2 * log_std.exp() ** 2)
        loss_fn(student, teacher).backward()
        opt.step()
    return mean.item(), log_std.exp().item()


def test_reverse_kl_is_mode_seeking_and_forward_kl_mean_seeking():
    fkl_mean, fkl_std = _fit_unimodal_student(forward_kl)
    rkl_mean, rkl_std = _fit_unimodal_student(reverse_kl)
    assert abs(fkl_mean - 20.0) < 2.0 and fkl_std > 6.0  # covers both modes from the middle
    assert abs(rkl_mean - 30.0) < 1.0 and rkl_std < 3.0  # locks onto the nearer mode


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradient_matches_finite_differences_in_float64(name):
    torch.manual_seed(1)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    params = {"t": 0.6} if name == "taid" else {}
    fn = lambda x: call(name, x, t, mask=mask, temperature=1.5, reduction="sum", **params)  # noqa: E731
    if name == "adaptive_kl":  # the head/tail weights are constants (no gradient), as in the paper's code
        (g,) = torch.autograd.grad(fn(s), s)
        logq, logp = torch.log_softmax(s.detach() / 1.5, -1), torch.log_softmax(t / 1.5, -1)
        w_head, w_tail = akl_weights(logq, logp, 0.5)
        ref = lambda x: ((w_head * forward_kl(x, t, temperature=1.5, reduction="none")  # noqa: E731
                          + w_tail * reverse_kl(x, t, temperature=1.5, reduction="none"))[mask]).sum()
        (g_ref,) = torch.autograd.grad(ref(s), s)
        torch.testing.assert_close(g, g_ref)
    elif name == "taid":  # the target is stop-gradient: compare with the KL to a fixed target
        (g,) = torch.autograd.grad(fn(s), s)
        target = torch.log_softmax(0.4 * torch.log_softmax(s.detach() / 1.5, -1) + 0.6 * torch.log_softmax(t / 1.5, -1), -1)
        ref = lambda x: (2.25 * (target.exp() * (target - torch.log_softmax(x / 1.5, -1))).sum(-1)[mask]).sum()  # noqa: E731
        (g_ref,) = torch.autograd.grad(ref(s), s)
        torch.testing.assert_close(g, g_ref)
    else:
        assert torch.autograd.gradcheck(fn, (s,), fast_mode=True)


def test_gradient_with_sparse_teacher_matches_finite_differences():
    s = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    sparse = SparseTeacher.from_logits(torch.randn(4, 9), 3)
    sparse = SparseTeacher(sparse.ids, sparse.logprobs.double(), 9)
    for policy in ("tail_bucket", "renormalize"):
        assert torch.autograd.gradcheck(
            lambda x, p=policy: generalized_jsd(x, sparse, beta=0.3, temperature=2.0, sparse_policy=p), (s,), fast_mode=True)


def test_teacher_receives_no_gradient():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5, requires_grad=True)
    forward_kl(s, t).backward()
    assert t.grad is None and s.grad is not None


# ------------------------------------------------------------------------------ properties

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=5, max_size=5)


@settings(max_examples=12, deadline=None)
@given(student=st.lists(logit_rows, min_size=1, max_size=3), teacher_seed=st.integers(0, 1000),
       name=st.sampled_from(DIVERGENCES))
def test_every_divergence_is_non_negative(student, teacher_seed, name):
    s = torch.tensor(student, dtype=torch.float64)
    t = torch.randn(s.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(teacher_seed)) * 5
    params = {"t": 0.5} if name == "taid" else {}
    assert call(name, s, t, reduction="none", **params).min().item() >= -1e-9


@settings(max_examples=12, deadline=None)
@given(rows=st.lists(logit_rows, min_size=1, max_size=3), name=st.sampled_from(DIVERGENCES),
       temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_every_divergence_is_zero_when_student_equals_teacher(rows, name, temperature):
    x = torch.tensor(rows, dtype=torch.float64)
    params = {"t": 0.5} if name == "taid" else {}
    assert call(name, x, x.clone(), temperature=temperature, **params).abs().item() < 1e-10


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(DIVERGENCES))
def test_reductions_are_consistent(seed, name):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.rand(2, 4, generator=g) > 0.4
    per_pos = call(name, s, t, mask=mask, reduction="none")
    total = call(name, s, t, mask=mask, reduction="sum")
    mean = call(name, s, t, mask=mask, reduction="mean")
    assert per_pos.shape == (2, 4)
    assert torch.all(per_pos[~mask] == 0)
    torch.testing.assert_close(total, per_pos.sum())
    torch.testing.assert_close(mean, total / max(int(mask.sum()), 1))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_positions_contribute_nothing_and_get_no_gradient(name):
    s = torch.randn(3, 4, 8, requires_grad=True)
    t = torch.randn(3, 4, 8)
    mask = torch.rand(3, 4) > 0.5
    mask[0, 0] = True
    s2 = s.detach().clone()
    s2[~mask] = torch.randn(int((~mask).sum()), 8) * 100  # garbage at padding
    out1 = call(name, s, t, mask=mask, reduction="sum")
    out2 = call(name, s2, t, mask=mask, reduction="sum")
    torch.testing.assert_close(out1, out2)
    out1.backward()
    assert torch.all(s.grad[~mask] == 0)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fully_masked_batch_gives_zero_loss_and_zero_grads(name, reduction):
    s = torch.randn(2, 3, 6, requires_grad=True)
    out = call(name, s, torch.randn(2, 3, 6), mask=torch.zeros(2, 3, dtype=torch.bool), reduction=reduction)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(s.grad == 0)


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("name", DIVERGENCES)
def test_extreme_logits_give_finite_loss_and_gradients(name):
    s = (torch.randn(4, 16) * 1e4).requires_grad_()
    t = torch.randn(4, 16) * 1e4
    out = call(name, s, t, temperature=1.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bf16_inputs_are_computed_in_float32(name):
    s = torch.randn(4, 32).bfloat16().requires_grad_()
    t = torch.randn(4, 32).bfloat16()
    out = call(name, s, t, temperature=2.0)
    ref = call(name, s.detach().float(), t.float(), temperature=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    out.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_uniform_call_signature_works_for_every_registered_loss():
    s = torch.randn(2, 3, 10, requires_grad=True)
    t = torch.randn(2, 3, 10)
    y = torch.randint(0, 10, (2, 3))
    m = torch.ones(2, 3, dtype=torch.bool)
    for name in LOSSES.names():
        out = LOSSES.get(name)(s, t, mask=m, reduction="sum", temperature=2.0, labels=y)
        assert out.ndim == 0 and torch.isfinite(out), name


@pytest.mark.parametrize("name", DIVERGENCES)
def test_minus_inf_logits_masking_the_same_tokens_on_both_sides_stay_finite(name):
    # e.g. both heads padded beyond the tokenizer with -inf: the fast kernel gives NaN, the safe one is exact
    s = torch.randn(3, 10, dtype=torch.float64)
    t = torch.randn(3, 10, dtype=torch.float64)
    s[:, 8:] = float("-inf")
    t[:, 8:] = float("-inf")
    params = {"t": 0.5} if name == "taid" else {}
    s_req = s.clone().requires_grad_()
    out = call(name, s_req, t, **params)
    out.backward()
    expected = call(name, s[:, :8], t[:, :8], **params)
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(s_req.grad).all()
