"""Teacher backends behind one interface (:class:`~kdforge.elicit.backends.base.Backend`).

* ``transformers``: a local Hugging Face model, batched ``generate`` with left padding.
* ``openai``: any OpenAI-compatible HTTP endpoint (vLLM, TGI, llama.cpp, ``transformers
  serve``, hosted APIs), async with retries, backoff and rate limits.
* ``vllm``: vLLM's offline engine (optional extra ``kdforge[vllm]``).

Backend modules import their heavy dependencies lazily; importing them here registers each
class under its config ``type`` (:func:`~kdforge.elicit.backends.base.register_backend`), and
:func:`build_backend` picks one from a config by its ``type``.
"""

from __future__ import annotations

from kdforge.elicit.backends import openai_backend, transformers_backend, vllm_backend  # noqa: F401  (register)
from kdforge.elicit.backends.base import Backend, BackendStats
from kdforge.elicit.backends.config import (
    BackendConfig,
    OpenAIConfig,
    TransformersConfig,
    VLLMConfig,
    build_backend,
)

__all__ = [
    "Backend",
    "BackendStats",
    "BackendConfig",
    "OpenAIConfig",
    "TransformersConfig",
    "VLLMConfig",
    "build_backend",
]
