"""ULD and the GOLD-style hybrid, against their definitions: hand computations, the Wasserstein-1
identity, invariance to vocabulary permutations, limits (same vocabulary -> forward KL, nothing
shared -> ULD), span merging, masks, reductions and autograd."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses import LOSSES, SparseTeacher, forward_kl
from kdforge.losses.uld import CrossVocabTeacher, gold, uld


def _logits(p: list[float]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


def test_uld_hand_computed_with_different_vocabulary_sizes():
    p = _logits([0.7, 0.2, 0.1])              # teacher, 3 tokens
    q = _logits([0.1, 0.5, 0.15, 0.25])       # student, 4 tokens: sorted 0.5, 0.25, 0.15, 0.1
    expected = abs(0.7 - 0.5) + abs(0.2 - 0.25) + abs(0.1 - 0.15) + abs(0.0 - 0.1)
    assert uld(q[None], p[None]).item() == pytest.approx(expected, abs=1e-12)


def test_uld_is_the_scaled_wasserstein_distance_of_the_probability_values():
    from scipy.stats import wasserstein_distance

    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    values = uld(zs, zt, reduction="none")
    for i in range(5):
        p, q = zt[i].softmax(-1).numpy(), zs[i].softmax(-1).numpy()
        assert values[i].item() == pytest.approx(12 * wasserstein_distance(p, q), rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), vs=st.integers(2, 9), vt=st.integers(2, 9), t=st.sampled_from([0.5, 1.0, 2.0]))
def test_uld_and_gold_are_invariant_to_vocabulary_permutations(seed, vs, vt, t):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(2, 3, vs, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 3, vt, generator=g, dtype=torch.float64)
    ps, pt = torch.randperm(vs, generator=g), torch.randperm(vt, generator=g)
    base = uld(zs, zt, temperature=t)
    assert uld(zs[..., ps], zt[..., pt], temperature=t).item() == pytest.approx(base.item(), abs=1e-12)
    # gold: permuting a vocabulary while carrying the shared-id map along changes nothing either
    m = min(vs, vt) // 2
    s_ids, t_ids = torch.arange(m), torch.arange(m)
    before = gold(zs, CrossVocabTeacher(zt, shared_student_ids=s_ids, shared_teacher_ids=t_ids), temperature=t)
    inv_s, inv_t = torch.argsort(ps), torch.argsort(pt)
    after = gold(zs[..., ps], CrossVocabTeacher(zt[..., pt], shared_student_ids=inv_s[s_ids],
                                                 shared_teacher_ids=inv_t[t_ids]), temperature=t)
    assert after.item() == pytest.approx(before.item(), abs=1e-12)
    # gradients are permuted with the vocabulary
    (grad,) = torch.autograd.grad(base, zs)
    (grad_perm,) = torch.autograd.grad(uld(zs[..., ps], zt[..., pt], temperature=t), zs)
    assert torch.allclose(grad, grad_perm, atol=1e-12)


def test_uld_is_zero_for_a_permuted_copy_and_positive_otherwise():
    z = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    assert uld(z, z[:, [2, 0, 3, 1]]).item() == pytest.approx(0.0, abs=1e-7)
    assert uld(z, torch.zeros(1, 4)).item() > 0.1


def test_gold_with_everything_shared_is_forward_kl_and_with_nothing_shared_is_uld():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    ids = torch.arange(7)
    for t in (1.0, 2.0):
        full = gold(zs, CrossVocabTeacher(zt, shared_student_ids=ids, shared_teacher_ids=ids), temperature=t)
        assert full.item() == pytest.approx(forward_kl(zs, zt, temperature=t).item() / t**2, rel=1e-10)
    zt9 = torch.randn(4, 9, generator=g, dtype=torch.float64)
    none = torch.empty(0, dtype=torch.long)
    hybrid = gold(zs, CrossVocabTeacher(zt9, shared_student_ids=none, shared_teacher_ids=none))
    assert hybrid.item() == pytest.approx(uld(zs, zt9).item(), rel=1e-10)


def test_gold_hand_computed_partial_overlap():
    # teacher tokens (a, b, x), student tokens (b, a, y, z); shared by string: a, b
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)
    t = CrossVocabTeacher(p.log()[None], shared_student_ids=torch.tensor([1, 0]), shared_teacher_ids=torch.tensor([0, 1]))
    kl = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.5)
    rest = abs(0.2 - 0.3) + abs(0.0 - 0.2)
    value = gold(q.log()[None], t, shared_weight=2.0, rest_weight=0.5)
    assert value.item() == pytest.approx(2.0 * kl + 0.5 * rest, abs=1e-12)


def test_merge_folds_the_actual_later_tokens_into_the_group_start():
    # student positions 0 and 1 form one group (position 1 folds into 0), position 2 stands alone
    zs = torch.randn(1, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    zt = torch.randn(1, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    nxt = torch.tensor([[4, 2, 1]])
    t_scale = torch.tensor([[-0.7, 0.0, 0.0]], dtype=torch.float64)
    cross = CrossVocabTeacher(zt, mask=torch.tensor([[True, False, True]]), log_scale=t_scale,
                              student_merge=torch.tensor([[-1, 0, -1]]), student_next=nxt)
    values = uld(zs, cross, reduction="none")
    q0 = zs[0, 0].softmax(-1) * zs[0, 1].softmax(-1)[2]   # chain rule: first distribution x p(actual later token)
    p0 = zt[0, 0].softmax(-1) * math.exp(-0.7)
    expected0 = (torch.nn.functional.pad(p0.sort(descending=True).values, (0, 0))
                 - torch.nn.functional.pad(q0.sort(descending=True).values, (0, 1))).abs().sum()
    assert values[0, 0].item() == pytest.approx(expected0.item(), abs=1e-12)
    assert values[0, 1].item() == 0.0  # not compared
    assert values[0, 2].item() == pytest.approx(uld(zs[0, 2:], zt[0, 2:]).item(), abs=1e-12)
    assert uld(zs, cross).item() == pytest.approx((values[0, 0] + values[0, 2]).item() / 2, abs=1e-12)


def test_masked_positions_do_not_matter_even_when_nan():
    zs = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 4, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    nan_s = zs.detach().clone().masked_fill(~mask[..., None], float("nan")).requires_grad_(True)
    nan_t = zt.masked_fill(~mask[..., None], float("nan"))
    a = uld(zs, zt, mask=mask, reduction="sum")
    b = uld(nan_s, nan_t, mask=mask, reduction="sum")
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    b.backward()
    assert torch.isfinite(nan_s.grad).all() and (nan_s.grad[~mask] == 0).all()
    assert uld(zs, zt, mask=torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_gradcheck():
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    zt = torch.randn(2, 3, 6, dtype=torch.float64, generator=g)
    cross = CrossVocabTeacher(zt, student_merge=torch.tensor([[-1, 0, -1], [-1, -1, 1]]),
                              student_next=torch.tensor([[0, 1, 2], [3, 4, 0]]),
                              shared_student_ids=torch.tensor([0, 3]), shared_teacher_ids=torch.tensor([5, 1]))
    assert torch.autograd.gradcheck(lambda z: uld(z, cross), (zs,))
    assert torch.autograd.gradcheck(lambda z: gold(z, cross), (zs,))


def test_sparse_teacher_is_completed_before_sorting():
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(3, 10, generator=g, dtype=torch.float64)
    sparse = SparseTeacher.from_logits(zt, 4)
    assert uld(zs, sparse).item() == pytest.approx(uld(zs.float(), sparse.to_dense_logprobs()).item(), rel=1e-6)
    top = torch.log_softmax(sparse.to_dense_logprobs(fill=float("-inf")), -1)
    assert uld(zs, sparse, sparse_policy="renormalize").item() == pytest.approx(uld(zs.float(), top).item(), rel=1e-6)
    assert uld(zs, SparseTeacher.from_logits(zt, 10)).item() == pytest.approx(uld(zs, zt).item(), rel=1e-5)


def test_nan_is_reported_naming_the_side():
    from kdforge.errors import NonFiniteError

    z = torch.randn(2, 4)
    z[0, 0] = float("nan")
    assert torch.isnan(uld(z, torch.randn(2, 6), check_finite=False))
    with pytest.raises(NonFiniteError, match="student"):
        uld(z, torch.randn(2, 6))


def test_registered_and_errors_name_the_fix():
    assert getattr(LOSSES.get("uld"), "fn", LOSSES.get("uld")) is uld
    assert getattr(LOSSES.get("gold"), "fn", LOSSES.get("gold")) is gold
    z = torch.randn(2, 4)
    with pytest.raises(ConfigError, match="sampled"):
        uld(z, SparseTeacher(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), 4, num_exact=0))
    with pytest.raises(ConfigError, match="CrossTokenizerTeacher"):
        gold(z, torch.randn(2, 6))
    same = torch.randn(2, 4)  # one vocabulary: gold is the forward KL
    assert gold(z, same).item() == pytest.approx(forward_kl(z, same).item(), rel=1e-5)
    with pytest.raises(ShapeError, match="positions"):
        uld(z, torch.randn(3, 6))
    with pytest.raises(ConfigError, match="shared_weight"):
        gold(z, CrossVocabTeacher(torch.randn(2, 6), shared_student_ids=torch.arange(1),
                                  shared_teacher_ids=torch.arange(1)), shared_weight=-1.0)


def test_gold_is_finite_when_the_student_vocabulary_is_a_subset_of_the_teachers():
    # every student token is shared: the student has no rest bucket, so only the shared tokens
    # are compared exactly (generalised KL) and the teacher's extra mass sits in the ULD part
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # teacher (a, b, x)
    q = torch.tensor([0.4, 0.6], dtype=torch.float64)  # student (b, a)
    t = CrossVocabTeacher(p.log()[None], shared_student_ids=torch.tensor([1, 0]), shared_teacher_ids=torch.tensor([0, 1]))
    gkl = 0.5 * math.log(0.5 / 0.6) - 0.5 + 0.6 + 0.3 * math.log(0.3 / 0.4) - 0.3 + 0.4
    zq = q.log()[None].requires_grad_(True)
    value = gold(zq, t)
    assert value.item() == pytest.approx(gkl + 0.2, abs=1e-12)
    value.backward()
    assert torch.isfinite(zq.grad).all()


def _padded_sort_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The definition: both sorted decreasingly in full, the shorter zero-padded."""
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p.sort(dim=-1, descending=True).values, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q.sort(dim=-1, descending=True).values, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vp=st.integers(0, 40), vq=st.integers(0, 40))
def test_the_partial_selection_equals_the_full_padded_sort_in_value_and_gradient(seed, vp, vq):
    from kdforge.losses.uld import _sorted_l1

    g = torch.Generator().manual_seed(seed)
    p = torch.rand(3, vp, generator=g, dtype=torch.float64).requires_grad_(True)
    q = torch.rand(3, vq, generator=g, dtype=torch.float64).requires_grad_(True)
    got, ref = _sorted_l1(p, q), _padded_sort_l1(p, q)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if vp + vq:
        w = torch.rand(3, generator=g, dtype=torch.float64)
        g_got = torch.autograd.grad((got * w).sum(), (p, q), allow_unused=True)
        g_ref = torch.autograd.grad((ref * w).sum(), (p, q), allow_unused=True)
        for a, b in zip(g_got, g_ref, strict=True):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_a_student_wider_than_the_teacher():
    g = torch.Generator().manual_seed(6)
    zs = torch.randn(2, 3, 9, dtype=torch.float64, generator=g, requires_grad=True)
    zt = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    cross = CrossVocabTeacher(zt, shared_student_ids=torch.tensor([0, 3]), shared_teacher_ids=torch.tensor([2, 1]))
    assert torch.autograd.gradcheck(lambda z: uld(z, zt), (zs,))
    assert torch.autograd.gradcheck(lambda z: gold(z, cross), (zs,))
