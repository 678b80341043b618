"""Requests, sampling parameters and results shared by the engine and every backend.

A *request* is one generation call: one prompt (plain text for ``/v1/completions``-style
models, or a list of chat messages) and one sample index. ``n`` samples per prompt become ``n``
requests, each with its own stable id, so a resumed job can tell exactly which samples exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

from kdforge.config import StrictModel
from kdforge.errors import ConfigError

Message = dict[str, str]


class SamplingParams(StrictModel):
    """How the teacher samples. Mirrors the OpenAI API names.

    ``temperature: 0`` means greedy decoding. ``seed`` is the base seed: sample ``i`` of a
    prompt uses ``seed + i`` so the samples differ but each one is reproducible.
    """

    n: int = Field(1, ge=1, le=1024, description="samples per prompt")
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the output)")
    seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def for_sample(self, index: int) -> dict[str, Any]:
        """Per-request parameters (``n`` removed, the seed offset by the sample index)."""
        out = self.model_dump(exclude={"n"})
        if self.seed is not None:
            out["seed"] = self.seed + index
        return out


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_id(prompt: str | list[Message], params: dict[str, Any], sample_index: int,
               *, namespace: str = "") -> str:
    """Stable id of one request: SHA-256 of (namespace, prompt, sampling params, sample index).

    The same prompt with the same parameters always gets the same id, on any machine, so a
    rerun recognises finished work. 24 hex characters (96 bits) keep collisions negligible.
    """
    payload = _canonical({"ns": namespace, "prompt": prompt, "params": params, "i": sample_index})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


@dataclass
class GenerationRequest:
    """One generation call.

    Attributes:
        id: stable request id (see :func:`request_id`), or ``"<user id>#<sample index>"``.
        prompt: plain text (completion models) or a list of ``{"role", "content"}`` messages.
        params: per-request sampling parameters (:meth:`SamplingParams.for_sample`).
        sample_index: which of the ``n`` samples of its prompt this is.
        meta: user fields carried through to the output record (e.g. the source row).
    """

    id: str
    prompt: str | list[Message]
    params: dict[str, Any]
    sample_index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def fingerprint(self) -> str:
        """Hash of what the request asks (prompt + params + sample index), stored with its
        result so a resumed job can tell that an id now means a different request."""
        return request_id(self.prompt, self.params, self.sample_index)[:16]


@dataclass
class GenerationResult:
    """What a backend returns for one request."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_requests(
    prompts: list[str | list[Message]],
    params: SamplingParams,
    *,
    ids: list[str] | None = None,
    metas: list[dict[str, Any]] | None = None,
    namespace: str = "",
) -> list[GenerationRequest]:
    """Expand prompts into ``len(prompts) * params.n`` requests with stable ids.

    With ``ids`` (a user id column), request ids are ``f"{id}#{sample_index}"``; the user ids
    must be unique. Otherwise ids are content hashes (:func:`request_id`).
    """
    if ids is not None:
        if len(ids) != len(prompts):
            raise ConfigError(f"{len(ids)} ids for {len(prompts)} prompts", "give one id per prompt")
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        if dup:
            raise ConfigError(
                f"the id column has {len(dup)} duplicate value(s), e.g. {dup[0]!r}",
                "make the id column unique, or drop id_field to use content hashes",
            )
    out: list[GenerationRequest] = []
    for j, prompt in enumerate(prompts):
        for i in range(params.n):
            p = params.for_sample(i)
            rid = f"{ids[j]}#{i}" if ids is not None else request_id(prompt, p, i, namespace=namespace)
            out.append(GenerationRequest(rid, prompt, p, i, dict(metas[j]) if metas else {}))
    return out
