"""The vLLM offline backend, driven through a fake ``vllm`` module (vLLM needs a GPU), and once
against a real vLLM on a GPU.

The fake mirrors the vLLM API the backend uses: ``LLM(model=..., **engine_kwargs)`` with
``generate(prompts, sampling_params=[...], use_tqdm=...)`` and ``chat(conversations,
sampling_params=[...], use_tqdm=..., chat_template=..., add_generation_prompt=...)``,
``SamplingParams(**kw)``, and outputs shaped like ``RequestOutput`` (``prompt``,
``prompt_token_ids``, ``outputs[0]`` a ``CompletionOutput`` with ``text``, ``token_ids``,
``finish_reason``). Every call's arguments are recorded.
"""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from kdforge.elicit import GenerationEngine, SamplingParams, build_requests
from kdforge.elicit.backends import VLLMConfig, build_backend
from kdforge.elicit.engine import collect
from kdforge.errors import ConfigError, GenerationError


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class FakeLLM:
    """Records construction and calls; the reply is a pure function of (prompt, seed) so a
    resumed job can be compared with an uninterrupted one."""

    instances: list[FakeLLM] = []

    def __init__(self, model, **kw):
        self.model, self.kw = model, kw
        self.calls: list[dict] = []
        self.fail_on_call: int | None = None
        FakeLLM.instances.append(self)

    def _reply(self, prompt_text: str, sp: FakeSamplingParams) -> SimpleNamespace:
        words = f"{prompt_text} seed{sp.kw['seed']} t{sp.kw['temperature']}".split()
        words = words[: sp.kw["max_tokens"]]
        text, finish = " ".join(words), "length" if len(words) == sp.kw["max_tokens"] else "stop"
        for s in sp.kw["stop"] or []:  # vLLM cuts at a stop string and leaves it out
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        completion = SimpleNamespace(index=0, text=text, token_ids=list(range(len(text.split()))),
                                     finish_reason=finish, cumulative_logprob=None, logprobs=None)
        return SimpleNamespace(request_id=str(len(self.calls)), prompt=prompt_text,
                               prompt_token_ids=list(range(len(prompt_text.split()))),
                               outputs=[completion], finished=True)

    def _call(self, kind, prompts, sampling_params, **kw):
        self.calls.append({"kind": kind, "prompts": prompts, "params": [p.kw for p in sampling_params], **kw})
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("CUDA out of memory (fake)")
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        return prompts

    def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None):
        prompts = self._call("generate", prompts, sampling_params, use_tqdm=use_tqdm)
        return [self._reply(p, sp) for p, sp in zip(prompts, sampling_params, strict=True)]

    def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None, chat_template=None,
             chat_template_content_format="auto", add_generation_prompt=True, continue_final_message=False,
             tools=None, chat_template_kwargs=None, mm_processor_kwargs=None):
        self._call("chat", messages, sampling_params, use_tqdm=use_tqdm, chat_template=chat_template,
                   add_generation_prompt=add_generation_prompt)
        rendered = [" ".join(f"{m['role']}: {m['content']}" for m in conv) for conv in messages]
        return [self._reply(p, sp) for p, sp in zip(rendered, sampling_params, strict=True)]


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.instances = []
    return mod


