"""The default ``Objective(chunked="auto")`` routes a cached sparse (top-k) teacher to the sparse
closed form of the chunked path (never densified) and gives the plain path's update."""

import pytest
import torch

import kdforge.losses.chunked as chunked_mod
from kdforge.teachers.sources import CachedTeacher
from kdforge.train import CausalLMTask, LossTerm, Objective

from ._tiny import one_step_grads, pad_collate, tiny_llama

K = 5


def _cached_collate():
    teacher, collate = tiny_llama(1, head_scale=3.0), pad_collate()

    def cached(items):
        batch = collate(items)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs, ids = torch.log_softmax(logits, -1).topk(K, dim=-1)
        return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}

    return cached


def _first_step(chunked, kd_term):
    torch.manual_seed(0)
    student = tiny_llama(2)
    objective = Objective([kd_term, LossTerm("cross_entropy", 0.3)], chunked=chunked, chunk_size=7,
                          compile_kernels=False)
    return one_step_grads(student, None, objective, _cached_collate())


SPARSE_CF_TERMS = {
    "forward_kl": LossTerm("forward_kl", 0.7),  # T = 1, tail_bucket
    "reverse_kl": LossTerm("reverse_kl", 0.7),
    "jsd_renormalize_T2": LossTerm("generalized_jsd", 0.7, {"beta": 0.5, "temperature": 2.0,
                                                            "sparse_policy": "renormalize"}),
}


@pytest.mark.parametrize("case", list(SPARSE_CF_TERMS))
def test_default_objective_routes_cached_teacher_to_sparse_closed_form(case, monkeypatch):
    calls = {"sparse": 0, "dense_teacher": 0}
    real_sparse = chunked_mod._sparse_closed_form_chunk

    def spy_sparse(h, w, b, teacher, *args, **kwargs):
        calls["sparse"] += 1
        assert isinstance(teacher, chunked_mod.SparseTeacher) and teacher.ids.shape[-1] == K  # never densified
        return real_sparse(h, w, b, teacher, *args, **kwargs)

    monkeypatch.setattr(chunked_mod, "_sparse_closed_form_chunk", spy_sparse)
    g_plain, logs_plain = _first_step(False, SPARSE_CF_TERMS[case])
    assert calls["sparse"] == 0
    g_auto, logs_auto = _first_step("auto", SPARSE_CF_TERMS[case])
    assert calls["sparse"] > 0  # the default took the sparse closed form
    for name in g_plain:
        torch.testing.assert_close(g_auto[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    kd_key = f"loss/{SPARSE_CF_TERMS[case].key}"
    for key in ("loss", kd_key, "loss/cross_entropy"):
        assert abs(logs_auto[key] - logs_plain[key]) < 1e-5 * max(1.0, abs(logs_plain[key])), key


def test_default_objective_keeps_plain_path_where_sparse_closed_form_does_not_apply():
    objective = Objective([LossTerm("forward_kl", 1.0, {"temperature": 2.0})])  # T != 1, tail_bucket
    assert not objective.use_chunked(CausalLMTask(), CachedTeacher(), tiny_llama(2))
    objective = Objective([LossTerm("forward_kl", 1.0)])
    assert objective.use_chunked(CausalLMTask(), CachedTeacher(), tiny_llama(2))


def test_a_logged_only_cross_entropy_keeps_the_cache_on_the_chunked_path():
    """``cross_entropy`` at weight 0 is there to be logged: the chunked kernels compute its value
    (``log_ce``), so the default takes the chunked path with or without it
    (values: tests/train/test_chunked_logged_ce.py)."""
    logged_only = Objective([LossTerm("forward_kl", 1.0), LossTerm("cross_entropy", 0.0)])
    assert logged_only.use_chunked(CausalLMTask(), CachedTeacher(), tiny_llama(2))
    weighted = Objective([LossTerm("forward_kl", 1.0), LossTerm("cross_entropy", 0.1)])
    assert weighted.use_chunked(CausalLMTask(), CachedTeacher(), tiny_llama(2))
