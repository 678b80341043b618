"""Dual-head KD: KD on an auxiliary head, CE on the main head (Yang et al. 2024)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses import LOSSES, cross_entropy, dual_head_kd, forward_kl
from kdforge.students import DualHeadStudent


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def _data(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_value_is_ce_on_main_plus_kd_on_aux_by_hand():
    g = torch.Generator().manual_seed(0)
    main, aux, t = (torch.randn(5, 4, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, -100, 3, 2])
    got = dual_head_kd(main, t, aux_logits=aux, labels=y, ce_weight=0.3, kd_weight=0.7, temperature=2.0,
                       reduction="sum")
    expected = 0.3 * cross_entropy(main, None, labels=y, reduction="sum") + \
        0.7 * forward_kl(aux, t, temperature=2.0, reduction="sum")
    assert torch.allclose(got, expected, atol=1e-6)
    mean = dual_head_kd(main, t, aux_logits=aux, labels=y, ce_weight=0.3, kd_weight=0.7, temperature=2.0)
    assert torch.allclose(mean, expected / 5, atol=1e-6)
    with_main = dual_head_kd(main, t, aux_logits=aux, labels=y, main_kd_weight=0.5, reduction="sum")
    assert torch.allclose(with_main, dual_head_kd(main, t, aux_logits=aux, labels=y, reduction="sum")
                          + 0.5 * forward_kl(main, t, reduction="sum"), atol=1e-6)
    assert LOSSES.get("dual_head_kd").fn is dual_head_kd


def test_teacher_gradient_reaches_only_the_aux_head_and_the_backbone():
    model = DualHeadStudent(_net())
    x, t, y = _data()
    model.train()
    dual_head_kd(model(x), t, heads=model, labels=y, ce_weight=0.0, kd_weight=1.0).backward()
    main_head = model.model[2]
    assert main_head.weight.grad is None or main_head.weight.grad.abs().max() == 0
    assert model.aux_head.weight.grad.abs().max() > 0
    assert model.model[0].weight.grad.abs().max() > 0  # the shared backbone
    model.zero_grad()
    dual_head_kd(model(x), t, heads=model, labels=y, ce_weight=1.0, kd_weight=0.0).backward()
    assert model.aux_head.weight.grad is None or model.aux_head.weight.grad.abs().max() == 0


def test_kd_weight_zero_trains_the_main_head_exactly_like_ce():
    plain = _net()
    wrapped = DualHeadStudent(copy.deepcopy(plain))
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped.train()
    for step in range(5):
        x, t, y = _data(step)
        opt_a.zero_grad()
        cross_entropy(plain(x), None, labels=y).backward()
        opt_a.step()
        opt_b.zero_grad()
        dual_head_kd(wrapped(x), t, heads=wrapped, labels=y, kd_weight=0.0).backward()
        opt_b.step()
    for a, b in zip(plain.parameters(), wrapped.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_eval_mode_is_the_plain_student_and_gradients_match_finite_differences():
    model = DualHeadStudent(_net())
    x, t, y = _data()
    model.eval()
    assert torch.equal(model(x), model.model(x))
    aux = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    main = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m, a: dual_head_kd(m, t[:4].double(), aux_logits=a, labels=y[:4], temperature=2.0), (main, aux))


def test_errors_name_the_fix():
    x, t, y = _data()
    with pytest.raises(ConfigError, match="not both"):
        dual_head_kd(torch.randn(16, 4), t, labels=y, heads=DualHeadStudent(_net()), aux_logits=torch.randn(16, 4))
    s = torch.randn(16, 4)  # no second head: CE + KD on the one head
    assert torch.allclose(dual_head_kd(s, t, labels=y, reduction="sum"),
                          cross_entropy(s, None, labels=y, reduction="sum") + forward_kl(s, t, reduction="sum"))
    with pytest.raises(ConfigError, match="registered"):
        dual_head_kd(torch.randn(16, 4), t, aux_logits=torch.randn(16, 4), labels=y, kd_loss="nope")
    with pytest.raises(ShapeError, match="auxiliary"):
        dual_head_kd(torch.randn(16, 4), t, aux_logits=torch.randn(16, 3), labels=y)
    with pytest.raises(ConfigError, match="nn.Linear"):
        DualHeadStudent(nn.Sequential(nn.ReLU()))
