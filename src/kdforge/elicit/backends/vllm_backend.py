"""vLLM offline engine backend (optional: ``pip install 'kdforge[vllm]'``, needs a GPU).

vLLM schedules a whole batch with continuous batching and paged attention, so the engine hands
it large batches (``batch_size``, default 256) in one call. Chat prompts go through
``LLM.chat`` (the model's chat template), text prompts through ``LLM.generate``. Each request
keeps its own seed (vLLM supports per-request seeds), so samples are reproducible regardless of
batching.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kdforge.elicit.backends.base import Backend
from kdforge.elicit.backends.config import VLLMConfig
from kdforge.elicit.types import GenerationRequest, GenerationResult
from kdforge.errors import ConfigError, GenerationError


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


class VLLMBackend(Backend):
    """vLLM ``LLM`` engine as the teacher."""

    name = "vllm"
    concurrency = 1

    def __init__(self, model: str, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 batch_size: int = 256, trust_remote_code: bool = False) -> None:
        super().__init__()
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_name = model
        self.batch_size = batch_size
        kw: dict[str, Any] = {"dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
                              "gpu_memory_utilization": gpu_memory_utilization,
                              "trust_remote_code": trust_remote_code}
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = vllm.LLM(model=model, **kw)

    @classmethod
    def from_config(cls, cfg: VLLMConfig) -> VLLMBackend:
        return cls(cfg.model, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                   gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                   batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "batch_size": self.batch_size}

    def _sampling(self, p: dict[str, Any]) -> Any:
        return self._vllm.SamplingParams(
            n=1, temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"],
            stop=p.get("stop") or None, seed=p.get("seed"))

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        return await asyncio.to_thread(self._run, requests)

    def _run(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        out: list[GenerationResult | BaseException] = [GenerationError("not generated")] * len(requests)
        chat = [i for i, r in enumerate(requests) if r.is_chat]
        text = [i for i, r in enumerate(requests) if not r.is_chat]
        try:
            if chat:
                res = self.llm.chat([requests[i].prompt for i in chat],
                                    [self._sampling(requests[i].params) for i in chat], use_tqdm=False)
                for i, o in zip(chat, res, strict=True):
                    out[i] = self._result(o)
            if text:
                res = self.llm.generate([requests[i].prompt for i in text],
                                        [self._sampling(requests[i].params) for i in text], use_tqdm=False)
                for i, o in zip(text, res, strict=True):
                    out[i] = self._result(o)
        except Exception as exc:  # noqa: BLE001 - reported per request
            err = GenerationError(f"vLLM generation failed: {type(exc).__name__}: {exc}",
                                  "check GPU memory (gpu_memory_utilization, max_model_len) and the prompts")
            return [err] * len(requests)
        self.stats.requests += len(requests)
        return out

    def _result(self, o: Any) -> GenerationResult:
        c = o.outputs[0]
        return GenerationResult(text=c.text, finish_reason=c.finish_reason,
                                prompt_tokens=len(o.prompt_token_ids or []),
                                completion_tokens=len(c.token_ids), model=self.model_name)
