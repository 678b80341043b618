"""Local transformers backend on a tiny model folder (offline, CPU)."""

from __future__ import annotations

import math

import pytest

from kdforge.elicit import GenerationEngine, SamplingParams, build_requests, generate
from kdforge.elicit.backends import TransformersConfig, build_backend

PROMPTS = ["the movie", "a dull and boring film, rotten to the", "fresh"]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return build_backend(TransformersConfig(model=str(tiny_model_dir), device="cpu", batch_size=3))


def _texts(backend, prompts, out, batch_size):
    backend.batch_size = batch_size
    _, recs = generate(prompts, backend, out, SamplingParams(max_tokens=8), progress=False)
    return [r["text"] for r in recs], recs


def test_left_padded_batch_gives_the_same_greedy_text_as_one_prompt_at_a_time(backend, tmp_path):
    batched, recs = _texts(backend, PROMPTS, tmp_path / "b", 3)
    single, _ = _texts(backend, PROMPTS, tmp_path / "s", 1)
    assert batched == single
    assert [r["prompt_tokens"] for r in recs] == [len(backend.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]


def test_chat_prompts_use_the_tokenizer_chat_template(backend):
    rendered = backend.render([{"role": "user", "content": "hi"}])
    assert rendered == "<s>user: hi</s><s>assistant: "


def test_stop_strings_cut_the_text_before_the_stop(backend, tmp_path):
    _, full = generate(PROMPTS, backend, tmp_path / "a", SamplingParams(max_tokens=12), progress=False)
    stop = next((t["text"][2:4] for t in full if len(t["text"]) >= 4), None)
    assert stop is not None, "the tiny model (greedy, deterministic) should produce texts of 4+ characters"
    _, cut = generate(PROMPTS, backend, tmp_path / "b", SamplingParams(max_tokens=12, stop=[stop]), progress=False)
    for f, c in zip(full, cut, strict=True):
        assert stop not in c["text"]
        if stop in f["text"]:
            assert c["text"] == f["text"][: f["text"].index(stop)] and c["finish_reason"] == "stop"


def test_sampling_with_a_seed_is_reproducible_for_the_same_batching(backend, tmp_path):
    p = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=11)
    _, a = generate(PROMPTS, backend, tmp_path / "a", p, progress=False)
    _, b = generate(PROMPTS, backend, tmp_path / "b", p, progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_continuation_scores_are_exact_log_likelihoods(backend):
    import torch

    prompt, cont = "the movie was", " fresh"
    (score,) = backend.score_continuations(prompt, [cont])
    tok = backend.tokenizer
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(ids).logits[0], -1)
    ref = sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(c_ids))
    assert math.isclose(score, ref, rel_tol=1e-5, abs_tol=1e-5)
    two = backend.score_continuations(prompt, [" fresh", " rotten to the core"])
    assert math.isclose(two[0], score, rel_tol=1e-5, abs_tol=1e-5)  # padding does not change it


def test_chat_prompt_without_a_template_is_a_clear_config_error(backend, tmp_path):
    tpl = backend.tokenizer.chat_template
    backend.tokenizer.chat_template = None
    try:
        reqs = build_requests([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=2))
        with pytest.raises(Exception) as err:
            GenerationEngine(backend, tmp_path, progress=False).run(reqs)
        assert "chat template" in str(err.value)
    finally:
        backend.tokenizer.chat_template = tpl


def test_missing_model_folder_is_the_error_of_kdforge_run(tmp_path):
    from kdforge.errors import AssetError

    with pytest.raises(AssetError, match="nope': no such folder"):  # kdforge.models, like llm_kd's teacher.model
        build_backend(TransformersConfig(model=str(tmp_path / "nope"), device="cpu"))


def test_batched_scoring_of_many_prompts_matches_one_at_a_time(backend):
    prompts = ["the movie was", [{"role": "user", "content": "fresh or rotten?"}], "a dull"]
    conts = [" fresh", " rotten"]
    many = backend.score_many(prompts, conts, batch_size=2)
    for p, row in zip(prompts, many, strict=True):
        for a, b in zip(row, backend.score_continuations(p, conts), strict=True):
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def test_one_token_labels_are_scored_in_one_pass_with_the_same_numbers(backend):
    tok = backend.tokenizer
    conts = [" fresh", " rotten"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in conts]
    assert all(len(i) == 1 for i in ids)  # the premise: the fast path applies
    prompts = ["the movie was", [{"role": "user", "content": "fresh or rotten?"}], "a dull film"]
    fast = backend.score_many(prompts, conts, batch_size=3)
    prefixes = [tok(backend.render(p), add_special_tokens=False)["input_ids"] for p in prompts]
    slow = backend._score_pairs([(p, i) for p in prefixes for i in ids])  # the general path
    for j, row in enumerate(fast):
        for k, a in enumerate(row):
            assert math.isclose(a, slow[j * 2 + k], rel_tol=1e-4, abs_tol=1e-4)
