"""``value_checks(False)``: the losses read no tensor value back to the host, give the same results,
and with checks on (the default, and the trainer's first batch of a layout) still raise their errors."""

from __future__ import annotations

import pytest
import torch
from tests.losses._host_reads import counted_host_reads

from kdforge.errors import NonFiniteError, ShapeError
from kdforge.losses import (
    LOSSES,
    SparseTeacher,
    TeacherHead,
    chunked_distillation_loss,
    cross_entropy,
    forward_kl,
    value_checks,
    value_checks_enabled,
)


def _inputs(seed=0, n=6, v=11, k=4):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, n, v, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (2, n), generator=g)
    y[:, :2] = -100
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, -2:] = False
    sparse = SparseTeacher.from_logits(t, k)
    return s, t, sparse, y, mask


def _calls():
    """(name, call) for the plain losses: dense and sparse teachers, labels, every kind of check."""
    s, t, sparse, y, mask = _inputs()
    calls = [
        ("forward_kl dense", lambda: forward_kl(s, t, mask=mask, reduction="sum")),
        ("cross_entropy", lambda: cross_entropy(s, None, labels=y, mask=mask, reduction="sum")),
        ("dkd", lambda: LOSSES.get("dkd")(s, t, labels=y, mask=mask, reduction="sum")),
    ]
    for name in ("forward_kl", "reverse_kl", "generalized_jsd", "tvd", "adaptive_kl", "taid", "skew_reverse_kl"):
        calls.append((f"{name} sparse", lambda name=name: LOSSES.get(name)(s, sparse, mask=mask, reduction="sum")))
    calls.append(("reverse_kl dense T=2", lambda: LOSSES.get("reverse_kl")(s, t, mask=mask, temperature=2.0,
                                                                          reduction="sum")))
    return s, calls


def _chunked_calls():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(14, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(14, 13, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 13, (14,), generator=g)
    y[::3] = -100
    m = torch.ones(14, dtype=torch.bool)
    m[4:6] = False
    head = TeacherHead(torch.randn(14, 5, generator=g, dtype=torch.float64),
                       torch.randn(13, 5, generator=g, dtype=torch.float64))
    sparse = SparseTeacher.from_logits(t, 4)
    kw = {"labels": y, "mask": m, "chunk_size": 4}
    calls = [
        ("closed form + CE", lambda: chunked_distillation_loss(h, w, t, ce_weight=0.3, **kw)),
        ("closed form T=2 + CE", lambda: chunked_distillation_loss(h, w, head, loss="generalized_jsd", ce_weight=0.3,
                                                                   temperature=2.0, **kw)),
        ("CE only", lambda: chunked_distillation_loss(h, w, None, kd_weight=0.0, ce_weight=1.0, **kw)),
        ("autograd, sparse + CE", lambda: chunked_distillation_loss(h, w, sparse, ce_weight=0.3, **kw)),
        ("autograd, dkd", lambda: chunked_distillation_loss(h, w, t, loss="dkd", **kw)),
    ]
    return (h, w), calls


def _value_and_grads(call, leaves):
    out = call()
    value = out["loss"] if isinstance(out, dict) else out
    return value.detach(), torch.autograd.grad(value, leaves)


@pytest.mark.parametrize("which", ["plain", "chunked"])
def test_without_value_checks_no_tensor_value_is_read_back(which):
    leaves, calls = _calls() if which == "plain" else _chunked_calls()
    leaves = leaves if isinstance(leaves, tuple) else (leaves,)
    for name, call in calls:
        with counted_host_reads() as on:
            call()
        with value_checks(False), counted_host_reads() as off:
            value, _ = _value_and_grads(call, leaves)
        assert sum(on.values()) > 0, f"{name}: the counter sees the default checks"
        assert sum(off.values()) == 0, f"{name}: host reads with value checks off: {dict(off)}"


@pytest.mark.parametrize("which", ["plain", "chunked"])
def test_without_value_checks_values_and_gradients_are_unchanged(which):
    leaves, calls = _calls() if which == "plain" else _chunked_calls()
    leaves = leaves if isinstance(leaves, tuple) else (leaves,)
    for name, call in calls:
        ref_value, ref_grads = _value_and_grads(call, leaves)
        with value_checks(False):
            value, grads = _value_and_grads(call, leaves)
        if which == "plain":  # the -inf-safe kernels compute the same numbers: bit-exact
            assert torch.equal(value, ref_value), name
            assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)), name
        else:  # the CE sum runs over all rows of a chunk, masked: the same terms, another summation order
            torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12, msg=name)
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_value_checks_are_on_by_default_and_restored_after_the_block():
    assert value_checks_enabled()
    with value_checks(False):
        assert not value_checks_enabled()
        with value_checks(True):
            assert value_checks_enabled()
        assert not value_checks_enabled()
    assert value_checks_enabled()
    with pytest.raises(RuntimeError), value_checks(False):
        raise RuntimeError("inside")
    assert value_checks_enabled()


def test_direct_calls_keep_their_clear_errors():
    s, t, sparse, y, mask = _inputs()
    bad_ids = SparseTeacher(sparse.ids.clone().fill_(99), sparse.logprobs, sparse.vocab_size)
    with pytest.raises(ShapeError, match="sparse teacher ids outside"):
        forward_kl(s, bad_ids)
    with pytest.raises(ShapeError, match="labels outside"):
        cross_entropy(s, None, labels=torch.full_like(y, 50))
    with pytest.raises(NonFiniteError, match="student logits contain NaN"):
        forward_kl(torch.full_like(s, float("nan")), t)
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g)
    with pytest.raises(ShapeError, match="labels outside"):
        chunked_distillation_loss(h, w, None, kd_weight=0.0, ce_weight=1.0, labels=torch.full((5,), 9))
    with value_checks(False):  # off, the NaN is returned (the trainer checks once per step)
        assert torch.isnan(forward_kl(torch.full_like(s, float("nan")), t))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_reads_nothing_back_without_value_checks(name):
    """A loss added later inherits the switch through distill / check_teacher / value_checks_enabled."""
    s, t, _, y, mask = _inputs(seed=2)
    spec = LOSSES.get(name)
    teacher = t if spec.needs_teacher else None
    reference = spec(s, teacher, labels=y, mask=mask, reduction="sum")
    with value_checks(False), counted_host_reads() as off:
        value = spec(s, teacher, labels=y, mask=mask, reduction="sum")
    assert sum(off.values()) == 0, f"{name}: host reads with value checks off: {dict(off)}"
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
