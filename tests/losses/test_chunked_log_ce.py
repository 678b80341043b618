"""``chunked_distillation_loss(log_ce=True)``: cross-entropy logged at weight 0 (its value, no gradient).

The value must equal ``cross_entropy`` on the full logits on every path of the chunked loss (dense,
head and sparse teachers; closed forms at ``T = 1`` and ``T != 1``; the autograd path; no KD term),
and the gradient must be the one without the logged term."""

from __future__ import annotations

import pytest
import torch

import kdforge.losses.chunked as chunked_mod
from kdforge.errors import ConfigError
from kdforge.losses import chunked_distillation_loss, cross_entropy, value_checks
from kdforge.losses.chunked import TeacherHead
from kdforge.losses.signal import SparseTeacher

N, H, V, HT = 19, 6, 37, 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    th = torch.randn(N, HT, generator=g, dtype=torch.float64)
    tw = torch.randn(V, HT, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    mask = torch.rand(N, generator=g) > 0.2
    return h, w, th, tw, labels, mask


def _teacher(kind, th, tw):
    if kind == "head":
        return TeacherHead(th, tw)
    logits = th @ tw.T
    return SparseTeacher.from_logits(logits, 5) if kind == "sparse" else logits


CASES = [  # (teacher kind, loss, params, temperature, closed_form, kd_weight)
    ("dense", "reverse_kl", {}, 1.0, True, 0.7),  # closed form sharing log q with CE
    ("dense", "forward_kl", {}, 2.0, True, 0.7),  # closed form at T != 1: CE from logsumexp
    ("head", "generalized_jsd", {"beta": 0.5}, 1.0, True, 0.7),
    ("dense", "forward_kl", {}, 2.0, False, 0.7),  # the autograd path
    ("dense", "forward_kl", {}, 1.0, True, 0.0),  # no KD term: CE's value alone
    ("sparse", "forward_kl", {}, 1.0, True, 0.7),  # sparse closed form
    ("sparse", "generalized_jsd", {"beta": 0.5, "sparse_policy": "renormalize"}, 2.0, True, 0.7),
]


@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c[:2] + c[3:]))
def test_logged_ce_equals_plain_cross_entropy_and_adds_no_gradient(case, checks):
    kind, loss, params, temperature, closed_form, kd_weight = case
    h, w, th, tw, labels, mask = _inputs()
    teacher = _teacher(kind, th, tw)
    kwargs = dict(loss=loss, labels=labels, mask=mask, kd_weight=kd_weight, temperature=temperature, chunk_size=6,
                  closed_form=closed_form, compile_kernels=False, **params)
    with value_checks(checks):
        logged = chunked_distillation_loss(h, w, teacher, log_ce=True, **kwargs)
        plain = chunked_distillation_loss(h, w, teacher, **kwargs)
    ref = cross_entropy(h @ w.T, labels=labels, mask=mask, reduction="sum")
    torch.testing.assert_close(logged["ce"], ref.detach(), rtol=1e-10, atol=1e-10)
    assert float(plain["ce"]) == 0.0  # without log_ce a weight-0 CE is not computed
    torch.testing.assert_close(logged["loss"], plain["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logged["kd"], plain["kd"], rtol=1e-12, atol=1e-12)
    if kd_weight:
        g_logged = torch.autograd.grad(logged["loss"], (h, w))
        g_plain = torch.autograd.grad(plain["loss"], (h, w))
        for a, b in zip(g_logged, g_plain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_logged_ce_keeps_the_closed_form_path(kind, monkeypatch):
    """A logged-only CE never sends a chunk to the autograd path (the fast path stays)."""
    h, w, th, tw, labels, _ = _inputs(1)
    calls = []
    real = chunked_mod.cross_entropy
    monkeypatch.setattr(chunked_mod, "cross_entropy", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = chunked_distillation_loss(h, w, _teacher(kind, th, tw), labels=labels, chunk_size=6, log_ce=True,
                                    compile_kernels=False)
    assert not calls
    torch.testing.assert_close(out["ce"], cross_entropy(h @ w.T, labels=labels, reduction="sum").detach())


def test_logged_ce_mean_reduction_divides_by_the_labelled_positions():
    h, w, th, tw, labels, mask = _inputs(2)
    out = chunked_distillation_loss(h, w, th @ tw.T, labels=labels, mask=mask, chunk_size=5, log_ce=True,
                                    reduction="mean", compile_kernels=False)
    ref = cross_entropy(h @ w.T, labels=labels, mask=mask, reduction="mean")
    torch.testing.assert_close(out["ce"], ref.detach())


def test_log_ce_without_labels_is_a_config_error():
    h, w, th, tw, _, _ = _inputs()
    with pytest.raises(ConfigError, match="log_ce"):
        chunked_distillation_loss(h, w, th @ tw.T, log_ce=True)
