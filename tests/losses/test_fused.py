"""Closed-form divergence kernels (kdforge.losses.fused) equal autograd of the registered losses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import NonFiniteError, ShapeError
from kdforge.losses import (
    LOSSES,
    SparseTeacher,
    TeacherHead,
    chunked_distillation_loss,
    cross_entropy,
)
from kdforge.losses.fused import forward_kl_kernel, fused_kernel_for, reverse_kl_kernel

# every (loss, params) pair the closed forms cover, endpoints included
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.1}),
    ("generalized_jsd", {"beta": 0.9}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 1.0}),
    ("jsd", {}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("skew_reverse_kl", {"alpha": 0.0}),
]
IDS = [f"{n}-{p}" for n, p in CASES]
N, H, V = 23, 6, 37


def make(dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g, dtype=dtype) * scale).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_()
    teacher = torch.randn(N, V, generator=g, dtype=dtype) * 2.0 * scale
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    mask = torch.rand(N, generator=g) > 0.3
    return h, w, b, teacher, labels, mask


def reference(h, w, b, teacher, name, params, *, labels=None, mask=None, kd_weight=1.0, ce_weight=0.0,
              temperature=1.0):
    logits = torch.nn.functional.linear(h, w, b)
    total = kd_weight * LOSSES.get(name)(logits, teacher, mask=mask, labels=labels, temperature=temperature,
                                         reduction="sum", **params)
    if ce_weight:
        total = total + ce_weight * cross_entropy(logits, labels=labels, mask=mask, reduction="sum")
    return total


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_closed_form_chunked_loss_and_gradients_equal_autograd_of_the_unchunked_loss(name, params, temperature):
    h, w, b, teacher, labels, mask = make()
    assert fused_kernel_for(name, teacher, params) is not None
    out = chunked_distillation_loss(h, w, teacher, loss=name, labels=labels, mask=mask, kd_weight=0.8,
                                    ce_weight=0.3, temperature=temperature, chunk_size=6, lm_head_bias=b, **params)
    ref = reference(h, w, b, teacher, name, params, labels=labels, mask=mask, kd_weight=0.8, ce_weight=0.3,
                    temperature=temperature)
    torch.testing.assert_close(out["loss"], ref)
    for got, exp in zip(grads(out["loss"], [h, w, b]), grads(ref, [h, w, b])):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_closed_form_equals_the_autograd_chunk_path_without_ce_and_mask(name, params):
    h, w, b, teacher, labels, mask = make(seed=3)
    fast = chunked_distillation_loss(h, w, teacher, loss=name, chunk_size=5, temperature=1.5, **params)
    slow = chunked_distillation_loss(h, w, teacher, loss=name, chunk_size=5, temperature=1.5, closed_form=False,
                                     **params)
    torch.testing.assert_close(fast["loss"], slow["loss"])
    for got, exp in zip(grads(fast["loss"], [h, w]), grads(slow["loss"], [h, w])):
        torch.testing.assert_close(got, exp)


def test_kernels_return_the_divergence_and_its_gradient_wrt_the_tempered_student_logits():
    g = torch.Generator().manual_seed(5)
    for name, params in CASES:
        s = torch.randn(4, V, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randn(4, V, generator=g, dtype=torch.float64)
        kernel = fused_kernel_for(name, t, params)
        logq = torch.log_softmax(s.detach(), -1)
        out = kernel(logq.clone(), logq.exp(), t)
        ref = LOSSES.get(name)(s, t, reduction="none", **params)
        (ref_g,) = torch.autograd.grad(ref.sum(), s)
        torch.testing.assert_close(out.per_pos, ref.detach(), msg=name)
        torch.testing.assert_close(out.grad * out.scale, ref_g, msg=name)


def test_gradients_pass_torch_gradcheck():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 11, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (7,), generator=g)
    for name, params in CASES:
        if name == "tvd":  # |x| is not differentiable where p == q; the kink makes finite differences lie
            continue

        def fn(h, w, name=name, params=params):
            return chunked_distillation_loss(h, w, t, loss=name, labels=y, ce_weight=0.5, chunk_size=3,
                                             temperature=1.3, **params)["loss"]

        assert torch.autograd.gradcheck(fn, (h, w)), name


def test_ce_only_uses_the_closed_form_and_equals_cross_entropy():
    h, w, b, teacher, labels, mask = make()
    out = chunked_distillation_loss(h, w, None, kd_weight=0.0, ce_weight=1.0, labels=labels, mask=mask,
                                    chunk_size=4, lm_head_bias=b)
    ref = cross_entropy(torch.nn.functional.linear(h, w, b), labels=labels, mask=mask, reduction="sum")
    torch.testing.assert_close(out["loss"], ref)
    for got, exp in zip(grads(out["loss"], [h, w, b]), grads(ref, [h, w, b])):
        torch.testing.assert_close(got, exp)


def test_labels_outside_the_vocabulary_raise_shape_error():
    h, w, b, teacher, labels, mask = make()
    labels = labels.clone()
    labels[1] = V
    with pytest.raises(ShapeError, match="labels outside"):
        chunked_distillation_loss(h, w, teacher, labels=labels, ce_weight=1.0)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_extreme_logits_give_finite_values_and_gradients_matching_autograd(name, params):
    h, w, b, teacher, labels, mask = make(seed=2)
    with torch.no_grad():
        teacher = teacher.sign() * 1e4  # +-1e4 teacher logits
        w.mul_(1e3)  # student logits of order 1e3-1e4
    out = chunked_distillation_loss(h, w, teacher, loss=name, labels=labels, ce_weight=0.5, chunk_size=7, **params)
    gh, gw = grads(out["loss"], [h, w])
    assert torch.isfinite(out["loss"]) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    ref = reference(h, w, None, teacher, name, params, labels=labels, ce_weight=0.5)
    torch.testing.assert_close(out["loss"], ref)
    rh, rw = grads(ref, [h, w])
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_teacher_with_minus_inf_logits_falls_back_to_the_safe_path():
    h, w, b, teacher, labels, mask = make()
    teacher = teacher.clone()
    teacher[:, :5] = float("-inf")  # tokens the teacher can never emit
    for name, params in (("forward_kl", {}), ("generalized_jsd", {"beta": 0.5}), ("tvd", {})):
        out = chunked_distillation_loss(h, w, teacher, loss=name, mask=mask, chunk_size=6, **params)
        ref = reference(h, w, None, teacher, name, params, mask=mask)
        assert torch.isfinite(out["loss"])
        torch.testing.assert_close(out["loss"], ref)
        torch.testing.assert_close(grads(out["loss"], [h])[0], grads(ref, [h])[0])
    with pytest.raises(NonFiniteError):  # reverse KL is infinite there: the diagnosed error, as unchunked
        chunked_distillation_loss(h, w, teacher, loss="reverse_kl", chunk_size=6)


def test_bf16_inputs_are_computed_in_float32_and_match_the_float32_reference():
    h, w, b, teacher, labels, mask = make(dtype=torch.float32)
    hb = h.detach().bfloat16().requires_grad_()
    wb = w.detach().bfloat16().requires_grad_()
    out = chunked_distillation_loss(hb, wb, teacher.bfloat16(), loss="generalized_jsd", labels=labels, mask=mask,
                                    ce_weight=1.0, temperature=2.0, chunk_size=8, beta=0.5)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = reference(hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_(), None,
                    teacher.bfloat16().float(), "generalized_jsd", {"beta": 0.5}, labels=labels, mask=mask,
                    ce_weight=1.0, temperature=2.0)
    torch.testing.assert_close(out["loss"], ref.detach(), rtol=2e-2, atol=2e-2)


def test_teacher_head_uses_the_closed_form_and_matches_dense_logits():
    h, w, b, teacher, labels, mask = make()
    g = torch.Generator().manual_seed(9)
    head = TeacherHead(torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randn(V, 5, generator=g,
                                                                                        dtype=torch.float64))
    out = chunked_distillation_loss(h, w, head, loss="reverse_kl", mask=mask, chunk_size=4, temperature=2.0)
    ref = reference(h, w, None, head.logits(slice(None)), "reverse_kl", {}, mask=mask, temperature=2.0)
    torch.testing.assert_close(out["loss"], ref)
    torch.testing.assert_close(grads(out["loss"], [w])[0], grads(ref, [w])[0])


def test_dispatch_picks_closed_forms_only_where_they_are_exact():
    t = torch.zeros(2, 4)
    sparse = SparseTeacher.from_logits(t, 2)
    assert fused_kernel_for("generalized_jsd", t, {"beta": 0.0}) is forward_kl_kernel
    assert fused_kernel_for("generalized_jsd", t, {"beta": 1.0}) is reverse_kl_kernel
    assert fused_kernel_for(LOSSES.get("forward_kl"), t, {}) is forward_kl_kernel  # the callable itself
    assert fused_kernel_for("forward_kl", sparse, {}) is None  # sparse teacher: autograd path
    assert fused_kernel_for("adaptive_kl", t, {}) is None  # no closed form: autograd path
    assert fused_kernel_for("generalized_jsd", t, {"beta": 1.5}) is None  # invalid: autograd path raises
    assert fused_kernel_for("forward_kl", t, {"betta": 0.5}) is None
    assert fused_kernel_for("skew_forward_kl", t, {"alpha": 1.0}) is None


def test_closed_form_runs_less_than_half_the_vocabulary_sized_operations_of_autograd():
    from torch.utils._python_dispatch import TorchDispatchMode

    rows, v = 8, 512

    class CountFullSize(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # views move no data
                return out
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() == rows * v:
                    CountFullSize.count += 1
            return out

    h = torch.randn(rows, 16, requires_grad=True)
    w = torch.randn(v, 16, requires_grad=True)
    t = torch.randn(rows, v)
    counts = {}
    for closed in (True, False):
        CountFullSize.count = 0
        with CountFullSize():
            out = chunked_distillation_loss(h, w, t, loss="generalized_jsd", labels=torch.zeros(rows).long(),
                                            ce_weight=1.0, temperature=2.0, chunk_size=rows, closed_form=closed)
            out["loss"].backward()
        counts[closed] = CountFullSize.count
    assert counts[True] * 2 <= counts[False], counts


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 17),
    v=st.integers(2, 23),
    chunk=st.integers(1, 20),
    case=st.sampled_from(CASES),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    ce_weight=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 10_000),
)
def test_property_chunked_closed_form_equals_unchunked(n, v, chunk, case, temperature, ce_weight, seed):
    name, params = case
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = -100
    m = torch.rand(n, generator=g) < 0.8
    out = chunked_distillation_loss(h, w, t, loss=name, labels=y, mask=m, ce_weight=ce_weight, chunk_size=chunk,
                                    temperature=temperature, **params)
    ref = reference(h, w, None, t, name, params, labels=y, mask=m, ce_weight=ce_weight, temperature=temperature)
    torch.testing.assert_close(out["loss"], ref)
    for got, exp in zip(grads(out["loss"], [h, w]), grads(ref, [h, w])):
        torch.testing.assert_close(got, exp)


@pytest.mark.slow  # torch.compile of six closed forms: tens of seconds on a CPU
@pytest.mark.parametrize(("name", "params"), [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}),
                                              ("tvd", {}), ("skew_forward_kl", {"alpha": 0.2}),
                                              ("skew_reverse_kl", {"alpha": 0.3})])
def test_compiled_kernels_equal_the_eager_closed_forms(name, params):
    h, w, b, teacher, labels, mask = make(dtype=torch.float32)
    for chunk in (6, 9):  # two row counts: the compiled kernel is shape-dynamic
        out = chunked_distillation_loss(h, w, teacher, loss=name, labels=labels, mask=mask, ce_weight=0.5,
                                        chunk_size=chunk, compile_kernels=True, **params)
        ref = chunked_distillation_loss(h, w, teacher, loss=name, labels=labels, mask=mask, ce_weight=0.5,
                                        chunk_size=chunk, compile_kernels=False, **params)
        torch.testing.assert_close(out["loss"], ref["loss"])
        for got, exp in zip(grads(out["loss"], [h, w]), grads(ref["loss"], [h, w])):
            torch.testing.assert_close(got, exp)
