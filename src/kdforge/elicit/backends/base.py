"""The one small interface every teacher backend implements.

A backend turns a batch of :class:`~kdforge.elicit.types.GenerationRequest` into results. The
engine decides *what* to generate (skipping finished ids, journaling results); the backend only
decides *how*: a local model generates a whole batch in one ``generate`` call, an HTTP backend
sends one request per item with a concurrency limit. Two numbers tell the engine how to feed a
backend: ``batch_size`` (requests per :meth:`Backend.generate_batch` call) and ``concurrency``
(how many such calls may be in flight at once).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from kdforge.elicit.types import GenerationRequest, GenerationResult


@dataclass
class BackendStats:
    """Counters a backend keeps for the end-of-job summary."""

    requests: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Backend(ABC):
    """A teacher that generates text.

    Subclasses set ``batch_size`` and ``concurrency`` and implement :meth:`generate_batch`.
    ``generate_batch`` returns one item per request, in order: a :class:`GenerationResult`, or
    an exception instance for a request that failed for good (retries exhausted) so that one
    bad request does not discard the rest of its batch.
    """

    name: str = "backend"
    batch_size: int = 1
    concurrency: int = 1

    def __init__(self) -> None:
        self.stats = BackendStats()

    @abstractmethod
    async def generate_batch(
        self, requests: list[GenerationRequest]
    ) -> list[GenerationResult | BaseException]: ...

    async def aclose(self) -> None:
        """Release connections/threads. Called once by the engine when the job ends."""
        return None

    def describe(self) -> dict[str, Any]:
        """Public settings for logs and the run summary (never secrets)."""
        return {"backend": self.name}

    def score_continuations(self, prompt: str | list[dict[str, str]],
                            continuations: list[str]) -> list[float]:
        """Sum of log p(continuation | prompt) for each continuation (nats).

        Only backends with access to the model's logits implement this (the local
        transformers backend); others raise :class:`~kdforge.errors.ConfigError`.
        """
        from kdforge.errors import ConfigError

        raise ConfigError(
            f"backend {self.name!r} cannot score continuations by log-likelihood",
            "use the local 'transformers' backend for log-likelihood label scoring, "
            "or set labeling.score_loglik: false",
        )
