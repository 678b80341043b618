"""vLLM offline engine backend (optional: ``pip install 'kdforge[vllm]'``, needs a GPU).

vLLM schedules a whole batch with continuous batching and paged attention, so the engine hands
it large batches (``batch_size``, default 256) in one call. Chat prompts go through
``LLM.chat(messages, sampling_params=..., chat_template=..., add_generation_prompt=True)`` (the
tokenizer's chat template, or ``chat_template`` given as Jinja text or a file), text prompts
through ``LLM.generate(prompts, sampling_params=...)``; both take one ``SamplingParams`` per
prompt. Each request is one sample (``n=1``; the engine expands ``n`` into requests with seeds
``seed + i``) and keeps its own seed (vLLM supports per-request seeds), so samples are
reproducible regardless of batching. Stop strings are excluded from the text (vLLM's default,
the same contract as the other backends). ``model: smollm2`` (or ``asset:smollm2``) resolves a kdforge asset folder (:mod:`kdforge.models`).

API used (checked against vLLM's ``LLM.chat``/``LLM.generate``/``SamplingParams`` and the
``RequestOutput``/``CompletionOutput`` fields ``prompt_token_ids``, ``outputs[0].text``,
``.token_ids``, ``.finish_reason``), tested with a fake ``vllm`` module in
``tests/elicit/test_vllm_backend.py`` and against a real vLLM on a GPU (``-m gpu``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from kdforge.elicit.backends.base import Backend, register_backend
from kdforge.elicit.backends.config import VLLMConfig
from kdforge.elicit.types import GenerationRequest, GenerationResult
from kdforge.errors import ConfigError, GenerationError, KdforgeError


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError(
            "the 'vllm' backend needs the vllm package, which is not installed",
            "pip install 'kdforge[vllm]' on a machine with a supported GPU, or use the "
            "'openai' backend against a running `vllm serve`, or the 'transformers' backend",
        ) from None
    return vllm


def _read_template(template: str | None) -> str | None:
    """A chat template given inline (Jinja text) or as a path to a file holding it."""
    if template is None or "{" in template:
        return template
    path = Path(template)
    if not path.is_file():
        raise ConfigError(f"chat_template {template!r} is neither Jinja text nor an existing file",
                          "give the template text (it contains '{%' / '{{') or a path to a .jinja file")
    return path.read_text(encoding="utf-8")


@register_backend("vllm")
class VLLMBackend(Backend):
    """vLLM ``LLM`` engine as the teacher."""

    name = "vllm"
    concurrency = 1

    def __init__(self, model: str, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 batch_size: int = 256, trust_remote_code: bool = False,
                 chat_template: str | None = None, seed: int = 0) -> None:
        super().__init__()
        vllm = _import_vllm()
        self._vllm = vllm
        from kdforge.assets import ASSET_MODULES
        from kdforge.models import asset_name, resolve_model_path

        if asset_name(model) in ASSET_MODULES:  # smollm2 or asset:smollm2 -> its folder, like llm_kd's teacher
            model = resolve_model_path(model)
        self.model_name = model
        self.batch_size = batch_size
        self.chat_template = _read_template(chat_template)
        kw: dict[str, Any] = {"dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
                              "gpu_memory_utilization": gpu_memory_utilization,
                              "trust_remote_code": trust_remote_code, "seed": seed}
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = vllm.LLM(model=model, **kw)

    @classmethod
    def from_config(cls, cfg: VLLMConfig) -> VLLMBackend:
        return cls(cfg.model, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                   gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                   batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code,
                   chat_template=cfg.chat_template, seed=cfg.seed)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "batch_size": self.batch_size,
                "chat_template": "custom" if self.chat_template else "tokenizer"}

    def _sampling(self, p: dict[str, Any]) -> Any:
        return self._vllm.SamplingParams(
            n=1, temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"],
            stop=p.get("stop") or None, seed=p.get("seed"))

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        return await asyncio.to_thread(self._run, requests)

    def _run(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        """Chat prompts in one ``LLM.chat`` call, text prompts in one ``LLM.generate`` call; a
        failing call fails only its own requests (the other group's results are kept)."""
        out: list[GenerationResult | BaseException] = [GenerationError("not generated")] * len(requests)
        chat = [i for i, r in enumerate(requests) if r.is_chat]
        text = [i for i, r in enumerate(requests) if not r.is_chat]
        for idx, call in ((chat, self._chat), (text, self._generate)):
            if not idx:
                continue
            try:
                res = call([requests[i] for i in idx])
                if len(res) != len(idx):
                    raise GenerationError(f"vLLM returned {len(res)} outputs for {len(idx)} prompts",
                                          "report this vLLM version; the backend expects one output per prompt")
                for i, o in zip(idx, res, strict=True):
                    out[i] = self._result(o)
            except Exception as exc:  # noqa: BLE001 - reported per request
                err = exc if isinstance(exc, KdforgeError) else GenerationError(
                    f"vLLM generation failed: {type(exc).__name__}: {exc}",
                    "check GPU memory (gpu_memory_utilization, max_model_len) and the prompts")
                for i in idx:
                    out[i] = err
                continue
            self.stats.requests += len(idx)
        return out

    def _chat(self, reqs: list[GenerationRequest]) -> list[Any]:
        return self.llm.chat([r.prompt for r in reqs], sampling_params=[self._sampling(r.params) for r in reqs],
                             use_tqdm=False, chat_template=self.chat_template, add_generation_prompt=True)

    def _generate(self, reqs: list[GenerationRequest]) -> list[Any]:
        return self.llm.generate([r.prompt for r in reqs], sampling_params=[self._sampling(r.params) for r in reqs],
                                 use_tqdm=False)

    def _result(self, o: Any) -> GenerationResult:
        c = o.outputs[0]
        return GenerationResult(text=c.text, finish_reason=c.finish_reason,
                                prompt_tokens=len(o.prompt_token_ids or []),
                                completion_tokens=len(c.token_ids), model=self.model_name)
