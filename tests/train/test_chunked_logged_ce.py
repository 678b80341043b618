"""A ``cross_entropy`` term logged at weight 0 next to a chunked KD term: the default chunked
closed-form path (live dense teacher, or a cached top-k teacher) logs the plain path's value and
gives the plain path's update, at weight 0 as at a non-zero weight."""

import pytest
import torch

import kdforge.losses.chunked as chunked_mod
from kdforge.train import LossTerm, Objective

from ._tiny import one_step_grads, pad_collate, tiny_llama
from .test_chunked_sparse_default import _cached_collate


def _step(chunked, source, ce_weight):
    torch.manual_seed(0)
    student = tiny_llama(2)
    kd = LossTerm("reverse_kl", 0.7) if source == "sparse" else LossTerm("forward_kl", 0.7, {"temperature": 2.0})
    objective = Objective([kd, LossTerm("cross_entropy", ce_weight)], chunked=chunked, chunk_size=7,
                          compile_kernels=False)
    if source == "sparse":
        return one_step_grads(student, None, objective, _cached_collate())
    return one_step_grads(student, tiny_llama(1, head_scale=3.0), objective, pad_collate())


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("source", ["dense", "sparse"])
def test_logged_cross_entropy_on_the_chunked_path_equals_the_plain_path(source, ce_weight, monkeypatch):
    kernel = "_sparse_closed_form_chunk" if source == "sparse" else "_closed_form_chunk"
    calls = []
    real = getattr(chunked_mod, kernel)
    monkeypatch.setattr(chunked_mod, kernel, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g_plain, logs_plain = _step(False, source, ce_weight)
    assert not calls
    g_auto, logs_auto = _step("auto", source, ce_weight)
    assert calls  # the default kept the closed-form chunked path
    assert logs_plain["loss/cross_entropy"] > 1.0  # a real value, not the 0 a weighted-only kernel logs
    for key in ("loss", "loss/cross_entropy"):
        assert abs(logs_auto[key] - logs_plain[key]) < 1e-5 * max(1.0, abs(logs_plain[key])), key
    for name in g_plain:
        torch.testing.assert_close(g_auto[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
