"""The true bilevel meta-objective of trilateral KD's ratio network (kdforge.losses.trilateral_bilevel)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdforge.errors import ConfigError
from kdforge.losses import TrilateralBilevel, TrilateralFusion, trilateral_kd
from kdforge.losses.trilateral import relation_features
from kdforge.losses.trilateral_bilevel import (
    fused_logit_grad,
    head_lookahead_logits,
    lookahead_holdout_ce,
)

C, D = 4, 6


def _problem(seed: int, n: int = 8, m: int = 5):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    x, t = torch.randn(n, D, generator=g, **f64), 2 * torch.randn(n, C, generator=g, **f64)
    y = torch.randint(0, C, (n,), generator=g)
    y[1] = -100  # an unlabelled (transfer-set) sample: r = 1, KD only
    x_val, y_val = torch.randn(m, D, generator=g, **f64), torch.randint(0, C, (m,), generator=g)
    return x, t, y, x_val, y_val


def _fusion(seed: int) -> TrilateralFusion:
    torch.manual_seed(seed)
    fusion = TrilateralFusion(C).double()
    with torch.no_grad():  # a non-trivial network: every parameter influences r
        fusion.mlp[2].weight.normal_(0, 1.0)
        fusion.class_mean.copy_(torch.softmax(torch.randn(C, C, dtype=torch.float64), -1))
    return fusion


def _linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, C).double()


def _hand_holdout_ce(phi: torch.Tensor, fusion, lin, x, t, y, x_val, y_val, temperature, eta) -> torch.Tensor:
    """The look-ahead written out by hand for ``s = x W^T + b`` (no autograd): ``r`` from the network
    with flat parameters ``phi``, the fused loss's gradient in W and b, one SGD step, the held-out CE."""
    w1, b1, w2, b2 = torch.split(phi, [fusion.mlp[0].weight.numel(), fusion.mlp[0].bias.numel(),
                                       fusion.mlp[2].weight.numel(), 1])
    w, b = lin.weight.detach(), lin.bias.detach()
    s = x @ w.T + b
    has = y != -100
    feats = relation_features(s.softmax(-1), t.softmax(-1), torch.where(has, y, 0), fusion.class_mean)
    hidden = torch.relu(feats @ w1.view(fusion.mlp[0].weight.shape).T + b1)
    r = torch.sigmoid(hidden @ w2.view(1, -1).T + b2).squeeze(-1)
    r = torch.where(has, r, torch.ones_like(r))
    g_kd = temperature * ((s / temperature).softmax(-1) - (t / temperature).softmax(-1))
    g_ce = (s.softmax(-1) - torch.eye(C, dtype=s.dtype)[torch.where(has, y, 0)]) * has.unsqueeze(-1)
    grad_s = (r.unsqueeze(-1) * g_kd + (1 - r.unsqueeze(-1)) * g_ce) / len(y)
    w_new, b_new = w - eta * grad_s.T @ x, b - eta * grad_s.sum(0)
    logp = torch.log_softmax(x_val @ w_new.T + b_new, -1)
    return -logp[torch.arange(len(y_val)), y_val].mean()


