"""The resumable teacher-generation engine.

``GenerationEngine(backend, output_dir).run(requests)`` sends every request whose id is not
already stored in ``output_dir`` to the backend and journals each finished result at once
(:mod:`kdforge.elicit.store`). Rerunning the same job skips finished ids, so the engine is
idempotent and a crash loses at most the requests in flight. A progress bar shows requests/s
and token counts; :class:`GenerationSummary` (also written to ``summary.json``) reports
generated/skipped/failed counts, tokens, throughput, retries and an optional cost estimate.

Example::

    from kdforge.elicit import GenerationEngine, SamplingParams, build_requests
    from kdforge.elicit.backends.openai_backend import OpenAIBackend

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", "my-model", concurrency=16)
    reqs = build_requests(["Define entropy."], SamplingParams(n=4, temperature=0.8, seed=0))
    summary = GenerationEngine(backend, "outputs/gen").run(reqs)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdforge.elicit.backends.base import Backend
from kdforge.elicit.store import ShardedStore, read_records
from kdforge.elicit.types import (
    GenerationRequest,
    GenerationResult,
    Message,
    SamplingParams,
    build_requests,
)
from kdforge.errors import CacheError, ConfigError, GenerationError, KdforgeError
from kdforge.io import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class GenerationSummary:
    """End-of-job numbers (also written to ``OUTPUT_DIR/summary.json``)."""

    output_dir: str
    requests: int = 0            # distinct request ids in this job
    skipped: int = 0             # already finished before this run (resume)
    generated: int = 0           # finished in this run
    failed: int = 0              # failed for good in this run (rerun to retry them)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    requests_per_s: float = 0.0
    completion_tokens_per_s: float = 0.0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cost_usd: float | None = None
    backend: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.skipped + self.generated == self.requests

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"requests {self.requests}: {self.generated} generated, {self.skipped} already done, {self.failed} failed",
            f"tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion "
            f"({self.completion_tokens_per_s:.1f} completion tok/s, {self.requests_per_s:.2f} req/s, {self.elapsed_s:.1f} s)",
        ]
        if self.retries or self.errors:
            lines.append(f"retries {self.retries}; transient errors: {self.errors}")
        if self.cost_usd is not None:
            lines.append(f"estimated cost ${self.cost_usd:.4f}")
        lines.append(f"output: {self.output_dir}")
        return "\n".join(lines)


class GenerationEngine:
    """Drive a :class:`Backend` over requests, resumably (see module docstring).

    Args:
        backend: the teacher.
        output_dir: where the sharded output lives (shared by reruns of the same job).
        shard_size: records per sealed shard.
        fmt: ``"jsonl"`` or ``"parquet"`` shards.
        progress: show a tqdm progress bar.
        on_error: ``"raise"`` stops launching new work after the first request that failed
            for good (in-flight work is still saved) and raises :class:`GenerationError`;
            ``"skip"`` keeps going and reports the failures in the summary.
        price_per_1k_prompt / price_per_1k_completion: USD per 1000 tokens, for the cost
            estimate (``None``: no estimate).
    """

    def __init__(
        self,
        backend: Backend,
        output_dir: str | os.PathLike,
        *,
        shard_size: int = 1000,
        fmt: Literal["jsonl", "parquet"] = "jsonl",
        progress: bool = True,
        on_error: Literal["raise", "skip"] = "raise",
        price_per_1k_prompt: float | None = None,
        price_per_1k_completion: float | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}", "pick one")
        self.backend = backend
        self.output_dir = Path(output_dir)
        self.shard_size = shard_size
        self.fmt = fmt
        self.progress = progress
        self.on_error = on_error
        self.price = (price_per_1k_prompt, price_per_1k_completion)

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.price[0] is None and self.price[1] is None:
            return None
        return (prompt_tokens * (self.price[0] or 0.0) + completion_tokens * (self.price[1] or 0.0)) / 1000.0

    def run(self, requests: Sequence[GenerationRequest]) -> GenerationSummary:
        """Synchronous entry point (runs its own event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(requests))
        raise GenerationError(
            "GenerationEngine.run() was called inside a running event loop",
            "use `await engine.arun(requests)` from async code (e.g. Jupyter)",
        )

    async def arun(self, requests: Sequence[GenerationRequest]) -> GenerationSummary:
        unique: dict[str, GenerationRequest] = {}
        for r in requests:
            unique.setdefault(r.id, r)
        if len(unique) < len(requests):
            log.info("%d duplicate request(s) collapsed (identical prompt, params and sample index)",
                     len(requests) - len(unique))
        summary = GenerationSummary(output_dir=str(self.output_dir), requests=len(unique),
                                    backend=self.backend.describe())
        first_error: BaseException | None = None
        start = time.monotonic()
        with ShardedStore(self.output_dir, shard_size=self.shard_size, fmt=self.fmt) as store:
            done = store.done_ids()
            changed = [r.id for r in unique.values()
                       if r.id in done and store.fingerprint(r.id) not in (None, r.fingerprint)]
            if changed:
                raise CacheError(
                    f"{self.output_dir} already holds results for {len(changed)} of these request ids "
                    f"(e.g. {changed[0]!r}) made from a different prompt or sampling setting",
                    "the data, template or sampling changed while the ids (data.id_field) stayed the "
                    "same: write to a new output_dir, or delete the old one to regenerate",
                )
            pending = [r for r in unique.values() if r.id not in done]
            summary.skipped = len(unique) - len(pending)
            if summary.skipped:
                log.info("resuming: %d of %d request(s) already done in %s",
                         summary.skipped, len(unique), self.output_dir)
            bs = max(1, self.backend.batch_size)
            batches = [pending[i:i + bs] for i in range(0, len(pending), bs)]
            bar = _progress_bar(len(pending), self.progress)
            stop = asyncio.Event()
            next_batch = iter(batches)

            async def worker() -> None:
                nonlocal first_error
                for batch in next_batch:  # shared iterator: each batch is taken once
                    if stop.is_set():
                        return
                    results = await self.backend.generate_batch(batch)
                    records = []
                    for req, res in zip(batch, results, strict=True):
                        if isinstance(res, BaseException):
                            summary.failed += 1
                            log.warning("request %s failed: %s", req.id, res)
                            if first_error is None:
                                first_error = res
                            if self.on_error == "raise":
                                stop.set()
                            continue
                        records.append(_record(req, res))
                        summary.prompt_tokens += res.prompt_tokens
                        summary.completion_tokens += res.completion_tokens
                    summary.generated += store.append(records)
                    bar.update(len(batch))
                    el = max(time.monotonic() - start, 1e-9)
                    cost = self._cost(summary.prompt_tokens, summary.completion_tokens)
                    bar.set_postfix_str(
                        f"tok in={summary.prompt_tokens} out={summary.completion_tokens} "
                        f"({summary.completion_tokens / el:.1f} out tok/s)"
                        + (f" ${cost:.4f}" if cost is not None else "")
                        + (f" fail={summary.failed}" if summary.failed else ""),
                        refresh=False,
                    )

            try:
                n_workers = max(1, min(self.backend.concurrency, len(batches)))
                await asyncio.gather(*(worker() for _ in range(n_workers)))
            finally:
                bar.close()
                await self.backend.aclose()
                summary.elapsed_s = time.monotonic() - start
        el = max(summary.elapsed_s, 1e-9)
        summary.requests_per_s = summary.generated / el
        summary.completion_tokens_per_s = summary.completion_tokens / el
        summary.retries = self.backend.stats.retries
        summary.errors = dict(self.backend.stats.errors)
        summary.cost_usd = self._cost(summary.prompt_tokens, summary.completion_tokens)
        write_json_atomic(self.output_dir / "summary.json", summary.to_dict())
        log.info("generation finished:\n%s", summary.format())
        if first_error is not None and self.on_error == "raise":
            cause, cause_fix = split_error(first_error)
            raise GenerationError(
                f"{summary.failed} request(s) failed for good ({cause}); "
                f"{summary.skipped + summary.generated} of {summary.requests} are saved in {self.output_dir}",
                (f"{cause_fix.rstrip('.')}; then rerun" if cause_fix else "fix the cause and rerun")
                + " the same command: finished requests are skipped "
                "(or set on_error: skip to keep going past failures)",
            )
        return summary


