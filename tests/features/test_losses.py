"""Feature losses against their definitions, masks, gradients and invariances."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ShapeError
from kdforge.features import (
    CKALoss,
    HiddenMSE,
    attention_kl,
    cka_loss,
    cosine_hidden,
    hidden_mse,
    linear_cka,
    relation_matrix,
    value_relation_kl,
)


def _attn(b: int, h: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, t, t, generator=g), -1)


# -- hidden_mse / cosine ------------------------------------------------------------------------
def test_hidden_mse_is_the_per_token_mean_square_summed_over_real_tokens():
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])  # [B=1, T=3, H=2]
    t = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    per_tok = [(1 + 4) / 2, (1 + 1) / 2]  # third token is padding
    assert hidden_mse(s, t, mask, reduction="sum").item() == pytest.approx(sum(per_tok))
    assert hidden_mse(s, t, mask, reduction="mean").item() == pytest.approx(sum(per_tok) / 2)
    assert hidden_mse(s, t, mask, reduction="none").tolist() == [[2.5, 1.0, 0.0]]


def test_hidden_mse_ignores_whatever_sits_at_masked_positions():
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    s2 = s.clone()
    s2[~mask] = 1e6
    assert torch.allclose(hidden_mse(s, t, mask, reduction="sum"), hidden_mse(s2, t, mask, reduction="sum"))


def test_hidden_mse_on_conv_maps_averages_over_channels_and_space_per_sample():
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    mask = torch.tensor([True, False, True])
    expected = ((s - t) ** 2).mean(dim=(1, 2, 3))[mask].sum()
    assert torch.allclose(hidden_mse(s, t, mask, reduction="sum"), expected)


def test_hidden_mse_refuses_unprojected_widths_with_a_fix():
    with pytest.raises(ShapeError, match="projector"):
        hidden_mse(torch.randn(1, 2, 3), torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))


def test_cosine_hidden_is_one_minus_the_cosine_and_zero_for_parallel_vectors():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 3.0], [2.0, 2.0]]])
    got = cosine_hidden(s, t, torch.ones(1, 2, dtype=torch.bool), reduction="none")
    assert torch.allclose(got, torch.tensor([[1.0, 0.0]]), atol=1e-6)


def test_hint_losses_never_differentiate_the_teacher():
    s, t = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    (hidden_mse(s, t) + cosine_hidden(s, t) + cka_loss(s, t)).backward()
    assert s.grad is not None and t.grad is None


def test_student_equal_to_teacher_gives_zero_for_every_hint_loss_with_an_identity_projector():
    h = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    hint = HiddenMSE(8, 8, projector="linear")  # square projector starts as the identity
    assert hint(h, h, mask).item() == pytest.approx(0.0, abs=1e-10)
    assert cosine_hidden(h, h, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert CKALoss()(h, h, mask).item() == pytest.approx(0.0, abs=1e-6)
    a = _attn(2, 4, 5, 0)
    assert attention_kl(a, a, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert value_relation_kl(h, h, mask, relation_heads=2).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_mse_module_projects_the_channel_axis_of_conv_maps():
    hint = HiddenMSE(3, 6)  # widths differ: a learned 1x1 map on the channels
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)
    mask = torch.ones(2, dtype=torch.bool)
    projected = torch.einsum("oc,bchw->bohw", hint.projector.weight, s) + hint.projector.bias[None, :, None, None]
    assert torch.allclose(hint(s, t, mask), ((projected - t) ** 2).mean(dim=(1, 2, 3)).mean())


# -- attention KL ----------------------------------------------------------------------------------
def test_attention_kl_matches_the_per_head_kl_formula():
    s, t = _attn(1, 2, 3, 1), _attn(1, 2, 3, 2)
    expected = 0.0
    for i in range(3):
        per_head = [sum(t[0, a, i, j] * math.log(t[0, a, i, j] / s[0, a, i, j]) for j in range(3)) for a in range(2)]
        expected += sum(per_head) / 2
    got = attention_kl(s, t, torch.ones(1, 3, dtype=torch.bool), heads="match", reduction="sum")
    assert got.item() == pytest.approx(float(expected), rel=1e-5)


def test_attention_kl_is_forward_kl_teacher_to_student():
    s, t = _attn(1, 1, 4, 3), _attn(1, 1, 4, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    forward = (t * (t.log() - s.log())).sum(-1).mean()
    assert attention_kl(s, t, mask).item() == pytest.approx(forward.item(), rel=1e-5)
    assert attention_kl(t, s, mask).item() != pytest.approx(forward.item(), rel=1e-3)


def test_attention_kl_with_different_head_counts_averages_each_side_over_heads():
    s, t = _attn(2, 2, 4, 5), _attn(2, 4, 4, 6)
    mask = torch.ones(2, 4, dtype=torch.bool)
    ps, pt = s.mean(1), t.mean(1)
    expected = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert attention_kl(s, t, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ShapeError, match="heads"):
        attention_kl(s, t, mask, heads="match")


def test_attention_kl_skips_masked_queries():
    s, t = _attn(1, 2, 4, 7), _attn(1, 2, 4, 8)
    mask = torch.tensor([[True, True, False, False]])
    full = attention_kl(s, t, torch.ones(1, 4, dtype=torch.bool), reduction="none")
    assert attention_kl(s, t, mask, reduction="sum").item() == pytest.approx(full[0, :2].sum().item(), rel=1e-6)


# -- value relations --------------------------------------------------------------------------------
def test_relation_matrix_is_the_softmax_of_scaled_self_products_per_relation_head():
    v = torch.randn(1, 3, 4)
    rel = relation_matrix(v, relation_heads=2)
    for r in range(2):
        vr = v[0, :, 2 * r: 2 * r + 2]
        assert torch.allclose(rel[0, r], torch.softmax(vr @ vr.T / math.sqrt(2), -1), atol=1e-6)


def test_relation_matrix_masks_padding_keys_and_future_keys_when_causal():
    v = torch.randn(1, 4, 4)
    keys = torch.tensor([[True, True, True, False]])
    rel = relation_matrix(v, 1, keys, causal=True)
    assert torch.all(rel[0, 0, :, 3] == 0)
    assert torch.all(rel[0, 0].triu(1) == 0)
    assert torch.allclose(rel.sum(-1), torch.ones(1, 1, 4))


def test_value_relation_kl_compares_models_of_different_widths_through_relation_heads():
    vs, vt = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    mask = torch.ones(2, 5, dtype=torch.bool)
    rs, rt = relation_matrix(vs, 4), relation_matrix(vt, 4)
    expected = (rt * (rt.log() - rs.log())).sum(-1).mean(1).sum()
    got = value_relation_kl(vs, vt, mask, relation_heads=4, reduction="sum")
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ShapeError, match="relation_heads"):
        value_relation_kl(vs, vt, mask, relation_heads=3)


# -- CKA -------------------------------------------------------------------------------------------
def test_linear_cka_matches_the_kornblith_formula_and_both_computation_paths_agree():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 5, generator=g)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y).item() == pytest.approx(expected.item(), rel=1e-5)  # n > d: covariance path
    wide_x, wide_y = torch.randn(4, 9, generator=g), torch.randn(4, 7, generator=g)
    wxc, wyc = wide_x - wide_x.mean(0), wide_y - wide_y.mean(0)
    expected = (wyc.T @ wxc).norm() ** 2 / ((wxc.T @ wxc).norm() * (wyc.T @ wyc).norm())
    assert linear_cka(wide_x, wide_y).item() == pytest.approx(expected.item(), rel=1e-5)  # n <= d: Gram path


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 12), d=st.integers(2, 6),
       scale=st.floats(0.01, 100.0))
def test_linear_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(seed, n, d, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    y = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    assert linear_cka(x @ q * scale, y).item() == pytest.approx(linear_cka(x, y).item(), abs=1e-5)
    assert linear_cka(x, x @ q * scale).item() == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(2, 6), hs=st.sampled_from([2, 4]), ht=st.sampled_from([2, 4]))
def test_every_feature_loss_is_non_negative(seed, t, hs, ht):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, t, generator=g) > 0.3
    s, tt = torch.randn(2, t, 4, generator=g), torch.randn(2, t, 4, generator=g)
    assert hidden_mse(s, tt, mask, reduction="sum") >= 0
    assert cosine_hidden(s, tt, mask, reduction="sum") >= -1e-6
    assert 0.0 <= linear_cka(s.flatten(0, 1), tt.flatten(0, 1)).item() <= 1.0 + 1e-6
    assert attention_kl(_attn(2, hs, t, seed), _attn(2, ht, t, seed + 1), mask, reduction="sum") >= -1e-6
    assert value_relation_kl(s, torch.randn(2, t, 8, generator=g), mask, relation_heads=2, reduction="sum") >= -1e-6


def test_cka_loss_sum_scales_by_the_number_of_real_positions():
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    one = 1 - linear_cka(s[mask], t[mask])
    assert cka_loss(s, t, mask, reduction="sum").item() == pytest.approx(7 * one.item(), rel=1e-5)


# -- gradients ---------------------------------------------------------------------------------------
def test_gradients_of_every_feature_loss_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[True, True, False]])

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def check(fn, *shape):
        assert torch.autograd.gradcheck(fn, (rand(*shape).requires_grad_(),), eps=1e-6, atol=1e-5)

    t = rand(1, 3, 4)
    check(lambda a: hidden_mse(a, t, mask, reduction="sum"), 1, 3, 4)
    check(lambda a: cosine_hidden(a, t, mask, reduction="sum"), 1, 3, 4)
    tc = rand(1, 3, 6)
    check(lambda a: cka_loss(a, tc, mask, reduction="sum"), 1, 3, 4)
    ta = _attn(1, 2, 3, 9).double()
    check(lambda a: attention_kl(torch.softmax(a, -1), ta, mask, reduction="sum"), 1, 2, 3, 3)
    tv = rand(1, 3, 6)
    check(lambda a: value_relation_kl(a, tv, mask, relation_heads=2, causal=True, reduction="sum"), 1, 3, 4)


def test_normalized_hidden_mse_is_two_minus_twice_the_correlation_and_ignores_scale():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 16, generator=g,
                                                                                dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    sc, tc = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    r = (sc * tc).sum(-1) / (sc.norm(dim=-1) * tc.norm(dim=-1))
    got = hidden_mse(s, t, mask, reduction="none", normalize=True)
    assert torch.allclose(got, 2 * (1 - r), atol=1e-4)
    scaled = hidden_mse(s, 1000.0 * t + 7.0, mask, normalize=True)
    assert scaled.item() == pytest.approx(hidden_mse(s, t, mask, normalize=True).item(), rel=1e-5)
    assert torch.autograd.gradcheck(lambda a: hidden_mse(a, t, mask, reduction="sum", normalize=True),
                                    (s.clone().requires_grad_(),), eps=1e-6, atol=1e-5)
