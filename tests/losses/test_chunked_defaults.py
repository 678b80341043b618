"""chunked_distillation_loss's defaults: ``chunk_size="auto"`` (its rule, equal to explicit sizes,
equal to the unchunked loss) and a backward that scales the stored gradients in place."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdforge.losses.chunked as chunked_mod
from kdforge.errors import ConfigError
from kdforge.losses import LOSSES, auto_chunk_size, chunked_distillation_loss, cross_entropy

KERNEL_LOSSES = [n for n in LOSSES.names() if LOSSES.get(n).kernel is not None]


def _inputs(n=23, h=6, v=31, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.5).requires_grad_()
    teacher = torch.randn(n, v, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    mask = torch.rand(n, generator=g) > 0.2
    return hidden, weight, teacher, labels, mask


def test_the_auto_rule_fits_the_working_set_budget_per_device():
    mib = 1 << 20
    assert auto_chunk_size(32768, 10**6, "cpu", closed_form=True) == 256   # 192 MiB / (6 * 4 B * V)
    assert auto_chunk_size(32768, 10**6, "cpu") == 128                      # 12 arrays on the autograd path
    # The floor: 256 rows on the closed forms, 128 on the autograd path (the same bytes). It was 64
    # rows; at V = 131072 on CPU the LM-head matmuls of 64-row chunks cost 12-17% more CPU time than
    # 256 rows, which still hold under half of Liger-Kernel's peak (docs/benchmarks.md, loss_memory).
    assert auto_chunk_size(131072, 10**6, "cpu", closed_form=True) == 256  # the floor (budget: 64)
    assert auto_chunk_size(131072, 10**6, "cpu") == 128                    # the autograd floor (budget: 32)
    assert auto_chunk_size(49152, 10**6, "cpu", closed_form=True) == 256   # the floor (budget: 168)
    assert auto_chunk_size(131072, 10**6, "cuda", closed_form=True) == 256  # 768 MiB on an accelerator
    assert auto_chunk_size(131072, 10**6, torch.device("cuda:1")) == 128
    assert auto_chunk_size(16384, 10**6, "cpu", closed_form=True) == 512   # small vocabularies: the budget
    assert auto_chunk_size(32768, 100, "cpu", closed_form=True) == 100     # never more than the positions
    for v in (1000, 32768, 49152, 151936):
        for closed, arrays, floor in ((True, 6, 256), (False, 12, 128)):
            rows = auto_chunk_size(v, 10**6, "cpu", closed_form=closed)
            assert rows % 8 == 0 and rows >= floor
            assert rows == floor or rows * arrays * 4 * v <= 192 * mib < (rows + 8) * arrays * 4 * v


@pytest.mark.parametrize("loss", ["forward_kl", "generalized_jsd", "adaptive_kl"])  # closed form / autograd
def test_auto_is_the_default_and_equals_explicit_chunk_sizes(loss, monkeypatch):
    monkeypatch.setattr(chunked_mod, "AUTO_WORKING_SET_BYTES", {"cpu": 24 * 17 * 40, "accelerator": 0})
    monkeypatch.setattr(chunked_mod, "AUTO_MIN_ROWS", 8)  # V = 17: ~40 rows, so "auto" cuts 300 rows
    kw = {"loss": loss, "ce_weight": 0.4}

    def run(**size):
        hidden, weight, teacher, labels, mask = _inputs(n=300, v=17)
        out = chunked_distillation_loss(hidden, weight, teacher, labels=labels, mask=mask, **kw, **size)
        return (out["loss"].detach(), *torch.autograd.grad(out["loss"], [hidden, weight]))

    rows = auto_chunk_size(17, 300, "cpu", closed_form=LOSSES.get(loss).kernel is not None)
    assert 8 <= rows < 100  # several chunks
    default = run()
    assert all(torch.equal(a, b) for a, b in zip(default, run(chunk_size=rows)))
    for size in (1, 7, 1024):
        for a, b in zip(default, run(chunk_size=size)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(2, 23), loss=st.sampled_from([*KERNEL_LOSSES, "adaptive_kl", "dkd"]),
       ce_weight=st.sampled_from([0.0, 0.5]), temperature=st.sampled_from([1.0, 2.0]), seed=st.integers(0, 999))
def test_property_the_default_auto_chunking_equals_the_unchunked_loss(n, v, loss, ce_weight, temperature, seed):
    """With a small budget "auto" cuts these tiny inputs into many chunks (as it does real ones)."""
    hidden, weight, teacher, labels, mask = _inputs(n=n, v=v, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunked_mod, "AUTO_WORKING_SET_BYTES", {"cpu": 6 * 4 * v * 8, "accelerator": 0})
        mp.setattr(chunked_mod, "AUTO_MIN_ROWS", 3)
        out = chunked_distillation_loss(hidden, weight, teacher, loss=loss, labels=labels, mask=mask,
                                        ce_weight=ce_weight, temperature=temperature)
    logits = hidden @ weight.T
    ref = LOSSES.get(loss)(logits, teacher, labels=labels, mask=mask, temperature=temperature, reduction="sum")
    if ce_weight:
        ref = ref + ce_weight * cross_entropy(logits, labels=labels, mask=mask, reduction="sum")
    torch.testing.assert_close(out["loss"], ref)
    if ref.requires_grad:
        for a, b in zip(torch.autograd.grad(out["loss"], [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
            torch.testing.assert_close(a, b)


def _large_allocations(fn, threshold):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= threshold]


def test_backward_scales_in_place_without_a_second_weight_gradient():
    v, h = 4099, 37
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(16, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    teacher = torch.randn(16, v, generator=g)
    out = chunked_distillation_loss(hidden, weight, teacher, chunk_size=8)
    assert _large_allocations(lambda: (out["loss"] * 3.0).backward(), v * h * 4) == []  # no [V, H] buffer
    ref = LOSSES.get("forward_kl")(hidden @ weight.T, teacher, reduction="sum") * 3.0
    g_h, g_w = torch.autograd.grad(ref, [hidden, weight])
    torch.testing.assert_close(hidden.grad, g_h)
    torch.testing.assert_close(weight.grad, g_w)
    # an incoming gradient of 1 and an accumulated .grad: the sum, still right
    again = chunked_distillation_loss(hidden, weight, teacher, chunk_size=8)
    again["loss"].backward()
    torch.testing.assert_close(weight.grad, g_w * (4.0 / 3.0))


def test_a_retained_graph_gives_the_same_gradients_again_and_a_freed_one_refuses():
    hidden, weight, teacher, labels, mask = _inputs()
    out = chunked_distillation_loss(hidden, weight, teacher, labels=labels, mask=mask, ce_weight=0.5)
    first = torch.autograd.grad(out["loss"] * 2.0, [hidden, weight], retain_graph=True)
    second = torch.autograd.grad(out["loss"] * 2.0, [hidden, weight], retain_graph=True)
    third = torch.autograd.grad(out["loss"] * 2.0, [hidden, weight])  # frees: scaled in place
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ConfigError, match="retain_graph=True"):
        out["loss"].backward()
