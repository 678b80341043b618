"""One retrying JSON-over-HTTP client for every OpenAI-compatible caller.

The generation backend (:class:`~kdforge.elicit.backends.openai_backend.OpenAIBackend`) and the
served teacher (:class:`~kdforge.teachers.sources.served.ServedTeacher`) talk to the same kind of
server and need the same reliability contract, written here once:

* an ``httpx.AsyncClient`` with at most ``concurrency`` connections, a connect timeout and a
  total read timeout, never routed through a proxy from the environment;
* retried with exponential backoff and full jitter: HTTP 408/409/425/429/5xx, connection errors,
  timeouts and unparseable bodies; a ``Retry-After`` header replaces the backoff (capped);
* other 4xx fail at once (repeating them cannot help);
* optional rate limits: requests/s and tokens/min token buckets (a caller may refund an
  over-estimated token cost);
* the API key is read from the environment variable *named* by the caller and redacted from
  every message.

Callers say what an error means for them (``on_reject``, ``on_exhausted``); the policy is shared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from typing import Any

from kdforge.elicit.backends.base import BackendStats
from kdforge.elicit.backends.ratelimit import TokenBucket, backoff_delay, parse_retry_after
from kdforge.errors import ConfigError, GenerationError

log = logging.getLogger(__name__)

__all__ = ["RETRY_STATUS", "RetryingPoster", "api_key_from_env"]

RETRY_STATUS = frozenset({408, 409, 425, 429})


def api_key_from_env(env_name: str | None, setting: str) -> str | None:
    """The key in the environment variable ``env_name`` (None when no variable is named).

    Raises:
        ConfigError: the variable is named (by ``setting``, e.g. ``backend.api_key_env``) but unset.
    """
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ConfigError(
            f"{setting} names the environment variable {env_name!r}, which is not set",
            f"export {env_name}=<your key> before running (the key is never written to configs or logs)",
        )
    return key


class RetryingPoster:
    """POST JSON bodies under the shared retry, rate-limit and redaction policy (module docstring)."""

    def __init__(
        self,
        *,
        headers: Mapping[str, str] | None = None,
        secret: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 6,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        retry_after_max_s: float = 300.0,
        requests_per_s: float | None = None,
        tokens_per_min: float | None = None,
        rng_seed: int | None = None,
        stats: BackendStats | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.secret = secret
        if secret:
            self.headers["Authorization"] = f"Bearer {secret}"
        self.concurrency, self.timeout_s, self.connect_timeout_s = concurrency, timeout_s, connect_timeout_s
        self.max_retries, self.backoff_base_s, self.backoff_max_s = max_retries, backoff_base_s, backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.rps = TokenBucket(requests_per_s, max(1.0, requests_per_s)) if requests_per_s else None
        self.tpm = TokenBucket(tokens_per_min / 60.0, tokens_per_min) if tokens_per_min else None
        self.rng = random.Random(rng_seed)
        self.stats = stats if stats is not None else BackendStats()
        self.log = logger or log  # the caller's logger: retries show up under the component that asked
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                headers=self.headers,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                trust_env=False,  # never route a loopback/private server through a proxy from the environment
            )
        return self._client

    def forget_client(self) -> None:
        """Drop the client without closing it (its event loop is gone, e.g. after a copy)."""
        self._client = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text

    def refund(self, tokens: float) -> None:
        """Give back an over-estimated token cost to the tokens/min bucket."""
        if self.tpm is not None and tokens:
            self.tpm.refund(tokens)

    async def post(self, url: str, body: dict[str, Any], *, cost: float,
                   on_reject: Callable[[int, str], GenerationError],
                   on_exhausted: Callable[[str], GenerationError], what: str = "request") -> Any:
        """The JSON answer to ``body``; raises ``on_reject(status, last)`` for a 4xx that is not
        retried and ``on_exhausted(last)`` when every attempt failed (``last``: the last error, redacted)."""
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            if self.rps is not None:
                await self.rps.acquire(1.0)
            if self.tpm is not None:
                await self.tpm.acquire(cost)
            delay: float | None = None
            self.stats.requests += 1
            try:
                resp = await self.client().post(url, json=body)
            except httpx.TransportError as exc:  # refused, reset, dropped, timed out
                kind = type(exc).__name__
                self.stats.count_error(kind)
                last = f"{kind}: {self.redact(str(exc)) or 'connection failed'}"
            else:
                status = resp.status_code
                if status == 200:
                    try:
                        return resp.json()
                    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                        self.stats.count_error("bad_json")
                        last = "HTTP 200 with a body that is not JSON"
                else:
                    self.stats.count_error(f"http_{status}")
                    last = f"HTTP {status}: {self.redact(resp.text[:300])}"
                    if not (status in RETRY_STATUS or status >= 500):
                        raise on_reject(status, last)
                    retry_after = parse_retry_after(resp.headers.get("retry-after"))
                    if retry_after is not None:
                        delay = min(retry_after, self.retry_after_max_s)
            if attempt == self.max_retries:
                break
            if delay is None:
                delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self.rng)
            self.stats.retries += 1
            self.log.debug("%s attempt %d failed (%s); retrying in %.2fs", what, attempt + 1, last, delay)
            await asyncio.sleep(delay)
        raise on_exhausted(last)