def split_error(exc: BaseException) -> tuple[str, str | None]:
    """(problem, fix) of an error, so a wrapping error can say both once: a
    :class:`~kdforge.errors.KdforgeError` keeps its own fix; any other exception is
    ``"TypeName: message"`` with no fix."""
    if isinstance(exc, KdforgeError):
        return exc.problem, exc.fix
    return f"{type(exc).__name__}: {exc}", None


def _record(req: GenerationRequest, res: GenerationResult) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": req.id,
        "fingerprint": req.fingerprint,
        "prompt": req.prompt,
        "sample_index": req.sample_index,
        "text": res.text,
        "finish_reason": res.finish_reason,
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "model": res.model,
        "params": req.params,
        "meta": req.meta,
    }
    rec.update(res.extra)
    return rec


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="req", desc="generate", disable=not enabled, dynamic_ncols=True)


def generate(
    prompts: Sequence[str | list[Message]],
    backend: Backend,
    output_dir: str | os.PathLike,
    params: SamplingParams | None = None,
    *,
    ids: list[str] | None = None,
    metas: list[dict[str, Any]] | None = None,
    namespace: str = "",
    **engine_kwargs: Any,
) -> tuple[GenerationSummary, list[dict[str, Any]]]:
    """Generate ``params.n`` samples per prompt into ``output_dir``; return the summary and
    this job's records (in request order; failed ones missing).

    Re-running with the same arguments resumes/does nothing; records from other jobs that share
    the folder are not returned.
    """
    params = params or SamplingParams()
    reqs = build_requests(list(prompts), params, ids=ids, metas=metas, namespace=namespace)
    summary = GenerationEngine(backend, output_dir, **engine_kwargs).run(reqs)
    return summary, collect(output_dir, reqs)


def collect(output_dir: str | os.PathLike, requests: Sequence[GenerationRequest]) -> list[dict[str, Any]]:
    """Records of ``requests`` found in ``output_dir``, in request order."""
    by_id = {r["id"]: r for r in read_records(output_dir)}
    seen: set[str] = set()
    out = []
    for r in requests:
        if r.id in by_id and r.id not in seen:
            seen.add(r.id)
            out.append(by_id[r.id])
    return out