@pytest.mark.parametrize("lookahead", ["all", "head"])
def test_meta_gradient_equals_finite_differences_of_the_hand_written_lookahead(lookahead):
    x, t, y, x_val, y_val = _problem(0)
    fusion, lin = _fusion(1), _linear(2)
    temperature, eta = 2.0, 0.7
    meta = lookahead_holdout_ce(lin, fusion, x, t, y, x_val, y_val, temperature=temperature, inner_lr=eta,
                                lookahead=lookahead, head=lin)
    got = torch.cat([g.flatten() for g in torch.autograd.grad(meta, list(fusion.parameters()))])
    phi = torch.cat([p.detach().flatten() for p in fusion.parameters()])
    assert float(_hand_holdout_ce(phi, fusion, lin, x, t, y, x_val, y_val, temperature, eta)) == pytest.approx(
        float(meta.detach()), rel=1e-12)
    eps = 1e-6
    expected = torch.stack([
        (_hand_holdout_ce(phi + eps * e, fusion, lin, x, t, y, x_val, y_val, temperature, eta)
         - _hand_holdout_ce(phi - eps * e, fusion, lin, x, t, y, x_val, y_val, temperature, eta)) / (2 * eps)
        for e in torch.eye(len(phi), dtype=phi.dtype)])
    assert got.abs().max() > 1e-4  # the check is not vacuous
    assert torch.allclose(got, expected, atol=1e-8, rtol=1e-6)
    assert all(p.grad is None for p in lin.parameters())  # nothing flows into the student


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.5, 4.0), eta=st.floats(0.01, 2.0))
def test_head_lookahead_equals_all_when_the_student_is_one_linear_layer(seed, temperature, eta):
    x, t, y, x_val, y_val = _problem(seed)
    fusion, lin = _fusion(seed + 1), _linear(seed + 2)
    kw = dict(temperature=temperature, inner_lr=eta, head=lin)
    a = lookahead_holdout_ce(lin, fusion, x, t, y, x_val, y_val, lookahead="all", **kw)
    h = lookahead_holdout_ce(lin, fusion, x, t, y, x_val, y_val, lookahead="head", **kw)
    assert torch.allclose(a, h, rtol=1e-10)
    for ga, gh in zip(torch.autograd.grad(a, list(fusion.parameters())),
                      torch.autograd.grad(h, list(fusion.parameters()))):
        assert torch.allclose(ga, gh, rtol=1e-8, atol=1e-12)


def test_head_lookahead_is_exact_for_the_head_of_a_deeper_student():
    """On an MLP, ``head`` equals ``all`` restricted to the final layer's parameters."""
    x, t, y, x_val, y_val = _problem(3)
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, C)).double()
    fusion = _fusion(5)
    kw = dict(temperature=1.5, inner_lr=0.3)
    a = lookahead_holdout_ce(mlp, fusion, x, t, y, x_val, y_val, lookahead="all", params=["2.weight", "2.bias"], **kw)
    h = lookahead_holdout_ce(mlp, fusion, x, t, y, x_val, y_val, lookahead="head", head=mlp[2], **kw)
    full = lookahead_holdout_ce(mlp, fusion, x, t, y, x_val, y_val, lookahead="all", **kw)
    assert torch.allclose(a, h, rtol=1e-10)
    assert not torch.allclose(full, h, rtol=1e-6)  # moving the hidden layer too is another look-ahead
    for ga, gh in zip(torch.autograd.grad(a, list(fusion.parameters())),
                      torch.autograd.grad(h, list(fusion.parameters()))):
        assert torch.allclose(ga, gh, rtol=1e-8, atol=1e-12)


def test_head_lookahead_logits_and_logit_gradient_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, -100])
    g = fused_logit_grad(s, t, y, torch.tensor([0.25, 0.9], dtype=torch.float64), temperature=1.0)
    q, p = s.softmax(-1), t.softmax(-1)
    row0 = (0.25 * (q[0] - p[0]) + 0.75 * (q[0] - torch.tensor([1.0, 0.0], dtype=torch.float64))) / 2
    row1 = (q[1] - p[1]) / 2  # unlabelled: KD only, whatever r says
    assert torch.allclose(g, torch.stack([row0, row1]))
    h_tr, h_val = torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    s_val = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    expected = s_val - 0.1 * ((3 * 1 + 1) * g[0] + (3 * 2 + 1) * g[1])
    assert torch.allclose(head_lookahead_logits(s_val, h_val, h_tr, g, 0.1), expected)


