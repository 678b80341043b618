"""The chunked loss's CPU workspace (reused float32 buffers, in-place log-softmax) and the
``compile_kernels="auto"`` default with its eager fallback: both leave the results unchanged."""

from __future__ import annotations

import logging

import pytest
import torch

import kdforge.losses.chunked as chunked_mod
import kdforge.losses.closed_form as cf
from kdforge.errors import ConfigError
from kdforge.losses import LOSSES, TeacherHead, chunked_distillation_loss, cross_entropy
from kdforge.losses.divergences import fkl_closed_form, rkl_closed_form

N, H, HT, V = 29, 8, 5, 53
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}), ("tvd", {}),
         ("skew_forward_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.3})]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g)).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.7).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    head = TeacherHead(torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.8,
                       torch.randn(V, generator=g) * 0.1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    mask = torch.rand(N, generator=g) > 0.25
    return h, w, b, head, labels, mask


def _reference(h, w, b, teacher_logits, name, params, labels, mask, ce_weight, temperature):
    """The unchunked loss in float64 (the plain path), as a float64 graph over float32 leaves."""
    logits = torch.nn.functional.linear(h.double(), w.double(), b.double())
    total = 0.8 * LOSSES.get(name)(logits, teacher_logits.double(), mask=mask, labels=labels,
                                   temperature=temperature, reduction="sum", **params)
    if ce_weight:
        total = total + ce_weight * cross_entropy(logits, labels=labels, mask=mask, reduction="sum")
    return total


@pytest.mark.parametrize(("name", "params"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("teacher_kind", ["head", "dense"])
@pytest.mark.parametrize(("ce_weight", "temperature"), [(0.0, 1.0), (0.3, 1.0), (0.0, 2.0)])
def test_float32_cpu_workspace_path_equals_the_unchunked_loss(monkeypatch, name, params, teacher_kind, ce_weight,
                                                              temperature):
    h, w, b, head, labels, mask = _inputs()
    t_logits = head.logits(slice(None))
    teacher = head if teacher_kind == "head" else t_logits
    used = []
    real_get = chunked_mod._Workspace.get
    monkeypatch.setattr(chunked_mod._Workspace, "get", lambda self, k, r: used.append(k) or real_get(self, k, r))
    out = chunked_distillation_loss(h, w, teacher, loss=name, labels=labels, mask=mask, kd_weight=0.8,
                                    ce_weight=ce_weight, temperature=temperature, chunk_size=7, lm_head_bias=b,
                                    compile_kernels=False, **params)
    assert {"z", "q", "g"} <= set(used)  # the workspace path ran (the test can tell it from the plain one)
    assert ("t" in used) == (teacher_kind == "head")
    ref = _reference(h, w, b, t_logits, name, params, labels, mask, ce_weight, temperature)
    torch.testing.assert_close(out["loss"].double(), ref, rtol=2e-5, atol=2e-5)
    got = torch.autograd.grad(out["loss"], [h, w, b])
    exp = torch.autograd.grad(ref, [h, w, b])
    for g_got, g_exp in zip(got, exp):
        torch.testing.assert_close(g_got.double(), g_exp.double(), rtol=1e-4, atol=1e-5)


def test_workspace_path_equals_the_fresh_buffer_path(monkeypatch):
    """Same float32 chunks with and without the workspace: the in-place log-softmax and the reused
    buffers change nothing beyond float rounding."""
    h, w, b, head, labels, mask = _inputs(1)
    kwargs = dict(loss="generalized_jsd", beta=0.5, labels=labels, mask=mask, ce_weight=0.2, chunk_size=6,
                  lm_head_bias=b, compile_kernels=False)
    with_ws = chunked_distillation_loss(h, w, head, **kwargs)
    g_ws = torch.autograd.grad(with_ws["loss"], [h, w, b])
    monkeypatch.setattr(chunked_mod, "_Workspace", lambda *a: None)  # no workspace: fresh arrays per chunk
    plain = chunked_distillation_loss(h, w, head, **kwargs)
    g_plain = torch.autograd.grad(plain["loss"], [h, w, b])
    torch.testing.assert_close(with_ws["loss"], plain["loss"], rtol=1e-6, atol=1e-6)
    for a, c in zip(g_ws, g_plain):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_compile_auto_resolves_from_the_compiler_and_the_environment(monkeypatch):
    monkeypatch.delenv(cf.COMPILE_ENV, raising=False)
    assert cf.resolve_compile(True, "cpu") is True and cf.resolve_compile(False, "cpu") is False
    monkeypatch.setattr(cf, "compiler_available", lambda device: True)
    assert cf.resolve_compile("auto", "cpu") is True
    monkeypatch.setattr(cf, "compiler_available", lambda device: False)
    assert cf.resolve_compile("auto", "cpu") is False
    monkeypatch.setenv(cf.COMPILE_ENV, "1")
    assert cf.resolve_compile("auto", "cpu") is True
    monkeypatch.setenv(cf.COMPILE_ENV, "0")
    monkeypatch.setattr(cf, "compiler_available", lambda device: True)
    assert cf.resolve_compile("auto", "cpu") is False
    assert cf.resolve_compile(True, "cpu") is True  # an explicit choice wins over the environment
    with pytest.raises(ConfigError, match="compile_kernels"):
        cf.resolve_compile("yes", "cpu")
    monkeypatch.undo()
    assert cf.compiler_available("meta") is False  # no code generator for other devices


def test_default_compile_kernels_is_auto_and_reaches_the_kernel(monkeypatch):
    """The default resolves through resolve_compile: with it saying yes, the compiled kernel runs."""
    seen = []
    monkeypatch.setattr(chunked_mod, "resolve_compile", lambda flag, device: seen.append(flag) or True)
    called = []
    monkeypatch.setattr(chunked_mod, "compiled_kernel", lambda kernel: called.append(kernel) or kernel)
    h, w, b, head, labels, mask = _inputs()
    chunked_distillation_loss(h, w, head, loss="forward_kl", chunk_size=8)
    assert seen == ["auto"] and len(called) == 1


def _fresh(fn):
    """A distinct function object per test, so the process-wide compile cache never mixes tests."""
    def closed_form(*args):
        return fn(*args)
    return closed_form


def test_a_failing_compile_logs_a_notice_and_runs_eagerly_for_good(monkeypatch, caplog):
    calls = []

    def broken_compile(fn, **_):
        def compiled(*args):
            calls.append(1)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return compiled

    monkeypatch.setattr(cf.torch, "compile", broken_compile)
    kernel = cf.ClosedForm(_fresh(fkl_closed_form), scale=-1.0).compiled()
    g = torch.Generator().manual_seed(3)
    logq = torch.log_softmax(torch.randn(4, 11, generator=g), -1)
    q, t = logq.exp(), torch.randn(4, 11, generator=g)
    with caplog.at_level(logging.WARNING, logger="kdforge.losses.closed_form"):
        out = kernel(logq.clone(), q, t)
        again = kernel(logq.clone(), q, t)
    ref_pos, ref_grad = fkl_closed_form(logq.clone(), q, t)
    torch.testing.assert_close(out.per_pos, ref_pos)
    torch.testing.assert_close(out.grad, ref_grad)
    torch.testing.assert_close(again.per_pos, ref_pos)
    assert calls == [1]  # the compiled function was tried once, then never again
    notices = [r for r in caplog.records if "running it eagerly" in r.getMessage()]
    assert len(notices) == 1 and "InvalidCxxCompiler" in notices[0].getMessage()


def test_an_input_error_is_not_taken_for_a_compiler_failure(monkeypatch, caplog):
    def compile_that_raises(fn, **_):
        def compiled(*args):
            return fn(*args)  # the compiled function fails exactly where the eager one does
        return compiled

    monkeypatch.setattr(cf.torch, "compile", compile_that_raises)
    kernel = cf.ClosedForm(_fresh(rkl_closed_form)).compiled()
    with caplog.at_level(logging.WARNING, logger="kdforge.losses.closed_form"), pytest.raises(RuntimeError):
        kernel(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))  # mismatched vocabularies
    assert kernel.fn.compiled is not None  # compilation stays on
    assert not [r for r in caplog.records if "running it eagerly" in r.getMessage()]


@pytest.mark.slow  # torch.compile of two closed forms
@pytest.mark.parametrize("kernel_name", ["reverse_kl_kernel", "forward_kl_kernel", "tvd_chunk_kernel"])
def test_compiled_kernel_writes_its_gradient_into_the_given_buffer(kernel_name):
    """Compiled (a second graph copying into ``out``) or, with ``eager_into``, the eager ``out=``
    form: either way the gradient lands in the caller's buffer, with the eager kernel's values."""
    import kdforge.losses.divergences as div

    kernel = getattr(div, kernel_name)
    g = torch.Generator().manual_seed(5)
    z, t = torch.randn(9, 31, generator=g) * 2, torch.randn(9, 31, generator=g) * 2
    logq = torch.log_softmax(z, -1)
    ref = kernel(logq.clone(), logq.exp(), t)
    for rows in (9, 6):  # shape-dynamic
        buf = torch.full((rows, 31), float("nan"))
        got = kernel.compiled()(logq[:rows].clone(), logq[:rows].exp(), t[:rows], out=buf)
        assert got.grad.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(got.per_pos, ref.per_pos[:rows])
        torch.testing.assert_close(got.grad, ref.grad[:rows])
