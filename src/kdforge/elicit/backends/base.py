"""The one small interface every teacher backend implements.

A backend turns a batch of :class:`~kdforge.elicit.types.GenerationRequest` into results. The
engine decides *what* to generate (skipping finished ids, journaling results); the backend only
decides *how*: a local model generates a whole batch in one ``generate`` call, an HTTP backend
sends one request per item with a concurrency limit. Two numbers tell the engine how to feed a
backend: ``batch_size`` (requests per :meth:`Backend.generate_batch` call) and ``concurrency``
(how many such calls may be in flight at once).

Backends register their class under the config ``type`` that selects them
(:func:`register_backend`); :func:`~kdforge.elicit.backends.config.build_backend` looks the class
up here (:func:`backend_class`) and calls its :meth:`Backend.from_config`, so the config models
never import the backend modules (the package ``__init__`` imports them, which registers them).
This module imports no backend and no config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kdforge.elicit.types import GenerationRequest, GenerationResult
from kdforge.errors import ConfigError

__all__ = ["Backend", "BackendStats", "backend_class", "register_backend", "registered_backends",
           "truncate_at_stop"]

B = TypeVar("B", bound="type[Backend]")

#: config ``type`` -> backend class (filled by :func:`register_backend` at backend import)
_BACKENDS: dict[str, type[Backend]] = {}


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut ``text`` before the first occurrence of any stop string (OpenAI semantics: the stop
    string itself is not returned). Returns (text, whether a stop string was found).

    The stop contract every backend honours (the HTTP servers apply it themselves; local
    backends call this on the decoded text)."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


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

    @classmethod
    def from_config(cls, config: Any) -> Backend:
        """A backend built from its validated config (``kdforge.elicit.backends.config``)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

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


def register_backend(kind: str) -> Callable[[B], B]:
    """Class decorator: the backend built for configs with ``type: kind``.

    Re-registering the same class (a module reload) replaces it; another class under a taken
    ``kind`` is a :class:`~kdforge.errors.ConfigError`.
    """

    def deco(cls: B) -> B:
        old = _BACKENDS.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"backend type {kind!r} is already registered by {old.__qualname__}",
                              f"register {cls.__qualname__} under another type name")
        _BACKENDS[kind] = cls
        return cls

    return deco


def backend_class(kind: str) -> type[Backend]:
    """The backend class registered for config ``type: kind``."""
    try:
        return _BACKENDS[kind]
    except KeyError:
        raise ConfigError(f"no backend is registered for type {kind!r}",
                          f"use one of {sorted(_BACKENDS)}, or import the module that registers it") from None


def registered_backends() -> list[str]:
    """The config ``type`` names that have a backend."""
    return sorted(_BACKENDS)