def test_student_sees_the_ratio_detached_and_the_loss_adds_no_update_term():
    x, t, y, _, _ = _problem(6)
    fusion, lin = _fusion(7), _linear(8)
    fusion.bilevel_attached = True  # what TrilateralMetaLearner sets
    s = lin(x)
    loss = trilateral_kd(s, t, fusion=fusion, labels=y, temperature=2.0, bilevel=TrilateralBilevel())
    grads = torch.autograd.grad(loss, list(lin.parameters()), allow_unused=True)
    has = y != -100
    with torch.no_grad():
        r = fusion(relation_features(s.softmax(-1), t.softmax(-1), torch.where(has, y, 0), fusion.class_mean))
    r = torch.where(has, r, torch.ones_like(r))
    s2 = lin(x)
    kd = 4.0 * (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s2 / 2, -1))).sum(-1)
    ce = torch.nn.functional.cross_entropy(s2, torch.where(has, y, 0), reduction="none") * has
    fixed = (r * kd + (1 - r) * ce).mean()
    assert torch.allclose(loss, fixed)
    for a, b in zip(grads, torch.autograd.grad(fixed, list(lin.parameters()))):
        assert torch.allclose(a, b)
    loss2 = trilateral_kd(lin(x), t, fusion=fusion, labels=y, temperature=2.0, bilevel={"lookahead": "all"})
    loss2.backward()
    assert all(p.grad is None for p in fusion.parameters())  # no first-order update term either


def test_errors_name_the_fix():
    x, t, y, x_val, y_val = _problem(9)
    fusion, lin = _fusion(10), _linear(11)
    with pytest.raises(ConfigError, match="no meta-learner"):
        trilateral_kd(lin(x), t, fusion=fusion, labels=y, bilevel=TrilateralBilevel())
    with pytest.raises(ConfigError, match="drop bilevel"):
        trilateral_kd(lin(x), t, ratio=0.5, labels=y, bilevel=TrilateralBilevel())
    with pytest.raises(ConfigError, match="lookahead: all"):
        lookahead_holdout_ce(nn.Sequential(lin, nn.Tanh()), fusion, x, t, y, x_val, y_val, head=lin)
    with pytest.raises(ValueError):
        TrilateralBilevel(lookahead="everything")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), eta=st.floats(0.01, 3.0), temperature=st.floats(0.5, 4.0))
def test_ratio_gradient_is_the_documented_inner_product(seed, eta, temperature):
    """``dCE_val/dr_i = -(eta/n) <grad CE_val(theta'), grad_theta d_i(theta)>``, here in the head's
    closed form: ``-(eta/(n m)) sum_j K_ji <softmax(s'_j) - e_{y_j}, g_kd_i - g_ce_i>``."""
    g = torch.Generator().manual_seed(seed)
    n, m, d = 6, 4, 3
    f64 = dict(dtype=torch.float64)
    s, t = torch.randn(n, C, generator=g, **f64), torch.randn(n, C, generator=g, **f64)
    y, y_val = torch.randint(0, C, (n,), generator=g), torch.randint(0, C, (m,), generator=g)
    h_tr, h_val = torch.randn(n, d, generator=g, **f64), torch.randn(m, d, generator=g, **f64)
    s_val = torch.randn(m, C, generator=g, **f64)
    r = torch.rand(n, generator=g, **f64).requires_grad_(True)
    ahead = head_lookahead_logits(s_val, h_val, h_tr, fused_logit_grad(s, t, y, r, temperature), eta)
    got = torch.autograd.grad(torch.nn.functional.cross_entropy(ahead, y_val), r)[0]
    v = (ahead.detach().softmax(-1) - torch.eye(C, **f64)[y_val]) / m
    g_kd = temperature * ((s / temperature).softmax(-1) - (t / temperature).softmax(-1))
    g_ce = s.softmax(-1) - torch.eye(C, **f64)[y]
    kernel = h_val @ h_tr.T + 1.0
    expected = -eta / n * ((kernel.T @ v) * (g_kd - g_ce)).sum(-1)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
