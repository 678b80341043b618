"""DAC-KL's learned clipping sub-network (kdforge.losses.dac_clip) and its look-ahead training rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError
from kdforge.losses import LOSSES, DACClipNet, dac_kl
from kdforge.losses.dac_clip import clip_features, region_log_weights
from kdforge.losses.dac_kl import _learned_region, dense_region, soft_clipped_kl


class FixedLimits(DACClipNet):
    """A clipping net whose outputs are the given constants (l, u)."""

    def __init__(self, lower: float, upper: float) -> None:
        super().__init__()
        self.limits = (lower, upper)

    def forward(self, sorted_probs):
        n = sorted_probs.shape[0]
        return sorted_probs.new_full((n,), self.limits[0]), sorted_probs.new_full((n,), self.limits[1])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), mass=st.floats(0.05, 1.0), temperature=st.sampled_from([1.0, 2.0]),
       max_k=st.sampled_from([None, 1, 3]), lower=st.sampled_from([0.0, -0.5]))
def test_fixed_limits_with_a_hard_window_are_the_fixed_mass_loss(seed, mass, temperature, max_k, lower):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 3, 7, generator=g), 3 * torch.randn(2, 3, 7, generator=g)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    labels[0, 0] = -100
    mask = torch.rand(2, 3, generator=g) > 0.2
    kw = dict(labels=labels, mask=mask, temperature=temperature, max_k=max_k, reduction="none")
    want = dac_kl(s, t, mass=mass, **kw)
    got = dac_kl(s, t, clip_net=FixedLimits(lower, mass), region_temperature=0.0, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the same region; two float32 evaluations


def test_a_fresh_net_is_the_fixed_mass_rule_and_a_small_tau_approaches_it():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), 2 * torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    net = DACClipNet(init_mass=0.8)  # zero last layer: u = 0.8 (or just below the top class), l < 0
    torch.testing.assert_close(dac_kl(s, t, clip_net=net, region_temperature=0.0, labels=y),
                               dac_kl(s, t, mass=0.8, labels=y), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        soft = [float(dac_kl(s, t, clip_net=net, region_temperature=tau, labels=y)) for tau in (0.1, 0.01, 1e-4)]
    hard = float(dac_kl(s, t, mass=0.8, labels=y))
    assert abs(soft[2] - hard) < abs(soft[0] - hard) and soft[2] == pytest.approx(hard, rel=1e-2)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.01, 0.3))
def test_membership_is_soft_monotone_and_complementary(seed, tau):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(4, 9, generator=g).double().softmax(-1).sort(-1, descending=True).values
    lo, up = torch.rand(4, generator=g).double() * 0.5 - 0.3, torch.rand(4, generator=g).double() * 0.8 + 0.3
    log_w, log_out = region_log_weights(probs, lo, up, tau)
    w = log_w.exp()
    assert ((w >= 0) & (w <= 1)).all() and torch.allclose(w + log_out.exp(), torch.ones_like(w))
    assert (w[:, 0] == 1).all()  # the top class is always kept
    assert (region_log_weights(probs, lo, up + 0.1, tau)[0].exp() >= w - 1e-12).all()  # a higher u keeps more
    assert (region_log_weights(probs, lo + 0.1, up, tau)[0].exp() <= w + 1e-12).all()  # a higher l keeps less
    # far inside / outside the window the membership saturates; the hard window is its tau -> 0 limit
    hard = region_log_weights(probs, lo, up, 0.0)[0].exp()
    tiny = region_log_weights(probs, lo, up, 1e-6)[0].exp()
    after = probs.cumsum(-1)
    clear = ((after - probs - up.unsqueeze(-1)).abs() > 1e-3) & ((after - lo.unsqueeze(-1)).abs() > 1e-3)
    assert torch.allclose(tiny[clear], hard[clear], atol=1e-6)


def test_soft_clipped_kl_is_the_kl_of_the_shared_out_distributions():
    g = torch.Generator().manual_seed(1)
    logp, logq = torch.randn(3, 6, generator=g).double().log_softmax(-1), torch.randn(3, 6, generator=g).double().log_softmax(-1)
    w = torch.rand(3, 6, generator=g).double()
    value, log_ratio = soft_clipped_kl(logp, logq, w.log(), (1 - w).log())
    p, q = logp.exp(), logq.exp()
    p_, q_ = torch.cat([w * p, ((1 - w) * p).sum(-1, keepdim=True)], -1), torch.cat([w * q, ((1 - w) * q).sum(-1, keepdim=True)], -1)
    assert torch.allclose(value, (p_ * (p_ / q_).log()).sum(-1))
    assert torch.allclose(log_ratio, (p_[:, -1] / q_[:, -1]).log())


def _region(net, t, y, temperature, tau=0.05):
    return _learned_region(torch.log_softmax(t / temperature, -1), net, tau, None, y)


def _look_ahead_objective(net, s, t, y, temperature, eta):
    """``sum_i CE(s_i - eta * autograd grad_s DAC-KL(s; w(phi)), y_i)``, independently of the closed form."""
    log_w, log_out = _region(net, t, y, temperature)
    s_var = s.detach().clone().requires_grad_(True)
    value = soft_clipped_kl(torch.log_softmax(t / temperature, -1), torch.log_softmax(s_var / temperature, -1),
                            log_w, log_out)[0].sum() * temperature**2
    grad = torch.autograd.grad(value, s_var, create_graph=True)[0]
    return torch.nn.functional.cross_entropy(s.detach() - eta * grad, y, reduction="sum")


def _net(seed):
    torch.manual_seed(seed)
    net = DACClipNet(top_m=4, hidden=5).double()
    with torch.no_grad():  # leave the zero start so that every parameter has a gradient
        net.mlp[2].weight.normal_(0, 0.3)
    return net


def test_meta_gradient_matches_finite_differences_and_autograd_look_ahead():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 6, generator=g).double(), 2 * torch.randn(5, 6, generator=g).double()
    y = torch.randint(0, 6, (5,), generator=g)
    temperature, eta = 2.0, 0.7
    net = _net(0)
    s_var = s.clone().requires_grad_(True)
    dac_kl(s_var, t, clip_net=net, labels=y, temperature=temperature, meta_lr=eta, reduction="sum").backward()
    got = [p.grad.clone() for p in net.parameters()]
    ref = _net(0)
    _look_ahead_objective(ref, s, t, y, temperature, eta).backward()
    for a, b in zip(got, ref.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-10)
    bias = net.mlp[2].bias
    for k in range(2):  # central differences on the output biases (l, u)
        h = 1e-5
        bias.data[k] += h
        up = float(_look_ahead_objective(net, s, t, y, temperature, eta).detach())
        bias.data[k] -= 2 * h
        down = float(_look_ahead_objective(net, s, t, y, temperature, eta).detach())
        bias.data[k] += h
        assert got[3][k] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_student_sees_the_detached_region_the_net_gets_gradient_and_the_value_is_unchanged():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 8, generator=g).double(), 2 * torch.randn(6, 8, generator=g).double()
    y = torch.randint(0, 8, (6,), generator=g)
    net = _net(1)
    s_var = s.clone().requires_grad_(True)
    loss = dac_kl(s_var, t, clip_net=net, labels=y, temperature=2.0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with torch.no_grad():
        log_w, log_out = _region(net, t, y, 2.0)
    s_ref = s.clone().requires_grad_(True)
    fixed = soft_clipped_kl(torch.log_softmax(t / 2, -1), torch.log_softmax(s_ref / 2, -1), log_w, log_out)[0].mean() * 4
    fixed.backward()
    assert torch.allclose(s_var.grad, s_ref.grad, atol=1e-12)
    assert float(loss.detach()) == pytest.approx(float(fixed.detach()), abs=1e-12)  # the meta term adds 0 to the value
    net.eval()  # eval mode: no meta term, same value
    assert float(dac_kl(s, t, clip_net=net, labels=y, temperature=2.0)) == pytest.approx(float(fixed.detach()), abs=1e-12)


def _train_u(student_logits, teacher_probs, y, steps=60):
    torch.manual_seed(0)
    net = DACClipNet(init_mass=0.8).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        dac_kl(student_logits, teacher_probs.log(), clip_net=net, labels=y).backward()
        opt.step()
    with torch.no_grad():
        return float(net(teacher_probs.sort(-1, descending=True).values)[1].mean())


def test_the_region_widens_when_the_teacher_tail_is_signal_and_shrinks_when_it_is_noise():
    n = 8
    y = torch.zeros(n, dtype=torch.long)
    jitter = 0.05 * torch.randn(n, 6, dtype=torch.float64)
    # signal: the student wrongly favours class 1, which the teacher's tail rates very unlikely
    student = torch.tensor([1.0, 1.5, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64) + jitter
    teacher = torch.tensor([0.72, 0.002, 0.098, 0.06, 0.06, 0.06], dtype=torch.float64).expand(n, 6)
    assert _train_u(student, teacher, y) > 0.85
    # noise: the teacher's tail spreads mass over wrong classes the student already rules out
    student = torch.tensor([2.0, -1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64) + jitter
    teacher = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.03, 0.02], dtype=torch.float64).expand(n, 6)
    assert _train_u(student, teacher, y) < 0.75


def test_region_stats_are_running_means_of_the_training_calls():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    net = DACClipNet(init_mass=0.8, momentum=0.5)
    assert net.region_stats == {}
    net.eval()
    dac_kl(s, t, clip_net=net)
    assert net.region_stats == {}  # eval calls are not recorded
    net.train()
    dac_kl(s, t, clip_net=net, region_temperature=0.0)
    first = net.region_stats
    hard = dense_region(torch.log_softmax(t, -1), 0.8)
    with torch.no_grad():
        lower, upper = net(t.softmax(-1).sort(-1, descending=True).values)
    assert first["upper"] == pytest.approx(float(upper.mean())) and first["lower"] == pytest.approx(float(lower.mean()))
    assert first["region_size"] == pytest.approx(float(hard.sum(-1).float().mean()))
    assert first["region_mass"] == pytest.approx(float((hard * t.softmax(-1)).sum(-1).mean()), rel=1e-6)
    dac_kl(s, t, clip_net=net, region_temperature=0.0, max_k=1)
    assert net.region_stats["region_size"] == pytest.approx(0.5 * first["region_size"] + 0.5)
    assert int(net.stats_seen) == 2


def test_features_pad_small_vocabularies_and_describe_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    f = clip_features(probs, top_m=5)
    assert f.shape == (1, 7) and torch.allclose(f[0, :5], torch.tensor([0.7, 0.2, 0.1, 0.0, 0.0]))
    assert f[0, 6] == pytest.approx(0.0, abs=1e-7)  # no mass beyond the top 5
    assert 0 < f[0, 5] < 1  # entropy / log V


def test_configuration_errors_name_the_fix():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ConfigError, match="clip_net"):
        dac_kl(s, t, learned=True)
    with pytest.raises(ConfigError, match="region_temperature"):
        dac_kl(s, t, clip_net=DACClipNet(), region_temperature=-1.0)
    with pytest.raises(ConfigError, match="margin"):
        DACClipNet(margin=0.0)
    spec = LOSSES.get("dac_kl")
    assert spec.validate_params({"learned": True, "meta_lr": 0.5}) == {"learned": True, "meta_lr": 0.5}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 6.0), mass=st.floats(0.3, 1.0), push=st.floats(-50.0, 50.0))
def test_limits_start_at_the_mass_and_stay_in_their_range(seed, scale, mass, push):
    g = torch.Generator().manual_seed(seed)
    probs = (scale * torch.randn(6, 9, generator=g)).softmax(-1).sort(-1, descending=True).values
    net = DACClipNet(init_mass=mass, margin=0.1)
    with torch.no_grad():
        lower, upper = net(probs)
    inside = probs[:, 0] - 0.1 < mass
    assert torch.allclose(upper[inside], torch.full_like(upper[inside], mass), atol=1e-5)
    assert (lower < 0).all() and (lower > -0.1).all()
    with torch.no_grad():
        net.mlp[2].bias.fill_(push)  # however far the outputs are pushed, the limits stay bounded
        lower, upper = net(probs)
    assert (upper >= probs[:, 0] - 0.1).all() and (upper <= 1.1).all()
    assert (lower >= -0.1).all() and (lower <= upper).all()