def test_engine_arguments_come_from_the_config(fake_vllm, tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    b = build_backend(VLLMConfig(model="/models/m", dtype="bfloat16", tensor_parallel_size=2,
                                 gpu_memory_utilization=0.5, max_model_len=2048, batch_size=64,
                                 chat_template=str(tpl), seed=7))
    (llm,) = FakeLLM.instances
    assert llm.model == "/models/m"
    assert llm.kw == {"dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                      "trust_remote_code": False, "seed": 7, "max_model_len": 2048}
    assert b.batch_size == 64 and b.chat_template == tpl.read_text()  # a template file is read
    with pytest.raises(ConfigError, match="neither Jinja text nor an existing file"):
        build_backend(VLLMConfig(model="m", chat_template="no/such/file.jinja"))


def test_requests_samples_stops_max_tokens_seeds_and_chat_templates_are_mapped(fake_vllm, tmp_path):
    b = build_backend(VLLMConfig(model="m", chat_template="{{ messages[0]['content'] }}"))
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=5, stop=["END"], seed=10)
    reqs = build_requests(["one two three", chat], params)
    summary = GenerationEngine(b, tmp_path / "out", progress=False).run(reqs)
    assert summary.generated == 6 and summary.failed == 0

    (llm,) = FakeLLM.instances
    by_kind = {c["kind"]: c for c in llm.calls}
    assert len(llm.calls) == 2  # one batched call per prompt kind
    gen, cht = by_kind["generate"], by_kind["chat"]
    assert gen["prompts"] == ["one two three"] * 3 and gen["use_tqdm"] is False
    assert cht["prompts"] == [chat] * 3  # messages reach LLM.chat untouched
    assert cht["chat_template"] == "{{ messages[0]['content'] }}" and cht["add_generation_prompt"] is True
    for call in (gen, cht):  # n samples = n requests, each n=1 with seed + sample index
        assert [p["seed"] for p in call["params"]] == [10, 11, 12]
        assert all(p["n"] == 1 and p["temperature"] == 0.7 and p["top_p"] == 0.9 and p["max_tokens"] == 5
                   and p["stop"] == ["END"] for p in call["params"])

    recs = collect(tmp_path / "out", reqs)
    assert [r["sample_index"] for r in recs] == [0, 1, 2, 0, 1, 2]
    first = recs[0]
    assert first["text"] == "one two three seed10 t0.7" and first["finish_reason"] == "length"
    assert first["prompt_tokens"] == 3 and first["completion_tokens"] == 5 and first["model"] == "m"


def test_stop_strings_are_cut_and_no_stop_is_sent_as_none(fake_vllm, tmp_path):
    b = build_backend(VLLMConfig(model="m"))
    reqs = build_requests(["alpha END beta"], SamplingParams(max_tokens=50, stop="END", seed=0))
    GenerationEngine(b, tmp_path / "a", progress=False).run(reqs)
    (rec,) = collect(tmp_path / "a", reqs)
    assert rec["text"] == "alpha " and rec["finish_reason"] == "stop"
    reqs = build_requests(["plain"], SamplingParams(max_tokens=50))
    GenerationEngine(b, tmp_path / "b", progress=False).run(reqs)
    params = FakeLLM.instances[0].calls[-1]["params"][0]
    assert params["stop"] is None and params["seed"] is None and params["temperature"] == 0.0


def test_a_failed_engine_call_fails_only_its_requests_and_a_rerun_completes_the_job(fake_vllm, tmp_path):
    b = build_backend(VLLMConfig(model="m", batch_size=2))
    reqs = build_requests([f"prompt {i}" for i in range(6)], SamplingParams(n=1, temperature=0.5, seed=3))
    llm = FakeLLM.instances[0]
    llm.fail_on_call = 2  # the second batch dies (e.g. out of memory)
    s1 = GenerationEngine(b, tmp_path / "out", progress=False, on_error="skip").run(reqs)
    assert (s1.generated, s1.failed) == (4, 2)

    llm.fail_on_call = None
    n_calls = len(llm.calls)
    s2 = GenerationEngine(b, tmp_path / "out", progress=False, on_error="skip").run(reqs)
    assert (s2.skipped, s2.generated, s2.failed) == (4, 2, 0)
    assert [c["prompts"] for c in llm.calls[n_calls:]] == [["prompt 2", "prompt 3"]]  # only the lost ones
    s3 = GenerationEngine(b, tmp_path / "out", progress=False).run(reqs)  # idempotent: nothing to do
    assert (s3.skipped, s3.generated) == (6, 0) and len(llm.calls) == n_calls + 1

    # same texts as an uninterrupted run, each id exactly once
    ref = tmp_path / "ref"
    GenerationEngine(build_backend(VLLMConfig(model="m", batch_size=6)), ref, progress=False).run(reqs)
    got = collect(tmp_path / "out", reqs)
    assert [r["text"] for r in got] == [r["text"] for r in collect(ref, reqs)]
    lines = [json.loads(x) for f in sorted((tmp_path / "out").rglob("*.jsonl")) for x in f.read_text().splitlines()
             if x.strip()]
    ids = [x["id"] for x in lines if "id" in x and "text" in x]
    assert sorted(ids) == sorted(r.id for r in reqs)


def test_mixed_batch_keeps_the_chat_results_when_the_text_call_fails(fake_vllm, tmp_path):
    b = build_backend(VLLMConfig(model="m"))
    reqs = build_requests([[{"role": "user", "content": "hi"}], "text prompt"], SamplingParams(seed=0))
    FakeLLM.instances[0].fail_on_call = 2  # chat is call 1, generate is call 2
    out = b._run(reqs)
    assert out[0].text.startswith("user: hi")
    assert isinstance(out[1], GenerationError) and "out of memory" in str(out[1])


def test_missing_vllm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match=r"kdforge\[vllm\]"):
        build_backend(VLLMConfig(model="m"))


def _vllm_sized_model(tiny_model_dir, out):
    """The tiny test tokenizer with a 2-layer Llama whose head size (64) vLLM's attention
    kernels support (the shared tiny model has head size 8)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.mark.gpu
def test_real_vllm_generates_chat_and_text_with_per_request_seeds(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    model = _vllm_sized_model(tiny_model_dir, tmp_path / "model")
    b = build_backend(VLLMConfig(model=str(model), gpu_memory_utilization=0.3, max_model_len=256,
                                 dtype="bfloat16"))
    reqs = build_requests(["the movie", [{"role": "user", "content": "hi"}]],
                          SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=0))
    s = GenerationEngine(b, tmp_path / "a", progress=False).run(reqs)
    assert s.generated == 4 and s.failed == 0
    recs = collect(tmp_path / "a", reqs)
    assert all(0 < r["completion_tokens"] <= 8 and r["prompt_tokens"] > 0 for r in recs)
    again = GenerationEngine(b, tmp_path / "b", progress=False).run(reqs)  # per-request seeds: same samples
    assert again.generated == 4
    assert [r["text"] for r in collect(tmp_path / "b", reqs)] == [r["text"] for r in recs]
