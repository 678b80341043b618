"""OpenAI-compatible HTTP backend: ``/v1/chat/completions`` and ``/v1/completions``.

Works with any server speaking the OpenAI API: vLLM (``vllm serve``), TGI, llama.cpp's
``llama-server``, ``transformers serve``, SGLang, and hosted APIs.

Client choice: ``httpx.AsyncClient`` rather than the ``openai`` package. The engine needs
exact control of what is retried and when (status codes, ``Retry-After``, connection drops,
per-request timeouts, a shared rate limit across concurrent requests) and per-request error
results instead of exceptions; the ``openai`` client has its own hidden retry loop and would
retry *inside* ours. httpx is small, async-native, widely used (it is what ``openai`` itself is
built on) and gives all of that directly.

Reliability contract:

* at most ``concurrency`` requests in flight (connection pool limit plus the engine);
* every attempt has a connect timeout and a total read timeout;
* retried with exponential backoff and full jitter: HTTP 408/409/425/429/5xx, connection
  errors (refused, reset, dropped without a response), timeouts, and unparseable bodies;
  a ``Retry-After`` header (seconds or HTTP date) replaces the backoff, capped by
  ``retry_after_max_s``;
* not retried: other 4xx (bad request, auth, unknown model): the request fails at once with
  the server's message, since repeating it cannot help;
* optional rate limits: requests/s and tokens/min (token buckets; the token cost is estimated
  before sending and corrected with the server's reported ``usage``);
* the API key is read from the environment variable *named* in the config, sent only in the
  ``Authorization`` header, and never logged, stored, or put in error messages.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kdforge.elicit.backends.base import Backend, register_backend, truncate_at_stop
from kdforge.elicit.backends.config import OpenAIConfig
from kdforge.elicit.backends.http import RETRY_STATUS, RetryingPoster, api_key_from_env
from kdforge.elicit.types import GenerationRequest, GenerationResult, Message
from kdforge.errors import ConfigError, GenerationError

log = logging.getLogger(__name__)

__all__ = ["RETRY_STATUS", "OpenAIBackend"]  # RETRY_STATUS: re-exported from .http, where the policy lives


@register_backend("openai")
class OpenAIBackend(Backend):
    """Async client for an OpenAI-compatible endpoint (see the module docstring).

    Args:
        base_url: server root including the API prefix, e.g. ``http://127.0.0.1:8000/v1``.
        model: model name the server expects.
        endpoint: ``"chat"`` (messages; text prompts are sent as one user message) or
            ``"completions"`` (text prompts only).
        api_key_env: name of the environment variable holding the key; ``None`` for no key.
        rng_seed: seed of the backoff jitter (tests); ``None`` = random.
    """

    name = "openai"
    batch_size = 1

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        endpoint: str = "chat",
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 6,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        retry_after_max_s: float = 300.0,
        requests_per_s: float | None = None,
        tokens_per_min: float | None = None,
        extra_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        rng_seed: int | None = None,
    ) -> None:
        super().__init__()
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise ConfigError(
                "the 'openai' backend needs httpx",
                "pip install 'kdforge[serving]' (or pip install httpx)",
            ) from None
        if endpoint not in ("chat", "completions"):
            raise ConfigError(f"unknown endpoint {endpoint!r}", "use 'chat' or 'completions'")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.extra_body = dict(extra_body or {})
        self.api_key_env = api_key_env
        self.http = RetryingPoster(
            headers=headers, secret=api_key_from_env(api_key_env, "backend.api_key_env"), concurrency=concurrency,
            timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_retries=max_retries,
            backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s, retry_after_max_s=retry_after_max_s,
            requests_per_s=requests_per_s, tokens_per_min=tokens_per_min, rng_seed=rng_seed, stats=self.stats, logger=log)

    @classmethod
    def from_config(cls, cfg: OpenAIConfig) -> OpenAIBackend:
        return cls(
            cfg.base_url, cfg.model, endpoint=cfg.endpoint, api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency, timeout_s=cfg.timeout_s,
            connect_timeout_s=cfg.connect_timeout_s, max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s, backoff_max_s=cfg.backoff_max_s,
            retry_after_max_s=cfg.retry_after_max_s, requests_per_s=cfg.requests_per_s,
            tokens_per_min=cfg.tokens_per_min, extra_body=cfg.extra_body, headers=cfg.headers,
        )

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "base_url": self.base_url, "model": self.model,
                "endpoint": self.endpoint, "concurrency": self.concurrency,
                "api_key_env": self.api_key_env}

    # ---- HTTP ------------------------------------------------------------------------------
    async def aclose(self) -> None:
        await self.http.aclose()

    def _body(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        p = req.params
        body: dict[str, Any] = {"model": self.model, "max_tokens": p["max_tokens"],
                                "temperature": p["temperature"], "top_p": p["top_p"]}
        if p.get("stop"):
            body["stop"] = p["stop"]
        if p.get("seed") is not None:
            body["seed"] = p["seed"]
        if self.endpoint == "chat":
            messages: list[Message] = (req.prompt if isinstance(req.prompt, list)
                                       else [{"role": "user", "content": req.prompt}])
            body["messages"] = messages
            path = "/chat/completions"
        else:
            if isinstance(req.prompt, list):
                raise ConfigError(
                    "chat messages cannot be sent to the /v1/completions endpoint",
                    "set backend.endpoint: chat, or give plain text prompts",
                )
            body["prompt"] = req.prompt
            path = "/completions"
        body.update(self.extra_body)
        return self.base_url + path, body

    @staticmethod
    def _estimate_tokens(req: GenerationRequest) -> float:
        text = req.prompt if isinstance(req.prompt, str) else " ".join(m.get("content", "") for m in req.prompt)
        return len(text) / 4.0 + req.params["max_tokens"]

    def _parse(self, req: GenerationRequest, data: Any) -> GenerationResult:
        try:
            choice = data["choices"][0]
            text = (choice["message"].get("content") if self.endpoint == "chat" else choice["text"]) or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise GenerationError(
                f"the server's answer to request {req.id} has no choices[0] text: {str(data)[:200]}",
                "check that base_url points at an OpenAI-compatible API and endpoint matches it",
            ) from None
        text, stopped = truncate_at_stop(text, req.params.get("stop") or [])
        usage = data.get("usage") or {}
        return GenerationResult(
            text=text,
            finish_reason="stop" if stopped else choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            model=data.get("model"),
        )

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, req: GenerationRequest) -> GenerationResult | BaseException:
        try:
            url, body = self._body(req)
        except ConfigError as exc:
            return exc
        est = self._estimate_tokens(req)
        try:
            data = await self.http.post(
                url, body, cost=est, what=f"request {req.id}",
                on_reject=lambda status, last: GenerationError(f"request {req.id} was rejected by {url} ({last})",
                                                               _fix_for_status(status, self.api_key_env)),
                on_exhausted=lambda last: GenerationError(
                    f"request {req.id} to {url} failed after {self.http.max_retries + 1} attempt(s); last error: {last}",
                    "check the server (is it up? overloaded?); rerun the same command to resume: "
                    "finished requests are kept and skipped",
                ))
            result = self._parse(req, data)
        except GenerationError as exc:
            return exc
        used = result.prompt_tokens + result.completion_tokens
        if used:
            self.http.refund(est - used)
        return result


def _fix_for_status(status: int, api_key_env: str | None) -> str:
    if status in (401, 403):
        return (f"check the API key in ${api_key_env}" if api_key_env
                else "the server wants an API key: set backend.api_key_env to the NAME of the variable holding it")
    if status == 404:
        return "check backend.base_url (include the /v1 prefix), backend.endpoint and backend.model"
    return "check the request parameters (model name, max_tokens, sampling settings) against the server's limits"
