""":class:`ServedTeacher`: a teacher behind an OpenAI-compatible ``/v1/completions`` endpoint.

Each row of the batch is sent as a token-id prompt (``"prompt": [ids...]``, no re-tokenisation)
and the server scores the prompt itself: for every prompt position ``j >= 1`` it returns the
teacher's top-k next-token log-probabilities given tokens ``< j``. Position ``j`` of the answer
is the distribution of token ``j``, i.e. loss position ``j - 1`` of a causal LM, so the signal is
a :class:`~kdforge.losses.signal.SparseTeacher` ``[B, T-1, k]`` at the task's loss positions,
exactly like a top-k cache but computed on the fly (it can score on-policy samples).

Protocols (``protocol=``):

* ``"prompt_logprobs"`` (default; vLLM ``vllm serve``): the request carries
  ``prompt_logprobs=k``; each choice's ``prompt_logprobs`` is a list, one entry per prompt token
  (``null`` first), each a ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` map holding
  the top-k *and* the actual prompt token (so k or k+1 entries). Keys are token ids: exact.
* ``"echo"`` (the legacy OpenAI form: ``echo=true``, ``logprobs=k``): each choice's
  ``logprobs.top_logprobs`` is a list of ``{token: logprob}`` maps. With ``token_ids=True``
  (default) the request also sends vLLM's ``return_tokens_as_token_ids=true`` and keys read
  ``"token_id:<id>"``: exact. With ``token_ids=False`` keys are token *strings* and are mapped
  back through ``tokenizer`` (its ``decode([id])`` strings, then its raw token pieces); a string
  several ids decode to (byte fragments decode to U+FFFD) cannot be mapped and is an error.

Supported servers: vLLM (both protocols; ``--max-logprobs`` bounds k, default 20). SGLang and
llama.cpp expose prompt logprobs through other, non-OpenAI fields and are not supported here.
``transformers serve`` (checked on transformers 5.24) cannot be used: its ``/v1/completions``
takes only a *string* prompt, ignores ``echo`` and ``logprobs`` with a warning, and answers
``prompt_logprobs`` / ``return_tokens_as_token_ids`` with HTTP 422; its chat endpoint ignores
``logprobs`` too. It returns no log-probabilities at all.

Reliability: requests go through ``httpx`` with the retry policy of the elicitation HTTP backend
(:mod:`kdforge.elicit.backends.openai_backend`: statuses 408/409/425/429/5xx and dropped
connections are retried with full-jitter exponential backoff, ``Retry-After`` is obeyed, other
4xx fail at once) and its token buckets (:mod:`kdforge.elicit.backends.ratelimit`). Rows are sent
concurrently (``concurrency``) from one background event loop owned by the source, so
``signal`` is a plain blocking call usable from any training loop (or a notebook's).

Padding: only the positions where ``attention_mask`` is 1 are sent (they must be contiguous:
right or left padding). Loss positions with no served distribution (padding, or the last real
token, whose successor is padding) hold a placeholder distribution, all mass on id 0 (entry 0
has log-prob 0, the others ``-inf`` padding entries); the loss masks them through the labels.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kdforge.errors import ConfigError, GenerationError
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

__all__ = ["PROTOCOLS", "ServedTeacher"]

log = logging.getLogger(__name__)

PROTOCOLS = ("prompt_logprobs", "echo")
_TOKEN_ID_PREFIX = "token_id:"
_NO_LOGPROBS_FIX = (
    "serve the teacher with vLLM (`vllm serve MODEL`), which returns prompt log-probabilities; "
    "transformers serve returns none (it ignores echo/logprobs), so it cannot be a ServedTeacher"
)


class ServedTeacher(TeacherSource):
    """Sparse top-k teacher signal from a served model (see the module docstring).

    Args:
        base_url: server root with the API prefix, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server expects.
        k: top-k entries per position (at most the server's ``--max-logprobs``).
        protocol: ``"prompt_logprobs"`` (vLLM's field, ids as keys) or ``"echo"``.
        token_ids: with ``protocol="echo"``, ask for ``"token_id:<id>"`` keys (vLLM's
            ``return_tokens_as_token_ids``); False maps token strings through ``tokenizer``.
        tokenizer: a Hugging Face tokenizer of the served model (only for ``token_ids=False``).
        vocab_size: the vocabulary the ids index into (default 0: the student's, filled in by the
            trainer's vocabulary alignment); ids at or beyond it are an error.
        max_tokens: tokens the server generates after the prompt (ignored here); vLLM accepts 0
            with ``echo`` (prompt only), older servers need 1.
        concurrency / timeout_s / connect_timeout_s / max_retries / backoff_base_s /
        backoff_max_s / retry_after_max_s / requests_per_s / tokens_per_min / api_key_env /
        headers / extra_body / rng_seed: as in :class:`~kdforge.elicit.backends.openai_backend.OpenAIBackend`
            (``api_key_env`` *names* the environment variable holding the key).

    Example::

        teacher = ServedTeacher("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B-Instruct", k=20)
        signal = teacher.signal(batch, task)        # signal.sparse: [B, T-1, 20]
    """

    provides = frozenset({"sparse"})
    scores_new_samples = True

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        k: int = 16,
        protocol: str = "prompt_logprobs",
        token_ids: bool = True,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        max_tokens: int = 1,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 6,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        retry_after_max_s: float = 300.0,
        requests_per_s: float | None = None,
        tokens_per_min: float | None = None,
        api_key_env: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        rng_seed: int | None = None,
    ) -> None:
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise ConfigError("ServedTeacher needs httpx", "pip install 'kdforge[serving]' (or pip install httpx)") from None
        from kdforge.elicit.backends.base import BackendStats
        from kdforge.elicit.backends.http import RetryingPoster, api_key_from_env

        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown ServedTeacher protocol {protocol!r}", f"use one of {', '.join(PROTOCOLS)}")
        if k < 1:
            raise ConfigError(f"ServedTeacher needs k >= 1, got {k}", "choose e.g. k=16 (vLLM allows up to --max-logprobs)")
        if protocol == "echo" and not token_ids and tokenizer is None:
            raise ConfigError(
                "ServedTeacher(protocol='echo', token_ids=False) maps token strings back to ids, but no tokenizer was given",
                "pass tokenizer=AutoTokenizer.from_pretrained(<the served model>), or keep token_ids=True (vLLM)",
            )
        if max_tokens < 0 or (max_tokens == 0 and protocol != "echo"):
            raise ConfigError(f"max_tokens={max_tokens} is not accepted with protocol={protocol!r}",
                              "use max_tokens=1 (0 is only valid with echo)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.k, self.protocol, self.token_ids = int(k), protocol, bool(token_ids)
        self.vocab_size = vocab_size
        self.max_tokens = int(max_tokens)
        self.concurrency = concurrency
        self.extra_body = dict(extra_body or {})
        self.api_key_env = api_key_env
        self.stats = BackendStats()
        self.http = RetryingPoster(
            headers=headers, secret=api_key_from_env(api_key_env, "ServedTeacher api_key_env"),
            concurrency=concurrency, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_retries=max_retries,
            backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s, retry_after_max_s=retry_after_max_s,
            requests_per_s=requests_per_s, tokens_per_min=tokens_per_min, rng_seed=rng_seed, stats=self.stats, logger=log)
        self._vocab = _StringVocab(tokenizer) if (protocol == "echo" and not token_ids) else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"ServedTeacher(base_url={self.base_url!r}, model={self.model!r}, k={self.k}, protocol={self.protocol!r})"

    # -- TeacherSource -----------------------------------------------------------------------------
    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        """Top-k ``[B, T-1, k]`` of the served teacher at ``task``'s loss positions."""
        if features is not None:
            raise ConfigError(
                "feature terms need the teacher's intermediate features, but the teacher is served over HTTP "
                "(it returns only top-k log-probabilities)",
                "train these terms with an OnlineTeacher (the model itself), or remove the feature terms",
            )
        _, kwargs = task.model_inputs(batch)
        input_ids = kwargs.get("input_ids")
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ConfigError(
                "ServedTeacher scores causal-LM token sequences, but the task's model inputs have no "
                "input_ids [batch, seq]",
                "use a served teacher with a causal-LM task, or an OnlineTeacher for classifiers",
            )
        sparse = self.score(input_ids, kwargs.get("attention_mask"))
        ids = task.to_loss_positions(sparse.ids, batch, what="served teacher top-k")
        logprobs = task.to_loss_positions(sparse.logprobs, batch, what="served teacher top-k")
        return TeacherSignal(sparse=SparseTeacher(ids, logprobs, sparse.vocab_size))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SparseTeacher:
        """Top-k ``[B, T-1, k]`` (ids int64, log-probs float32, on ``input_ids.device``): entry
        ``t`` is the served teacher's distribution of token ``t + 1`` given tokens ``<= t``."""
        rows, spans = _rows(input_ids, attention_mask)
        b, t = input_ids.shape
        ids = torch.zeros(b, max(t - 1, 0), self.k, dtype=torch.int64)
        logprobs = torch.full((b, max(t - 1, 0), self.k), -math.inf, dtype=torch.float32)
        logprobs[..., 0] = 0.0  # placeholder: all mass on id 0 where nothing is served
        answers = self._run(self._score_rows([r for r in rows if len(r) > 1]))
        served = iter(answers)
        for row, (start, tokens) in enumerate(zip(spans, rows, strict=True)):
            if len(tokens) <= 1:
                continue
            row_ids, row_lp = next(served)  # [L-1, k]: token j+1 given <= j, j = 0..L-2
            ids[row, start : start + len(tokens) - 1] = row_ids
            logprobs[row, start : start + len(tokens) - 1] = row_lp
        vocab = self.vocab_size if self.vocab_size is not None else 0
        if vocab and ids.numel() and int(ids.max()) >= vocab:
            raise GenerationError(
                f"the server returned token id {int(ids.max())}, outside vocab_size={vocab}",
                "serve the same model (tokenizer) the student was aligned to, or fix vocab_size",
            )
        return SparseTeacher(ids.to(input_ids.device), logprobs.to(input_ids.device), vocab)

    def close(self) -> None:
        """Close the HTTP connections and stop the background event loop (idempotent)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.http.aclose(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(30)
        loop.close()

    def __enter__(self) -> ServedTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable/deep-copyable: the loop is rebuilt lazily
        state = dict(self.__dict__)
        state.update(_loop=None, _thread=None, _lock=None)
        state["http"] = copy.copy(self.http)
        state["http"].forget_client()  # its connections belong to this object's event loop
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- requests ----------------------------------------------------------------------------------
    def _run(self, coro: Any) -> Any:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="kdforge-served-teacher",
                                                daemon=True)
                self._thread.start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def _body(self, tokens: list[int]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": tokens, "max_tokens": self.max_tokens,
                                "temperature": 0.0}
        if self.protocol == "prompt_logprobs":
            body["prompt_logprobs"] = self.k
        else:
            body.update(echo=True, logprobs=self.k)
            if self.token_ids:
                body["return_tokens_as_token_ids"] = True
        body.update(self.extra_body)
        return body

    async def _score_rows(self, rows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            async with gate:
                data = await self._post(self._body(tokens), cost=float(len(tokens) + self.max_tokens))
            return self._parse(data, tokens)

        return list(await asyncio.gather(*(one(r) for r in rows)))

    async def _post(self, body: dict[str, Any], *, cost: float) -> Any:
        """POST ``body`` to ``/completions`` under the shared retry policy (:mod:`kdforge.elicit.backends.http`)."""
        url = self.base_url + "/completions"
        return await self.http.post(
            url, body, cost=cost, what="teacher request",
            on_reject=lambda status, last: GenerationError(
                f"the teacher server {url} rejected the scoring request ({last})", self._fix_for_status(status)),
            on_exhausted=lambda last: GenerationError(
                f"the teacher server {url} did not answer after {self.http.max_retries + 1} attempt(s); last error: "
                f"{last}",
                "check that the server is up and base_url is right (include the /v1 prefix), "
                "or raise max_retries/timeout_s for an overloaded server",
            ))

    def _fix_for_status(self, status: int) -> str:
        if status in (401, 403):
            return (f"check the API key in ${self.api_key_env}" if self.api_key_env
                    else "the server wants an API key: set api_key_env to the NAME of the variable holding it")
        if status == 404:
            return "check base_url (include the /v1 prefix) and the model name"
        if status in (400, 422):
            return (f"the server refused the logprob request: vLLM caps k with --max-logprobs (asked k={self.k}; "
                    f"restart it with --max-logprobs {self.k} or lower k); {_NO_LOGPROBS_FIX}")
        return "check the request parameters against the server's limits"

    # -- parsing -----------------------------------------------------------------------------------
    def _parse(self, data: Any, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[L-1, k]`` ids and log-probs for a prompt of ``L`` tokens from one server answer."""
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise GenerationError(f"the server's answer has no choices[0]: {str(data)[:200]}",
                                  "check that base_url points at an OpenAI-compatible /v1 API") from None
        if self.protocol == "prompt_logprobs":
            per_pos = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
            field = "prompt_logprobs"
        else:
            lp = choice.get("logprobs") if isinstance(choice, dict) else None
            per_pos = lp.get("top_logprobs") if isinstance(lp, dict) else None
            field = "logprobs.top_logprobs"
        n = len(tokens)
        if not isinstance(per_pos, list) or not per_pos:
            raise GenerationError(f"the server's answer has no {field} (the prompt log-probabilities)", _NO_LOGPROBS_FIX)
        if len(per_pos) < n:
            raise GenerationError(
                f"the server returned {field} for {len(per_pos)} positions of a {n}-token prompt",
                "check that the server does not truncate prompts (max_model_len / truncate_prompt_tokens)",
            )
        ids = torch.empty(n - 1, self.k, dtype=torch.int64)
        logprobs = torch.empty(n - 1, self.k, dtype=torch.float32)
        for j in range(1, n):  # entry j: distribution of token j given tokens < j = loss position j-1
            entries = self._entries(per_pos[j], field, j)
            if len(entries) < self.k:
                raise GenerationError(
                    f"the server returned {len(entries)} log-probabilities at prompt position {j}, fewer than k={self.k}",
                    f"lower k to at most {len(entries)}, or start vLLM with --max-logprobs {self.k}",
                )
            entries.sort(key=lambda e: -e[1])
            top = entries[: self.k]
            ids[j - 1] = torch.tensor([e[0] for e in top], dtype=torch.int64)
            logprobs[j - 1] = torch.tensor([e[1] for e in top], dtype=torch.float32)
        return ids, logprobs

    def _entries(self, pos: Any, field: str, j: int) -> list[tuple[int, float]]:
        if not isinstance(pos, dict) or not pos:
            raise GenerationError(f"the server's {field} is empty at prompt position {j}", _NO_LOGPROBS_FIX)
        out: list[tuple[int, float]] = []
        for key, value in pos.items():
            lp = value.get("logprob") if isinstance(value, dict) else value
            if not isinstance(lp, int | float):
                raise GenerationError(f"the server's {field} at position {j} has no numeric logprob for {key!r}",
                                      _NO_LOGPROBS_FIX)
            out.append((self._token_id(key), float(lp)))
        return out

    def _token_id(self, key: str) -> int:
        if self.protocol == "prompt_logprobs":
            return _int_key(key, "prompt_logprobs keys must be token ids")
        if self.token_ids:
            if not key.startswith(_TOKEN_ID_PREFIX):
                raise GenerationError(
                    f"the server's top_logprobs key {key!r} is not of the form 'token_id:<id>'",
                    "use vLLM (it honours return_tokens_as_token_ids), or token_ids=False with the model's tokenizer",
                )
            return _int_key(key[len(_TOKEN_ID_PREFIX):], "token_id:<id> keys must hold an integer")
        assert self._vocab is not None
        return self._vocab.lookup(key)


def _int_key(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise GenerationError(f"unexpected logprob key {text!r}: {what}",
                              "check that the server speaks vLLM's completions protocol") from None


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[list[list[int]], list[int]]:
    """Per row: the real token ids and the position of the first one (padding must be contiguous)."""
    ids = input_ids.detach().cpu()
    if attention_mask is None:
        return [r.tolist() for r in ids], [0] * ids.shape[0]
    mask = attention_mask.detach().cpu().bool()
    rows, starts = [], []
    for b in range(ids.shape[0]):
        where = mask[b].nonzero().flatten()
        if where.numel() == 0:
            rows.append([])
            starts.append(0)
            continue
        start, end = int(where[0]), int(where[-1]) + 1
        if where.numel() != end - start:
            raise ConfigError(
                f"row {b} of the attention mask has holes; a served teacher scores one contiguous sequence per row",
                "pad on one side only (right or left); for packed sequences use an OnlineTeacher",
            )
        rows.append(ids[b, start:end].tolist())
        starts.append(start)
    return rows, starts


class _StringVocab:
    """Token string -> id through a tokenizer: ``decode([id])`` strings first, then raw pieces."""

    def __init__(self, tokenizer: Any) -> None:
        size = len(tokenizer)
        self.decoded: dict[str, int] = {}
        self.ambiguous: set[str] = set()
        for i in range(size):
            s = tokenizer.decode([i])
            if s in self.decoded:
                self.ambiguous.add(s)
            else:
                self.decoded[s] = i
        pieces: Sequence[str] = tokenizer.convert_ids_to_tokens(list(range(size)))
        self.pieces = {p: i for i, p in enumerate(pieces) if p is not None}

    def lookup(self, text: str) -> int:
        if text in self.decoded and text not in self.ambiguous:
            return self.decoded[text]
        if text in self.pieces:
            return self.pieces[text]
        if text in self.ambiguous:
            raise GenerationError(
                f"the server's token string {text!r} is what several token ids decode to; it cannot be mapped back",
                "use token_ids=True with vLLM (return_tokens_as_token_ids) or protocol='prompt_logprobs'",
            )
        raise GenerationError(
            f"the server's token string {text!r} is not a token of the given tokenizer",
            "pass the served model's own tokenizer, or use token_ids=True / protocol='prompt_logprobs' with vLLM",
        )
