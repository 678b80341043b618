"""DAC-KL: forward KL on the teacher's dense region (Liu et al. 2024)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError
from kdforge.losses import LOSSES, SparseTeacher, dac_kl, forward_kl
from kdforge.losses.dac_kl import (
    _sorted_region as accelerator_path,  # what a GPU runs (no host reads)
)
from kdforge.losses.dac_kl import dense_region


def test_region_is_the_fewest_top_classes_reaching_the_mass_plus_the_label():
    p = torch.tensor([[0.5, 0.05, 0.3, 0.1, 0.05]])
    region = dense_region(p.log(), mass=0.75)
    assert region.tolist() == [[True, False, True, False, False]]  # 0.5 + 0.3 >= 0.75
    region = dense_region(p.log(), mass=0.75, target=torch.tensor([4]))
    assert region.tolist() == [[True, False, True, False, True]]
    assert dense_region(p.log(), mass=0.99, max_k=2).sum() == 2
    assert dense_region(p.log(), mass=0.1).tolist() == [[True, False, False, False, False]]


def _bucket_kl(s, t, keep):
    p, q = t.softmax(-1)[0], s.softmax(-1)[0]
    rest = torch.ones(p.shape[0], dtype=torch.bool)
    rest[keep] = False
    p_, q_ = torch.cat([p[keep], p[rest].sum(0, keepdim=True)]), torch.cat([q[keep], q[rest].sum(0, keepdim=True)])
    return (p_ * (p_.log() - q_.log())).sum()


def test_value_is_the_hand_computed_clipped_kl():
    s = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    t = torch.tensor([[3.0, 2.5, -2.0, -2.0]])
    p = t.softmax(-1)
    assert p[0, 0] < 0.8 < p[0, 0] + p[0, 1]  # mass 0.8 keeps classes 0 and 1, the rest is one bucket
    assert torch.allclose(dac_kl(s, t, mass=0.8), _bucket_kl(s, t, torch.tensor([0, 1])), atol=1e-6)
    # with the label 3 the region is {0, 1, 3}
    assert torch.allclose(dac_kl(s, t, mass=0.8, labels=torch.tensor([3])), _bucket_kl(s, t, torch.tensor([0, 1, 3])),
                          atol=1e-6)
    assert LOSSES.get("dac_kl").fn is dac_kl


def test_a_confident_teacher_still_corrects_a_wrong_student():
    t = torch.tensor([[9.0, 0.0, 0.0]])  # region {0}
    wrong, right = torch.tensor([[0.0, 9.0, 0.0]]), torch.tensor([[9.0, 0.0, 0.0]])
    assert dac_kl(wrong, t, mass=0.9) > 1.0 and dac_kl(right, t, mass=0.9) < 1e-6


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.5, 4.0))
def test_full_mass_is_forward_kl(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(4, 3, 9, generator=g), torch.randn(4, 3, 9, generator=g)
    mask = torch.rand(4, 3, generator=g) > 0.3
    got = dac_kl(s, t, mass=1.0, mask=mask, temperature=temperature, reduction="none")
    ref = forward_kl(s, t, mask=mask, temperature=temperature, reduction="none")
    assert torch.allclose(got, ref, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), mass=st.floats(0.05, 1.0))
def test_nonnegative_and_zero_when_the_student_equals_the_teacher(seed, mass):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert (dac_kl(s, t, mass=mass, reduction="none") >= -1e-6).all()
    assert dac_kl(t, t, mass=mass) == pytest.approx(0.0, abs=1e-6)
    # a constant shift of the student's logits changes nothing; the tail's shape does not matter
    assert torch.allclose(dac_kl(s + 3.0, t, mass=mass), dac_kl(s, t, mass=mass), atol=1e-5)


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([1, -100, 4])
    assert torch.autograd.gradcheck(lambda x: dac_kl(x, t, mass=0.7, labels=y, temperature=2.0), (s,))


def test_errors_name_the_fix():
    s = torch.randn(2, 5)
    with pytest.raises(ConfigError, match="mass"):
        dac_kl(s, torch.randn(2, 5), mass=0.0)
    sparse = SparseTeacher(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), -0.7), 5)
    with pytest.raises(ConfigError, match="forward_kl"):
        dac_kl(s, sparse)


def _sorted_region(logp: torch.Tensor, mass: float, max_k: int | None = None) -> torch.Tensor:
    """The definition by a full sort: the fewest top classes reaching ``mass``, cut at ``max_k``."""
    probs, order = logp.exp().sort(dim=-1, descending=True)
    keep = (probs.cumsum(-1) - probs) < mass
    keep[..., 0] = True
    if max_k is not None:
        keep[..., max_k:] = False
    return torch.zeros_like(keep).scatter(-1, order, keep)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.sampled_from([3, 70, 600, 5000]),
       scale=st.sampled_from([0.1, 1.0, 4.0]), mass=st.sampled_from([0.5, 0.9, 0.999]),
       max_k=st.sampled_from([None, 1, 100, 700]))
def test_the_partial_selection_finds_the_sorted_region(seed, vocab, scale, mass, max_k):
    """Flat rows (scale 0.1: hundreds to thousands of classes) and peaked ones, in one batch."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, vocab, generator=g, dtype=torch.float64) * scale
    logits[:2] *= 20  # two peaked rows next to flat ones: rows leave the loop at different sizes
    logp = logits.log_softmax(-1)
    assert torch.equal(dense_region(logp, mass, max_k), _sorted_region(logp, mass, max_k))
    assert torch.equal(accelerator_path(logp, mass, max_k), _sorted_region(logp, mass, max_k))


def _clip(logd: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``[n, V + 1]``: the log-probabilities inside ``region`` (``-inf`` outside) and, last, the log
    of the mass outside it (``-inf`` when the region is everything)."""
    inside = logd.masked_fill(~region, float("-inf"))
    full = region.all(-1, keepdim=True)  # no tail: keep logsumexp off an all -inf row (NaN gradient)
    tail = torch.logsumexp(torch.where(full, 0.0, logd.masked_fill(region, float("-inf"))), -1, keepdim=True)
    return torch.cat([inside, torch.where(full, float("-inf"), tail)], -1)


def _autograd_clipped_kl(s, t, mass, temperature, labels):
    """The definition through autograd: both distributions clipped to the region (+ one bucket)."""
    from kdforge.losses._core import kl

    s, t = s / temperature, t / temperature
    region = dense_region(torch.log_softmax(t, -1), mass, None, labels)
    return kl(_clip(torch.log_softmax(t, -1), region), _clip(torch.log_softmax(s, -1), region)) * temperature**2


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), mass=st.floats(0.05, 1.0), temperature=st.sampled_from([1.0, 2.0]),
       vocab=st.sampled_from([2, 9, 300]))
def test_the_closed_form_equals_the_autograd_of_the_clipped_distributions(seed, mass, temperature, vocab):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(5, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    t = 3 * torch.randn(5, vocab, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (5,), generator=g)
    y[0] = -100
    got = dac_kl(s, t, mass=mass, temperature=temperature, labels=y, reduction="none")
    want = _autograd_clipped_kl(s, t, mass, temperature, torch.where(y == -100, -1, y))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * w).sum(), s)
    (g_want,) = torch.autograd.grad((want * w).sum(), s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
