"""Sentence-embedding losses (kdforge.losses.embedding) against their formulas and invariances."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses import (
    LOSSES,
    chunked_distillation_loss,
    embedding_cosine,
    embedding_mse,
    similarity_kd,
)


def test_embedding_mse_and_cosine_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert embedding_mse(s, t, reduction="none").tolist() == [1.0, 0.5]  # (1 + 1) / 2, (0 + 1) / 2
    assert embedding_mse(s, t, normalize=True, reduction="none").tolist() == [1.0, 0.0]
    torch.testing.assert_close(embedding_cosine(s, t, reduction="none"), torch.tensor([1.0, 0.0]))
    assert embedding_mse(s, t, reduction="sum").item() == 1.5 and embedding_mse(s, t).item() == 0.75


def test_similarity_kd_by_hand_on_three_sentences():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    temp = 0.5
    got = similarity_kd(s, t, temperature=temp, reduction="none")

    def rows(e):
        e = e / e.norm(dim=1, keepdim=True)
        c = e @ e.T
        return [torch.tensor([c[i, j] for j in range(3) if j != i]) for i in range(3)]

    want = []
    for cs, ct in zip(rows(s), rows(t)):
        p, q = torch.softmax(ct / temp, 0), torch.softmax(cs / temp, 0)
        want.append(float((p * (p.log() - q.log())).sum()) * temp**2)
    torch.testing.assert_close(got, torch.tensor(want))


def test_similarity_kd_ignores_rotations_and_scales_of_either_space_and_the_widths():
    torch.manual_seed(0)
    t = torch.randn(6, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    scale = torch.rand(6, 1) + 0.5
    assert similarity_kd(t @ q * scale, t).item() == pytest.approx(0.0, abs=1e-6)  # same relations
    s = torch.randn(6, 8)
    torch.testing.assert_close(similarity_kd(s @ q, t), similarity_kd(s, t))
    assert similarity_kd(s, t).item() > 1e-4


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True])
    for fn, kw in ((embedding_mse, {}), (embedding_mse, {"normalize": True}), (embedding_cosine, {}),
                   (similarity_kd, {"temperature": 0.3})):
        assert torch.autograd.gradcheck(lambda x, fn=fn, kw=kw: fn(x, t, mask=mask, **kw), (s,)), fn.__name__


def test_mask_drops_positions_and_similarity_kd_relates_only_real_ones():
    torch.manual_seed(2)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    mask = torch.tensor([True, False, True, True, False])
    for fn in (embedding_mse, embedding_cosine, similarity_kd):
        torch.testing.assert_close(fn(s, t, mask=mask), fn(s[mask], t[mask]))
        garbage = s.clone()
        garbage[~mask] = float("nan")
        torch.testing.assert_close(fn(garbage, t, mask=mask), fn(s[mask], t[mask]))
    assert similarity_kd(s[:1], t[:1]).item() == 0.0  # one sentence: no relation


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(2, 5), st.floats(0.05, 2.0), st.integers(0, 10_000))
def test_nonnegative_and_zero_at_the_teacher(n, d, temp, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    for fn, kw in ((embedding_mse, {}), (embedding_cosine, {}), (similarity_kd, {"temperature": temp})):
        assert fn(s, t, **kw).item() >= -1e-6
        assert math.isclose(fn(t.clone(), t, **kw).item(), 0.0, abs_tol=1e-5)


def test_specs_and_bad_inputs():
    assert not LOSSES.get("similarity_kd").separable and LOSSES.get("embedding_mse").separable
    assert not any(LOSSES.get(n).sparse_ok for n in ("embedding_mse", "embedding_cosine", "similarity_kd"))
    with pytest.raises(ShapeError, match="projection to the teacher's width"):
        embedding_mse(torch.randn(3, 4), torch.randn(3, 8))
    with pytest.raises(ConfigError, match="chunked: false"):
        chunked_distillation_loss(torch.randn(4, 3), torch.randn(5, 3), torch.randn(4, 5), loss="similarity_kd")
    with pytest.raises(ConfigError, match="temperature"):
        similarity_kd(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)
