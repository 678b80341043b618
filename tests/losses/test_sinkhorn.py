"""Sinkhorn KD: log-domain entropic OT against a plain numpy Sinkhorn written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses import SparseTeacher, sinkhorn_kd, tvd
from kdforge.losses.sinkhorn import sinkhorn_plan


def _numpy_sinkhorn(a, b, cost, eps, n_iters):
    """Cuturi's scaling iterations: v = 1; u = a / (K v); v = b / (K^T u); plan = diag(u) K diag(v)."""
    K = np.exp(-cost / eps)
    v = np.ones_like(b)
    for _ in range(n_iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return u[:, None] * K * v[None, :]


def _pq(s, t, temperature=1.0):
    return (torch.softmax(t.double() / temperature, -1).numpy(), torch.softmax(s.double() / temperature, -1).numpy())


def test_batch_mode_matches_the_reference_plan_and_distance():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    p, q = _pq(s, t)
    cost = 0.5 * np.abs(p[:, None, :] - q[None, :, :]).sum(-1)
    a = b = np.full(6, 1 / 6)
    plan = _numpy_sinkhorn(a, b, cost, eps=0.1, n_iters=30)
    ours_plan = sinkhorn_plan(torch.log(torch.tensor(a)), torch.log(torch.tensor(b)), torch.tensor(cost), 0.1, 30)
    np.testing.assert_allclose(ours_plan.numpy(), plan, rtol=1e-9, atol=1e-12)
    expected = (plan * cost).sum()
    assert sinkhorn_kd(s, t, mode="batch", debias=False, eps=0.1, n_iters=30).item() == pytest.approx(expected, rel=1e-9)
    assert sinkhorn_kd(s, t, mode="batch", debias=False, eps=0.1, n_iters=30, reduction="sum").item() == pytest.approx(
        6 * expected, rel=1e-9)
    per = sinkhorn_kd(s, t, mode="batch", debias=False, eps=0.1, n_iters=30, reduction="none")
    np.testing.assert_allclose(per.numpy(), 6 * (plan * cost).sum(-1), rtol=1e-9)


def test_sample_mode_matches_the_reference_and_approaches_tvd_for_small_eps():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    p, q = _pq(s, t, temperature=2.0)
    cost = 1.0 - np.eye(4)
    expected = [(_numpy_sinkhorn(p[i], q[i], cost, 0.2, 25) * cost).sum() * 4.0 for i in range(3)]
    got = sinkhorn_kd(s, t, mode="sample", debias=False, eps=0.2, n_iters=25, temperature=2.0, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    # unregularised OT with the 0/1 cost is the total variation distance
    sharp = sinkhorn_kd(s, t, mode="sample", debias=False, eps=1e-2, n_iters=3000, reduction="none")
    np.testing.assert_allclose(sharp.numpy(), tvd(s, t, reduction="none").numpy(), atol=1e-3)


def test_log_domain_is_stable_where_plain_scaling_underflows():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 6, generator=g) * 4, torch.randn(5, 6, generator=g) * 4
    with np.errstate(all="ignore"):
        p, q = _pq(s, t)
        cost = 0.5 * np.abs(p[:, None, :] - q[None, :, :]).sum(-1)
        plain = _numpy_sinkhorn(np.full(5, 0.2), np.full(5, 0.2), cost, eps=1e-3, n_iters=50)
    assert not np.isfinite(plain).all()  # exp(-M / 0.001) underflows to 0: 0/0
    value = sinkhorn_kd(s, t, mode="batch", eps=1e-3, n_iters=50)
    assert torch.isfinite(value)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_gradients_match_finite_differences(mode):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: sinkhorn_kd(x, t, mode=mode, eps=0.3, n_iters=6), (s,))


def test_masked_positions_are_left_out_and_errors_name_the_fix():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    got = sinkhorn_kd(s, t, mask=mask, mode="batch")
    assert torch.allclose(got, sinkhorn_kd(s[mask], t[mask], mode="batch"))
    full = SparseTeacher(*reversed(t.log_softmax(-1).topk(5, -1)), 5)  # k = V: the dense teacher
    assert torch.allclose(sinkhorn_kd(s, full, mask=mask, temperature=2.0), sinkhorn_kd(s, t, mask=mask,
                                                                                       temperature=2.0), atol=1e-5)
    with pytest.raises(ShapeError, match="max_positions"):
        sinkhorn_kd(s, t, mode="batch", max_positions=3)
    with pytest.raises(ConfigError, match="eps"):
        sinkhorn_kd(s, t, eps=0.0)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_the_debiased_divergence_is_zero_at_the_teacher_and_matches_the_reference(mode):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert sinkhorn_kd(t.clone(), t, mode=mode).item() == 0.0  # W(p,p) - W(p,p)/2 - W(p,p)/2
    assert sinkhorn_kd(t.clone(), t, mode=mode, debias=False).item() > 0.0  # the plain distance is not
    p, q = _pq(s, t)
    if mode == "batch":
        def w(a, b):
            cost = 0.5 * np.abs(a[:, None, :] - b[None, :, :]).sum(-1)
            return (_numpy_sinkhorn(np.full(4, 0.25), np.full(4, 0.25), cost, 0.1, 20) * cost).sum()
    else:
        def w(a, b):
            cost = 1.0 - np.eye(3)
            return np.mean([(_numpy_sinkhorn(a[i], b[i], cost, 0.1, 20) * cost).sum() for i in range(4)])
    expected = w(p, q) - 0.5 * w(p, p) - 0.5 * w(q, q)
    assert sinkhorn_kd(s, t, mode=mode).item() == pytest.approx(expected, rel=1e-9)
    assert expected > 0
