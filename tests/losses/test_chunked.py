"""The chunked fused LM-head path equals the unchunked losses: values and gradients."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ConfigError, ShapeError, VocabMismatchError
from kdforge.losses import (
    LOSSES,
    SparseTeacher,
    TeacherHead,
    chunked_distillation_loss,
    cross_entropy,
)

N, H, HT, V = 29, 8, 12, 40
PARAMS = {"taid": {"t": 0.6}, "generalized_jsd": {"beta": 0.2}, "skew_forward_kl": {"alpha": 0.3}}


def make(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    th = TeacherHead(torch.randn(N, HT, generator=g, dtype=dtype), torch.randn(V, HT, generator=g, dtype=dtype) * 0.5)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    mask = torch.rand(N, generator=g) > 0.25
    return h, w, b, th, labels, mask


def reference(h, w, b, teacher, name, labels, mask, kd_weight, ce_weight, temperature, reduction, params):
    logits = torch.nn.functional.linear(h, w, b)
    total = logits.new_zeros(())
    if kd_weight:
        total = total + kd_weight * LOSSES.get(name)(logits, teacher, mask=mask, labels=labels,
                                                     temperature=temperature, reduction=reduction, **params)
    if ce_weight:
        total = total + ce_weight * cross_entropy(logits, labels=labels, mask=mask, reduction=reduction)
    return total


def teacher_of(kind: str, th: TeacherHead):
    dense = th.logits(slice(None))
    if kind == "dense":
        return dense
    if kind == "sparse":
        return SparseTeacher.from_logits(dense, 6)
    return th


@pytest.mark.parametrize(("name", "kind"), [
    (n, k) for n in LOSSES.names() if n not in ("cross_entropy", "jsd") and LOSSES.get(n).separable
    for k in ("dense", "sparse", "head") if LOSSES.get(n).sparse_ok or k != "sparse"  # dkd: a dense teacher only
])
def test_chunked_equals_unchunked_values_and_gradients(name, kind):
    h, w, b, th, labels, mask = make()
    teacher = teacher_of(kind, th)
    params = PARAMS.get(name, {})
    out = chunked_distillation_loss(h, w, teacher, loss=name, labels=labels, mask=mask, kd_weight=0.7,
                                    ce_weight=0.3, temperature=2.0, chunk_size=8, lm_head_bias=b, **params)
    ref = reference(h, w, b, teacher_of("dense", th) if kind == "head" else teacher, name, labels, mask,
                    0.7, 0.3, 2.0, "sum", params)
    torch.testing.assert_close(out["loss"], ref)
    got = torch.autograd.grad(out["loss"], [h, w, b])
    exp = torch.autograd.grad(ref, [h, w, b])
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e)


def test_kd_and_ce_parts_are_reported_detached_and_sum_to_the_loss():
    h, w, b, th, labels, mask = make()
    out = chunked_distillation_loss(h, w, th, labels=labels, mask=mask, kd_weight=2.0, ce_weight=0.5,
                                    chunk_size=5, lm_head_bias=b)
    assert not out["kd"].requires_grad and not out["ce"].requires_grad
    torch.testing.assert_close(out["loss"].detach(), 2.0 * out["kd"] + 0.5 * out["ce"])
    logits = torch.nn.functional.linear(h, w, b)
    torch.testing.assert_close(out["ce"], cross_entropy(logits, labels=labels, mask=mask, reduction="sum").detach())


def test_mean_reduction_divides_kd_by_real_positions_and_ce_by_labelled_ones():
    h, w, b, th, labels, mask = make()
    teacher = th.logits(slice(None))
    out = chunked_distillation_loss(h, w, teacher, loss="reverse_kl", labels=labels, mask=mask, ce_weight=1.0,
                                    reduction="mean", chunk_size=7, lm_head_bias=b)
    ref = reference(h, w, b, teacher, "reverse_kl", labels, mask, 1.0, 1.0, 1.0, "mean", {})
    torch.testing.assert_close(out["loss"], ref)
    torch.testing.assert_close(torch.autograd.grad(out["loss"], h)[0], torch.autograd.grad(ref, h)[0])


@pytest.mark.parametrize("chunk_size", [1, 4, N, 1000, "auto"])
def test_result_does_not_depend_on_chunk_size(chunk_size):
    h, w, b, th, labels, mask = make()
    out = chunked_distillation_loss(h, w, th, loss="generalized_jsd", mask=mask, chunk_size=chunk_size, beta=0.5)
    ref = reference(h, w, None, th.logits(slice(None)), "generalized_jsd", None, mask, 1.0, 0.0, 1.0, "sum",
                    {"beta": 0.5})
    torch.testing.assert_close(out["loss"], ref)


def test_accepts_batch_sequence_shaped_inputs():
    h, w, b, th, labels, mask = make()
    h3 = h.detach()[:28].reshape(4, 7, H).requires_grad_()
    t3 = th.logits(slice(None))[:28].reshape(4, 7, V)
    out = chunked_distillation_loss(h3, w, t3, mask=mask[:28].reshape(4, 7), chunk_size=5)
    ref = reference(h3, w, None, t3, "forward_kl", None, mask[:28].reshape(4, 7), 1.0, 0.0, 1.0, "sum", {})
    torch.testing.assert_close(out["loss"], ref)
    (g,) = torch.autograd.grad(out["loss"], h3)
    assert g.shape == (4, 7, H)


def test_fully_masked_batch_gives_zero_and_zero_grads():
    h, w, b, th, labels, mask = make()
    out = chunked_distillation_loss(h, w, th, labels=labels, mask=torch.zeros(N, dtype=torch.bool), ce_weight=1.0,
                                    reduction="mean", chunk_size=8)
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_no_grad_call_returns_values_without_graph():
    h, w, b, th, labels, mask = make()
    with torch.no_grad():
        out = chunked_distillation_loss(h, w, th, mask=mask, chunk_size=8)
    ref = reference(h, w, None, th.logits(slice(None)), "forward_kl", None, mask, 1.0, 0.0, 1.0, "sum", {})
    assert not out["loss"].requires_grad
    torch.testing.assert_close(out["loss"], ref.detach())


def test_frozen_head_gets_no_gradient_but_hidden_does():
    h, w, b, th, labels, mask = make(bias=False)
    w.requires_grad_(False)
    out = chunked_distillation_loss(h, w, th, chunk_size=8)
    out["loss"].backward()
    assert w.grad is None and h.grad is not None and torch.isfinite(h.grad).all()


def test_bf16_hidden_states_give_finite_results_close_to_float32():
    h, w, b, th, labels, mask = make(dtype=torch.float32)
    out32 = chunked_distillation_loss(h, w, th, mask=mask, chunk_size=8)
    hb = h.detach().bfloat16().requires_grad_()
    wb = w.detach().bfloat16().requires_grad_()
    thb = TeacherHead(th.hidden.bfloat16(), th.weight.bfloat16())
    outb = chunked_distillation_loss(hb, wb, thb, mask=mask, chunk_size=8)
    outb["loss"].backward()
    assert outb["loss"].dtype == torch.float32
    assert torch.isfinite(hb.grad.float()).all() and wb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(outb["loss"], out32["loss"].detach(), rtol=0.05, atol=0.05)


def test_bad_inputs_raise_clear_errors():
    h, w, b, th, labels, mask = make()
    with pytest.raises(VocabMismatchError, match="slice"):
        chunked_distillation_loss(h, w, torch.randn(N, V + 3))
    with pytest.raises(ShapeError, match="positions"):
        chunked_distillation_loss(h, w, torch.randn(N + 1, V))
    with pytest.raises(ShapeError):
        chunked_distillation_loss(h, torch.randn(V, H + 1), torch.randn(N, V))
    with pytest.raises(ConfigError, match="labels"):
        chunked_distillation_loss(h, w, th, ce_weight=1.0)
    with pytest.raises(ConfigError):
        chunked_distillation_loss(h, w, th, chunk_size=0)
    with pytest.raises(ConfigError):
        chunked_distillation_loss(h, w, th, loss="kl_forward")


def test_no_operation_ever_materialises_full_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    n, v, hid = 64, 256, 16
    h = torch.randn(n, hid, requires_grad=True)
    w = torch.randn(v, hid, requires_grad=True)
    th = TeacherHead(torch.randn(n, hid), torch.randn(v, hid))
    with LargestOutput():
        out = chunked_distillation_loss(h, w, th, loss="generalized_jsd", chunk_size=8, labels=torch.zeros(n).long(),
                                        ce_weight=1.0)
        out["loss"].backward()
    assert LargestOutput.largest <= max(8 * v, v * hid)  # one chunk of logits, or the head itself
    assert LargestOutput.largest < n * v


@pytest.mark.gpu
def test_chunked_on_cuda_bf16_matches_float32_unchunked():
    h, w, b, th, labels, mask = make(dtype=torch.float32)
    dev = torch.device("cuda")
    hb = h.detach().to(dev, torch.bfloat16).requires_grad_()
    wb = w.detach().to(dev, torch.bfloat16).requires_grad_()
    thb = TeacherHead(th.hidden.to(dev, torch.bfloat16), th.weight.to(dev, torch.bfloat16))
    out = chunked_distillation_loss(hb, wb, thb, labels=labels.to(dev), mask=mask.to(dev), ce_weight=1.0,
                                    chunk_size="auto")
    out["loss"].backward()
    ref = reference(h.double(), w.double(), None, th.logits(slice(None)).double(), "forward_kl", labels, mask,
                    1.0, 1.0, 1.0, "sum", {})
    assert torch.isfinite(hb.grad).all()
    torch.testing.assert_close(out["loss"].cpu().double(), ref.detach(), rtol=0.05, atol=0.5)


def test_cross_entropy_only_needs_no_teacher():
    h, w, b, th, labels, mask = make()
    out = chunked_distillation_loss(h, w, None, kd_weight=0.0, ce_weight=1.0, labels=labels, mask=mask, chunk_size=6)
    ref = cross_entropy(torch.nn.functional.linear(h, w), labels=labels, mask=mask, reduction="sum")
    torch.testing.assert_close(out["loss"], ref)
    assert out["kd"].item() == 0.0
