"""Trilateral-geometry KD: per-sample learned KD/CE fusion ratio (Hu et al. 2024)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses import LOSSES, TrilateralFusion, cross_entropy, forward_kl, trilateral_kd
from kdforge.losses.trilateral import meta_scores, relation_features


def _batch(seed: int, n: int = 6, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.5, 4.0))
def test_fixed_ratio_limits_are_ce_and_kd(seed, temperature):
    s, t, y = _batch(seed)
    assert torch.allclose(trilateral_kd(s, t, labels=y, ratio=0.0, temperature=temperature),
                          cross_entropy(s, None, labels=y), atol=1e-6)
    assert torch.allclose(trilateral_kd(s, t, labels=y, ratio=1.0, temperature=temperature),
                          forward_kl(s, t, temperature=temperature), atol=1e-6)


def test_hand_computed_mix_and_unlabelled_samples_keep_only_kd():
    s, t, y = _batch(1, n=3)
    y[1] = -100
    q, p = s.softmax(-1), t.softmax(-1)
    kd = (p * (p.log() - q.log())).sum(-1)
    ce = -q.log()[torch.arange(3), y.clamp(min=0)]
    expected = torch.stack([0.3 * kd[0] + 0.7 * ce[0], kd[1], 0.3 * kd[2] + 0.7 * ce[2]])
    assert torch.allclose(trilateral_kd(s, t, labels=y, ratio=0.3, reduction="none"), expected, atol=1e-6)
    assert LOSSES.get("trilateral_kd").fn is trilateral_kd


def test_relation_features_by_hand():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    p = torch.tensor([[0.2, 0.5, 0.3]])
    mean = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    f = relation_features(q, p, torch.tensor([0]), mean)[0]
    expected = [0.7, 0.2, 1.0, 0.0, 0.5, 0.4, 0.1, 0.5]
    assert torch.allclose(f, torch.tensor(expected), atol=1e-6)


def test_network_starts_at_its_init_ratio_and_the_value_ignores_the_update_term():
    s, t, y = _batch(2)
    fusion = TrilateralFusion(5, init_ratio=0.25)
    learned = trilateral_kd(s, t, labels=y, fusion=fusion)
    fixed = trilateral_kd(s, t, labels=y, ratio=0.25)
    assert torch.allclose(learned, fixed, atol=1e-6)  # the meta term adds 0 to the value


def test_student_gradient_is_that_of_the_detached_ratio_and_the_network_gets_the_meta_gradient():
    s, t, y = _batch(3)
    fusion = TrilateralFusion(5, init_ratio=0.5)
    s1 = s.clone().requires_grad_(True)
    trilateral_kd(s1, t, labels=y, fusion=fusion, reduction="sum").backward()
    s2 = s.clone().requires_grad_(True)
    trilateral_kd(s2, t, labels=y, ratio=0.5, reduction="sum").backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)
    # last layer weights start at 0: d(meta)/d(bias) = -sum_i r_i (1 - r_i) s_i
    scores = meta_scores(s, t, y, 1.0)
    assert fusion.mlp[2].bias.grad.item() == pytest.approx(float(-(0.25 * scores).sum()), rel=1e-5, abs=1e-7)


def test_meta_scores_by_hand_and_their_sign():
    s = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0]])
    y = torch.tensor([0, 0, 1])
    t = torch.tensor([[0.0, 6.0, 0.0], [4.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    q, p = s.softmax(-1), t.softmax(-1)
    g_ce = q - torch.nn.functional.one_hot(y, 3)
    g_kd = q - p
    cos01 = (q[0] @ q[1]) / (q[0].norm() * q[1].norm())
    expected = torch.stack([cos01 * g_ce[1] @ (g_kd[0] - g_ce[0]), cos01 * g_ce[0] @ (g_kd[1] - g_ce[1]),
                            torch.tensor(0.0)])  # sample 2 has no other sample of its class
    assert torch.allclose(meta_scores(s, t, y, 1.0), expected, atol=1e-6)
    scores = meta_scores(s, t, y, 1.0)
    assert scores[0] < 0  # the teacher points at the wrong class on sample 0
    # a correct but soft teacher (sample 1) also scores below 0, far less: at first order the
    # similar sample's CE prefers the hard label (docs/regimes.md)
    assert scores[0] < scores[1] < 0


def test_training_moves_the_ratio_away_from_a_wrong_teacher():
    torch.manual_seed(0)
    fusion = TrilateralFusion(3, init_ratio=0.5)
    opt = torch.optim.SGD(fusion.parameters(), lr=0.5)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    wrong = torch.nn.functional.one_hot((y + 1) % 3, 3).float() * 5  # a teacher that is always wrong
    for _ in range(30):
        s = torch.randn(6, 3) * 0.1
        opt.zero_grad()
        trilateral_kd(s, wrong, labels=y, fusion=fusion, reduction="sum").backward()
        opt.step()
    s = torch.randn(6, 3) * 0.1
    ratios = fusion(relation_features(s.softmax(-1), wrong.softmax(-1), y, fusion.class_mean))
    assert (ratios < 0.3).all()


def test_gradient_matches_finite_differences():
    s, t, y = _batch(4)
    s = s.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: trilateral_kd(x, t.double(), labels=y, ratio=0.4, temperature=2.0),
                                    (s,))


def test_errors_name_the_fix():
    s, t, y = _batch(5)
    with pytest.raises(ShapeError, match="labels"):
        trilateral_kd(s, t)
    with pytest.raises(ConfigError, match="ratio"):
        trilateral_kd(s, t, labels=y, ratio=1.5)
