"""Validated backend configs (the ``backend:`` section of a generation recipe).

The models here import no backend module: :func:`build_backend` finds the backend class of a
config's ``type`` in the registry of :mod:`kdforge.elicit.backends.base`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from kdforge.config import StrictModel
from kdforge.elicit.backends.base import Backend, backend_class


class TransformersConfig(StrictModel):
    """A local Hugging Face causal LM (a Hub id or a local folder)."""

    type: Literal["transformers"] = "transformers"
    model: str = Field(description="asset name (smollm2 or asset:smollm2), local folder, or Hub id "
                                   "(read like llm_kd's teacher.model)")
    tokenizer: str | None = Field(None, description="defaults to `model`")
    gguf_file: str | None = Field(None, description="GGUF file inside `model` (dequantised on load)")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda:0', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(8, ge=1)
    chat_template: bool = Field(True, description="apply the tokenizer's chat template to chat prompts")
    trust_remote_code: bool = False


class OpenAIConfig(StrictModel):
    """Any OpenAI-compatible HTTP endpoint."""

    type: Literal["openai"] = "openai"
    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1 (the /v1 prefix included)")
    model: str
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="/v1/chat/completions (messages) or /v1/completions (text prompts)")
    api_key_env: str | None = Field(
        None, description="NAME of the environment variable holding the API key (never the key)")
    concurrency: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    retry_after_max_s: float = Field(300.0, ge=0, description="longest Retry-After honoured")
    requests_per_s: float | None = Field(None, gt=0)
    tokens_per_min: float | None = Field(None, gt=0)
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra JSON fields sent as-is")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers (no secrets)")


class VLLMConfig(StrictModel):
    """vLLM's offline engine (``pip install 'kdforge[vllm]'``)."""

    type: Literal["vllm"] = "vllm"
    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = None
    batch_size: int = Field(256, ge=1)
    trust_remote_code: bool = False
    chat_template: str | None = Field(
        None, description="Jinja chat template (text or file path) instead of the tokenizer's")
    seed: int = Field(0, description="engine seed (each request still carries its own sampling seed)")


BackendConfig = Annotated[TransformersConfig | OpenAIConfig | VLLMConfig, Field(discriminator="type")]


def build_backend(config: TransformersConfig | OpenAIConfig | VLLMConfig) -> Backend:
    """Instantiate the backend a config describes (heavy imports happen here, in the backend).

    Raises:
        ConfigError: no backend is registered for ``config.type``, or the backend's optional
            dependency is missing (e.g. ``vllm``).
    """
    return backend_class(config.type).from_config(config)
