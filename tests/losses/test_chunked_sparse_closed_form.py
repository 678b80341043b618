"""The chunked loss's closed form for a sparse (top-k) teacher: autograd only on the ``k + 1``
buckets, the vocabulary-sized gradient in closed form. It must equal the registered loss on the
full logits (the dense reference) in value and gradient, for every policy it covers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdforge.losses.chunked as chunked_mod
from kdforge.errors import NonFiniteError, ShapeError
from kdforge.losses import LOSSES, chunked_distillation_loss, cross_entropy
from kdforge.losses.signal import SparseTeacher, sample_tail

KERNEL_LOSSES = [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}), ("tvd", {}),
                 ("skew_forward_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.3})]
N, H, V, K = 23, 6, 41, 5


def _inputs(seed=0, n=N, v=V, k=K, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_()
    t = SparseTeacher.from_logits(torch.randn(n, v, generator=g, dtype=dtype) * 2, k)
    ids, lp = t.ids.clone(), t.logprobs.clone()
    if k >= 3:  # padding (never a whole row: renormalize has no distribution left there)
        ids[3, -1], lp[3, -1] = ids[3, 0], float("-inf")  # a padding entry repeating a real id
        ids[5, -2:], lp[5, -2:] = 7 % v, float("-inf")  # padding on an id that may lie in the tail
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    mask = torch.rand(n, generator=g) > 0.2
    return h, w, b, SparseTeacher(ids, lp, v), labels, mask


def _dense_reference(h, w, b, teacher, name, params, labels, mask, kd_weight, ce_weight, temperature, policy):
    logits = torch.nn.functional.linear(h, w, b)
    total = kd_weight * LOSSES.get(name)(logits, teacher, mask=mask, labels=labels, temperature=temperature,
                                         reduction="sum", sparse_policy=policy, **params)
    if ce_weight:
        total = total + ce_weight * cross_entropy(logits, labels=labels, mask=mask, reduction="sum")
    return total


def _spy(monkeypatch):
    calls = []
    real = chunked_mod._sparse_closed_form_chunk
    monkeypatch.setattr(chunked_mod, "_sparse_closed_form_chunk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _check(h, w, b, teacher, name, params, labels, mask, ce_weight, temperature, policy, chunk_size=7):
    ref = _dense_reference(h, w, b, teacher, name, params, labels, mask, 0.7, ce_weight, temperature, policy)
    ref_g = torch.autograd.grad(ref, (h, w, b))
    out = chunked_distillation_loss(h, w, teacher, loss=name, labels=labels, mask=mask, kd_weight=0.7,
                                    ce_weight=ce_weight, temperature=temperature, chunk_size=chunk_size,
                                    lm_head_bias=b, sparse_policy=policy, **params)
    got_g = torch.autograd.grad(out["loss"], (h, w, b))
    torch.testing.assert_close(out["loss"], ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(got_g, ref_g):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


CASES = [(pol, ce, temp) for pol in ("tail_bucket", "renormalize", "student_full")
         for ce, temp in ((0.0, 1.0), (0.4, 1.0), (0.0, 2.0)) if temp == 1.0 or pol == "renormalize"]


@pytest.mark.parametrize(("name", "params"), KERNEL_LOSSES, ids=[c[0] for c in KERNEL_LOSSES])
@pytest.mark.parametrize(("policy", "ce_weight", "temperature"), CASES)
def test_sparse_closed_form_equals_the_dense_reference(monkeypatch, name, params, policy, ce_weight, temperature):
    h, w, b, teacher, labels, mask = _inputs()
    calls = _spy(monkeypatch)
    if name == "reverse_kl" and policy == "student_full":
        with pytest.raises(NonFiniteError):  # infinite under this policy, as on the full logits
            chunked_distillation_loss(h, w, teacher, loss=name, chunk_size=7, sparse_policy=policy, **params)
        return
    _check(h, w, b, teacher, name, params, labels, mask, ce_weight, temperature, policy)
    assert calls  # the closed form ran (not the autograd fallback)


def test_sampled_tail_teacher_uses_the_closed_form_and_matches(monkeypatch):
    h, w, b, _, labels, mask = _inputs(seed=3)
    g = torch.Generator().manual_seed(1)
    teacher, _ = sample_tail(torch.randn(1, N, V, generator=g, dtype=torch.float64) * 2, 4, 6, seeds=[5])
    teacher = teacher.flatten()
    calls = _spy(monkeypatch)
    _check(h, w, b, teacher, "forward_kl", {}, labels, mask, 0.3, 1.0, "tail_bucket")
    assert calls


def test_not_covered_cases_fall_back_to_autograd_and_still_match(monkeypatch):
    h, w, b, teacher, labels, mask = _inputs(seed=2)
    calls = _spy(monkeypatch)
    # T != 1 with the tail bucket: the tempered student is not a function of its T = 1 buckets
    _check(h, w, b, teacher, "forward_kl", {}, labels, mask, 0.0, 2.0, "tail_bucket")
    # a loss without a dense closed form
    _check(h, w, b, teacher, "adaptive_kl", {}, labels, mask, 0.0, 1.0, "tail_bucket")
    assert not calls
    chunked_distillation_loss(h, w, teacher, loss="forward_kl", chunk_size=7, closed_form=False)
    assert not calls


def test_sparse_ids_outside_the_vocabulary_raise_the_usual_error():
    h, w, b, teacher, *_ = _inputs()
    bad = SparseTeacher(teacher.ids.clone(), teacher.logprobs, V)
    bad.ids[0, 0] = V
    with pytest.raises(ShapeError, match="outside"):
        chunked_distillation_loss(h, w, bad, loss="forward_kl", chunk_size=7)


def test_float32_workspace_path_matches_a_float64_reference():
    h, w, b, teacher, labels, mask = _inputs(seed=4)
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (h, w, b))
    t32 = SparseTeacher(teacher.ids, teacher.logprobs.float(), V)
    ref = _dense_reference(h, w, b, teacher, "generalized_jsd", {"beta": 0.5}, labels, mask, 0.7, 0.5, 1.0,
                           "tail_bucket")
    ref_g = torch.autograd.grad(ref, (h, w, b))
    out = chunked_distillation_loss(h32, w32, t32, loss="generalized_jsd", beta=0.5, labels=labels, mask=mask,
                                    kd_weight=0.7, ce_weight=0.5, chunk_size=6, lm_head_bias=b32)
    out["loss"].backward()
    torch.testing.assert_close(out["loss"].double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip((h32.grad, w32.grad, b32.grad), ref_g):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 12), st.integers(3, 30), st.integers(1, 6), st.integers(1, 9),
       st.sampled_from(["tail_bucket", "renormalize", "student_full"]), st.integers(0, 10_000))
def test_property_chunked_sparse_equals_dense_for_any_shape(n, v, k, chunk, policy, seed):
    k = min(k, v - 1)
    h, w, b, teacher, labels, mask = _inputs(seed=seed, n=max(n, 6), v=v, k=k)
    _check(h, w, b, teacher, "generalized_jsd", {"beta": 0.4}, labels, mask, 0.5, 1.0, policy, chunk_size=chunk)
