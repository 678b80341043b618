"""Backend/job config validation, the optional vLLM backend, and device/dtype selection."""

from __future__ import annotations

import importlib.util

import pytest

from kdforge.config import validate
from kdforge.elicit.backends import VLLMConfig, build_backend
from kdforge.elicit.backends.transformers_backend import resolve_device, resolve_dtype
from kdforge.elicit.job import GenerateJobConfig
from kdforge.errors import ConfigError


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_installed_says_how_to_install_it():
    with pytest.raises(ConfigError, match=r"kdforge\[vllm\]"):
        build_backend(VLLMConfig(model="any"))


def test_task_sections_default_and_backend_type_selects_the_model():
    cfg = validate(GenerateJobConfig, {"task": "expand", "backend": {"type": "transformers", "model": "m"},
                                       "data": {"path": "x.jsonl"}})
    assert cfg.expansion is not None and cfg.expansion.target == 50
    assert type(cfg.backend).__name__ == "TransformersConfig"
    cur = validate(GenerateJobConfig, {"task": "curate", "data": {"path": "x.jsonl"},
                                       "curation": {"min_words": 2}})
    assert cur.backend is None  # curation without a judge needs no teacher
    with pytest.raises(ConfigError, match="needs a 'backend'"):
        validate(GenerateJobConfig, {"task": "curate", "data": {"path": "x.jsonl"},
                                     "curation": {"judge": {"threshold": 5}}})


def test_cpu_device_runs_in_float32_by_default():
    import torch

    dev = resolve_device("cpu")
    assert dev.type == "cpu" and resolve_dtype("auto", dev) == torch.float32
    assert resolve_dtype("bfloat16", dev) == torch.bfloat16


@pytest.mark.gpu
def test_auto_device_on_cuda_generates_in_half_precision(tiny_model_dir, tmp_path):
    import torch

    from kdforge.elicit import SamplingParams, generate
    from kdforge.elicit.backends import TransformersConfig

    b = build_backend(TransformersConfig(model=str(tiny_model_dir), device="auto"))
    assert b.device.type == "cuda" and next(b.model.parameters()).dtype in (torch.bfloat16, torch.float16)
    s, recs = generate(["the movie", "a dull"], b, tmp_path, SamplingParams(max_tokens=4), progress=False)
    assert s.generated == 2 and all(isinstance(r["text"], str) for r in recs)


def test_each_config_type_builds_the_backend_registered_under_it():
    from kdforge.elicit.backends.base import backend_class, registered_backends
    from kdforge.elicit.backends.openai_backend import OpenAIBackend
    from kdforge.elicit.backends.transformers_backend import TransformersBackend
    from kdforge.elicit.backends.vllm_backend import VLLMBackend

    assert registered_backends() == ["openai", "transformers", "vllm"]
    assert backend_class("openai") is OpenAIBackend
    assert backend_class("transformers") is TransformersBackend
    assert backend_class("vllm") is VLLMBackend
    from kdforge.elicit.backends import OpenAIConfig

    b = build_backend(OpenAIConfig(base_url="http://127.0.0.1:1/v1", model="m", concurrency=3))
    assert isinstance(b, OpenAIBackend) and b.concurrency == 3


def test_unknown_or_doubly_registered_backend_type_is_a_config_error():
    from kdforge.elicit.backends.base import Backend, backend_class, register_backend

    with pytest.raises(ConfigError, match="no backend is registered for type 'nope'"):
        backend_class("nope")

    class Impostor(Backend):
        async def generate_batch(self, requests):  # pragma: no cover - never called
            return []

    with pytest.raises(ConfigError, match="already registered"):
        register_backend("openai")(Impostor)
    assert backend_class("openai").__name__ == "OpenAIBackend"
