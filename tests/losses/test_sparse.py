"""Sparse (top-k) teacher: policies by hand, k = V equals dense, tempered tail bucket, no densifying."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.losses import LOSSES, SparseTeacher, forward_kl, reverse_kl

DIVERGENCES = ["forward_kl", "reverse_kl", "generalized_jsd", "tvd", "skew_forward_kl", "skew_reverse_kl",
               "adaptive_kl", "taid"]
PARAMS = {"taid": {"t": 0.7}, "generalized_jsd": {"beta": 0.3}}

P = [0.5, 0.3, 0.15, 0.05]  # teacher over V = 4, top-2 = {0, 1}, tail mass 0.2
Q = [0.1, 0.2, 0.3, 0.4]


def kl_hand(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def top2() -> SparseTeacher:
    return SparseTeacher.from_logits(torch.tensor(P, dtype=torch.float64).log(), 2)


def test_tail_bucket_forward_kl_matches_hand_computed_buckets():
    s = torch.tensor(Q, dtype=torch.float64).log()
    expected = kl_hand([0.5, 0.3, 0.2], [0.1, 0.2, 0.7])
    assert forward_kl(s, top2(), sparse_policy="tail_bucket").item() == pytest.approx(expected, rel=1e-6)


def test_renormalize_forward_kl_matches_hand_computed_restriction():
    s = torch.tensor(Q, dtype=torch.float64).log()
    expected = kl_hand([5 / 8, 3 / 8], [1 / 3, 2 / 3])
    assert forward_kl(s, top2(), sparse_policy="renormalize").item() == pytest.approx(expected, rel=1e-6)


def test_renormalize_reverse_kl_matches_hand_computed_restriction():
    s = torch.tensor(Q, dtype=torch.float64).log()
    expected = kl_hand([1 / 3, 2 / 3], [5 / 8, 3 / 8])
    assert reverse_kl(s, top2(), sparse_policy="renormalize").item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("policy", ["tail_bucket", "renormalize", "student_full"])
def test_sparse_teacher_with_k_equal_vocab_equals_dense(name, temperature, policy):
    s = torch.randn(3, 5, 12, dtype=torch.float64)
    t = torch.randn(3, 5, 12, dtype=torch.float64) * 3
    mask = torch.rand(3, 5) > 0.3
    sparse = SparseTeacher.from_logits(t, 12)
    sparse = SparseTeacher(sparse.ids, sparse.logprobs.double(), 12)
    kw = dict(mask=mask, temperature=temperature, reduction="none", **PARAMS.get(name, {}))
    dense = LOSSES.get(name)(s, t, **kw)
    got = LOSSES.get(name)(s, sparse, sparse_policy=policy, **kw)
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.0])
def test_tempered_tail_bucket_equals_buckets_of_the_uniform_tail_completion(temperature):
    v, k = 20, 5
    s = torch.randn(4, v, dtype=torch.float64)
    sparse = SparseTeacher.from_logits(torch.randn(4, v) * 2, k)
    sparse = SparseTeacher(sparse.ids, sparse.logprobs.double(), v)
    completed = sparse.to_dense_logprobs()  # tail spread uniformly over the V - k others
    in_top = torch.zeros(4, v, dtype=torch.bool).scatter(-1, sparse.ids, True)

    def buckets(logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits / temperature, -1)
        return torch.cat([p.gather(-1, sparse.ids), (p * ~in_top).sum(-1, keepdim=True)], -1)

    p_b, q_b = buckets(completed), buckets(s)
    expected = temperature**2 * (p_b * (p_b.log() - q_b.log())).sum(-1)
    got = forward_kl(s, sparse, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_padding_entries_with_minus_inf_logprob_are_ignored():
    s = torch.randn(2, 10, dtype=torch.float64)
    base = SparseTeacher.from_logits(torch.randn(2, 10), 3)
    padded = SparseTeacher(torch.cat([base.ids, base.ids[:, :1].expand(2, 2)], -1),
                           torch.cat([base.logprobs, torch.full((2, 2), float("-inf"))], -1).double(), 10)
    base = SparseTeacher(base.ids, base.logprobs.double(), 10)
    for policy in ("tail_bucket", "renormalize"):
        for name in DIVERGENCES:
            kw = dict(sparse_policy=policy, **PARAMS.get(name, {}))
            a = LOSSES.get(name)(s, padded, **kw)
            b = LOSSES.get(name)(s, base, **kw)
            assert torch.isfinite(a), (name, policy)
            torch.testing.assert_close(a, b, msg=f"{name} {policy}")


def test_sparse_loss_gradients_are_finite_and_reach_only_the_student():
    s = torch.randn(3, 50, requires_grad=True)
    sparse = SparseTeacher.from_logits(torch.randn(3, 50), 4)
    for name in DIVERGENCES:
        s.grad = None
        LOSSES.get(name)(s, sparse, temperature=2.0, **PARAMS.get(name, {})).backward()
        assert torch.isfinite(s.grad).all(), name


def test_sparse_path_never_builds_a_dense_teacher(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("densified the sparse teacher")

    monkeypatch.setattr(SparseTeacher, "to_dense_logprobs", boom)
    s = torch.randn(2, 3, 30)
    sparse = SparseTeacher.from_logits(torch.randn(2, 3, 30), 5)
    for name in DIVERGENCES:
        LOSSES.get(name)(s, sparse, **PARAMS.get(name, {}))


def test_student_full_forward_kl_matches_hand_computed_value():
    s = torch.tensor(Q, dtype=torch.float64).log()
    # teacher renormalised over its top-2, student's full (unrenormalised) probabilities
    expected = 5 / 8 * math.log((5 / 8) / 0.1) + 3 / 8 * math.log((3 / 8) / 0.2)
    assert forward_kl(s, top2(), sparse_policy="student_full").item() == pytest.approx(expected, rel=1e-6)


def test_student_full_is_infinite_for_reverse_kl_and_says_which_policy_to_use():
    from kdforge.errors import NonFiniteError

    s = torch.tensor(Q, dtype=torch.float64).log()
    with pytest.raises(NonFiniteError, match="tail_bucket"):
        reverse_kl(s, top2(), sparse_policy="student_full")


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"])
def test_student_full_gives_finite_gradients_for_bounded_and_forward_losses(name):
    s = torch.randn(3, 30, requires_grad=True)
    sparse = SparseTeacher.from_logits(torch.randn(3, 30), 4)
    out = LOSSES.get(name)(s, sparse, sparse_policy="student_full", temperature=2.0, **PARAMS.get(name, {}))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


# ---- sampled tail (SparseTeacher.num_exact): unbiased estimate of the teacher ----------------------

P6 = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04], dtype=torch.float64)  # top-2 = {0, 1}, tail 0.4
Z6 = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.2], dtype=torch.float64)  # student logits


def _sampled_outcomes(m: int = 2):
    """Every ordered draw of m=2 tail ids, its probability and the sampled SparseTeacher it gives."""
    top, tail_ids = [0, 1], [2, 3, 4, 5]
    r = float(P6[2:].sum())
    pi = P6[2:] / r
    for i, a in enumerate(tail_ids):
        for j, b in enumerate(tail_ids):
            prob = float(pi[i] * pi[j])
            if a == b:
                ids, w = [a, a], [r, 0.0]  # one id drawn twice; the second slot is padding
            else:
                ids, w = [a, b], [r / 2, r / 2]
            lp = torch.tensor([*P6[:2].tolist(), *w], dtype=torch.float64).log()
            yield prob, SparseTeacher(torch.tensor([*top, *ids]), lp, 6, num_exact=2)


def _grad(teacher) -> torch.Tensor:
    z = Z6.clone().requires_grad_(True)
    forward_kl(z, teacher).backward()
    return z.grad


def test_forward_kl_gradient_of_sampled_teacher_is_q_minus_p_hat_and_its_expectation_is_exact():
    q = torch.softmax(Z6, -1)
    expected = torch.zeros(6, dtype=torch.float64)
    total = 0.0
    for prob, teacher in _sampled_outcomes():
        p_hat = torch.zeros(6, dtype=torch.float64).scatter_add(0, teacher.ids, teacher.logprobs.exp())
        g = _grad(teacher)
        assert torch.allclose(g, q - p_hat, atol=1e-9)  # per outcome: q - p_hat
        expected += prob * g
        total += prob
    assert total == pytest.approx(1.0)
    dense = _grad(P6.log())  # the online teacher's full distribution
    assert torch.allclose(expected, dense, atol=1e-9) and torch.allclose(dense, q - P6, atol=1e-9)


def test_sampled_teacher_is_the_same_estimate_under_tail_bucket_and_student_full():
    _, teacher = next(_sampled_outcomes())
    a = forward_kl(Z6, teacher, sparse_policy="tail_bucket")
    b = forward_kl(Z6, teacher, sparse_policy="student_full")
    assert float(a) == pytest.approx(float(b), abs=1e-12)


@pytest.mark.parametrize("name", [n for n in DIVERGENCES if n != "forward_kl"])
def test_losses_not_linear_in_the_teacher_refuse_a_sampled_teacher(name):
    from kdforge.errors import ConfigError

    _, teacher = next(_sampled_outcomes())
    with pytest.raises(ConfigError, match="linear"):
        LOSSES.get(name)(Z6, teacher, **PARAMS.get(name, {}))


def test_sampled_teacher_refuses_temperature_and_renormalize_with_the_fix():
    from kdforge.errors import ConfigError

    _, teacher = next(_sampled_outcomes())
    with pytest.raises(ConfigError, match="temperature 1.0"):
        forward_kl(Z6, teacher, temperature=2.0)
    with pytest.raises(ConfigError, match="tail_bucket"):
        forward_kl(Z6, teacher, sparse_policy="renormalize")


def test_sampled_teacher_keeps_num_exact_through_masking_and_batching():
    _, one = next(_sampled_outcomes())
    ids = one.ids.expand(2, 3, -1).clone()
    lps = one.logprobs.expand(2, 3, -1).clone()
    teacher = SparseTeacher(ids, lps, 6, num_exact=2)
    z = Z6.expand(2, 3, -1).clone()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    masked = forward_kl(z, teacher, mask=mask)
    assert float(masked) == pytest.approx(float(forward_kl(Z6, one)), rel=1e-12)
    from kdforge.errors import ConfigError

    with pytest.raises(ConfigError, match="linear"):  # a batched, masked sampled teacher is refused too
        reverse_kl(z, teacher, mask=mask)


def test_chunked_loss_from_hidden_states_uses_the_sampled_entries_like_the_plain_loss():
    from kdforge.errors import ConfigError
    from kdforge.losses.chunked import chunked_distillation_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 4, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    outcomes = [t for _, t in _sampled_outcomes()][:7]
    teacher = SparseTeacher(torch.stack([t.ids for t in outcomes]), torch.stack([t.logprobs for t in outcomes]), 6,
                            num_exact=2)
    plain = forward_kl(h @ w.T, teacher, reduction="sum")
    chunked = chunked_distillation_loss(h, w, teacher, loss="forward_kl", chunk_size=3, reduction="sum")
    assert float(chunked["kd"]) == pytest.approx(float(plain), rel=1e-9)
    with pytest.raises(ConfigError, match="linear"):  # the chunked path refuses non-linear losses too
        chunked_distillation_loss(h, w, teacher, loss="reverse_kl", chunk_size=3)
