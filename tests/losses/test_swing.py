"""Swing distillation (Li et al. 2022): per-position temperature from privacy, noisy soft targets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError
from kdforge.losses import LOSSES, forward_kl, swing_kd
from kdforge.losses.swing import pii_char_flags, pii_token_ids, swing_temperatures


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.5, 4.0))
def test_no_private_positions_and_no_noise_is_plain_kd(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, 4, 11, generator=g), torch.randn(3, 4, 11, generator=g)
    labels = torch.randint(0, 11, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.2
    got = swing_kd(s, t, temperature=temperature, mask=mask, labels=labels, private_ids=[], reduction="none")
    assert torch.allclose(got, forward_kl(s, t, temperature=temperature, mask=mask, reduction="none"), atol=1e-5)
    zero = swing_kd(s, t, temperature=temperature, privacy=torch.zeros(3, 4), private_temperature=9.0)
    assert torch.allclose(zero, forward_kl(s, t, temperature=temperature), atol=1e-5)


def test_private_positions_use_the_private_temperature_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    labels = torch.tensor([3, 1])  # position 0's target id 3 is private
    got = swing_kd(s, t, labels=labels, private_ids=[3], temperature=1.0, private_temperature=4.0,
                   reduction="none")
    assert torch.allclose(got[0], forward_kl(s[:1], t[:1], temperature=4.0, reduction="none")[0], atol=1e-6)
    assert torch.allclose(got[1], forward_kl(s[1:], t[1:], temperature=1.0, reduction="none")[0], atol=1e-6)
    half = swing_kd(s, t, privacy=torch.tensor([0.5, 0.0]), temperature=1.0, private_temperature=5.0,
                    reduction="none")
    assert torch.allclose(half[0], forward_kl(s[:1], t[:1], temperature=3.0, reduction="none")[0], atol=1e-6)
    assert swing_temperatures(torch.tensor([0.0, 0.25, 1.0]), 2.0, 10.0).tolist() == [2.0, 4.0, 10.0]


def test_private_positions_get_a_flatter_target():
    t = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    s = t.clone().requires_grad_(True)
    # the student matching the sharp teacher is pushed toward flatter at a private position
    swing_kd(s, t, privacy=torch.ones(1), temperature=1.0, private_temperature=8.0, noise=0.0).backward()
    assert s.grad[0, 0] == 0.0 or abs(float(s.grad[0, 0])) < 1e-6  # same T on both sides: s = t is optimal
    p_private = torch.softmax(t / 8.0, -1)
    assert p_private[0, 0] < torch.softmax(t, -1)[0, 0]


def test_noise_is_seeded_and_only_on_private_positions_when_asked():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    privacy = torch.tensor([1.0, 0.0, 1.0, 0.0])
    a = swing_kd(s, t, privacy=privacy, noise=0.5, seed=7, noise_private_only=True, reduction="none")
    b = swing_kd(s, t, privacy=privacy, noise=0.5, seed=7, noise_private_only=True, reduction="none")
    clean = swing_kd(s, t, privacy=privacy, noise=0.0, reduction="none")
    assert torch.equal(a, b)
    assert torch.allclose(a[1::2], clean[1::2]) and not torch.allclose(a[0::2], clean[0::2])
    assert not torch.allclose(swing_kd(s, t, noise=0.5, seed=7), swing_kd(s, t))


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    privacy = torch.tensor([0.0, 0.5, 1.0])
    assert torch.autograd.gradcheck(lambda x: swing_kd(x, t, privacy=privacy, noise=0.3, seed=3), (s,))


def test_pii_detector():
    text = "call 555-123-4567 or mail jo.doe@ex.com, room 12."
    flags = pii_char_flags(text)
    marked = "".join(c for c, f in zip(text, flags) if f)
    assert "555-123-4567" in marked and "jo.doe@ex.com" in marked and "12" in marked
    assert not any(flags[: len("call ")])
    assert pii_token_ids(["a", "7", "b", "x9"]) == [1, 3]
    assert pii_token_ids({"a": 0, "12": 5}) == [5]
    assert LOSSES.get("swing_kd").fn is swing_kd


def test_errors_name_the_fix():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ConfigError, match="labels"):
        swing_kd(s, t, private_ids=[1])
    with pytest.raises(ConfigError, match="noise"):
        swing_kd(s, t, noise=-1.0)
