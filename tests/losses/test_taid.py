"""TAID loss (interpolated target) and its t schedule (linear and the paper's adaptive rule)."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.losses import TAIDSchedule, forward_kl, taid


def test_taid_at_t_one_is_forward_kl_and_at_t_zero_is_zero():
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(taid(s, t, t=1.0, temperature=2.0), forward_kl(s, t, temperature=2.0))
    assert taid(s, t, t=0.0).item() == 0.0


def test_taid_target_is_log_space_interpolation_by_hand():
    p = [0.8, 0.1, 0.1]
    q = [0.4, 0.4, 0.2]
    r = [math.sqrt(a * b) for a, b in zip(p, q)]  # t = 0.5: geometric mean, renormalised
    r = [x / sum(r) for x in r]
    expected = sum(a * math.log(a / b) for a, b in zip(r, q))
    s, t = torch.tensor(q, dtype=torch.float64).log(), torch.tensor(p, dtype=torch.float64).log()
    assert taid(s, t, t=0.5).item() == pytest.approx(expected, rel=1e-9)


def test_taid_target_is_stop_gradient():
    s = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64)
    (g,) = torch.autograd.grad(taid(s, t, t=0.3, reduction="sum"), s)
    target = torch.softmax(0.7 * s.detach() + 0.3 * t, -1)  # constants cancel in log-softmax
    expected = torch.softmax(s.detach(), -1) - target  # d KL(r || softmax(s)) / ds with r fixed
    torch.testing.assert_close(g, expected)


def test_taid_loss_shrinks_as_t_falls():
    s, t = torch.randn(5, 20), torch.randn(5, 20) * 3
    values = [taid(s, t, t=x).item() for x in (0.2, 0.5, 0.8, 1.0)]
    assert values == sorted(values)


def test_linear_schedule_reaches_t_end_at_total_steps():
    sched = TAIDSchedule(total_steps=10, t_start=0.4, mode="linear")
    ts = [sched.step() for _ in range(12)]
    assert ts[4] == pytest.approx(0.4 + 0.6 * 5 / 10)
    assert ts[9] == pytest.approx(1.0) and ts[-1] == pytest.approx(1.0)


def test_adaptive_schedule_runs_ahead_of_linear_while_loss_falls_and_never_behind():
    sched = TAIDSchedule(total_steps=1000, t_start=0.4, alpha=0.05, beta=0.9)
    prev = sched.t
    for step in range(1, 200):
        t = sched.step(10.0 * 0.98**step)  # steadily decreasing loss
        assert t >= sched.linear_t(step) - 1e-12 and t >= prev and t <= 1.0
        prev = t
    assert sched.t > sched.linear_t(199) + 0.1


def test_adaptive_schedule_moves_slower_when_loss_stalls_than_when_it_falls():
    falling = TAIDSchedule(total_steps=10_000, alpha=0.05, beta=0.5)
    rising = TAIDSchedule(total_steps=10_000, alpha=0.05, beta=0.5)
    for step in range(50):
        falling.step(5.0 * 0.9**step)
        rising.step(5.0 * 1.1**step)
    assert falling.t > rising.t


def test_schedule_state_dict_round_trip_resumes_identically():
    a = TAIDSchedule(total_steps=100)
    for x in (3.0, 2.5, 2.4):
        a.step(x)
    b = TAIDSchedule(total_steps=100)
    b.load_state_dict(a.state_dict())
    assert a.step(2.0) == b.step(2.0)


def test_schedule_rejects_bad_configuration():
    with pytest.raises(ConfigError):
        TAIDSchedule(total_steps=0)
    with pytest.raises(ConfigError):
        TAIDSchedule(total_steps=10, mode="cosine")
    with pytest.raises(ConfigError):
        TAIDSchedule(total_steps=10, t_start=0.9, t_end=0.5)
    with pytest.raises(ConfigError, match="needs the current loss"):
        TAIDSchedule(total_steps=10).step()
    with pytest.raises(ConfigError):
        taid(torch.randn(2, 3), torch.randn(2, 3), t=1.5)
