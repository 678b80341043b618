"""The contract shared by on-policy generation backends, and the Hugging Face backend.

A generation backend (:class:`GenerateFn`) maps a model and a list of prompts (1-D token-id
tensors, no padding) to one completion per prompt: a 1-D int64 CPU tensor of the sampled tokens
only (no prompt, no padding), cut after its first EOS (the EOS is kept). Backends read the
sampling settings from any object with the :class:`SamplingSettings` attributes
(:class:`~kdforge.train.onpolicy.OnPolicyConfig` is one).

This module is the one home of what every backend and its callers share, below both:
:class:`~kdforge.train.onpolicy.OnPolicyBatcher` (GKD, Agarwal et al. 2024) and
:mod:`kdforge.eval.onpolicy` call backends; :class:`HFGenerator` (here) and
:class:`~kdforge.train.vllm_generation.VLLMGenerator` implement them. It imports neither.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from kdforge.errors import ConfigError, GenerationError

__all__ = ["GenerateFn", "HFGenerator", "SamplingSettings", "cut_after_eos", "special_token_ids"]


class SamplingSettings(Protocol):
    """What a backend reads from its settings (:class:`~kdforge.train.onpolicy.OnPolicyConfig`).

    ``top_k=None`` means no top-k filter; ``pad_token_id`` / ``eos_token_id`` ``None`` mean "the
    model's" (see :func:`special_token_ids`).
    """

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def pad_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...


class GenerateFn(Protocol):
    """Generation backend: completions (token ids, no prompt, no padding) for each prompt."""

    def __call__(self, model: torch.nn.Module, prompts: list[torch.Tensor], config: SamplingSettings,
                 ) -> list[torch.Tensor]: ...


def special_token_ids(model: torch.nn.Module, config: SamplingSettings) -> tuple[int, int | None]:
    """``(pad_id, eos_id)`` used to generate with ``model``.

    Each id is taken from ``config`` when set, else from ``model.generation_config``, else from
    ``model.config``; a list of EOS ids keeps its first. The pad id falls back to the EOS id.

    Raises:
        ConfigError: neither a pad nor an EOS id is known.
    """
    gen_cfg = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)

    def pick(name: str) -> Any:
        explicit = getattr(config, name)
        if explicit is not None:
            return explicit
        for src in (gen_cfg, cfg):
            value = getattr(src, name, None) if src is not None else None
            if value is not None:
                return value
        return None

    eos = pick("eos_token_id")
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    pad = pick("pad_token_id")
    if pad is None:
        pad = eos
    if pad is None:
        raise ConfigError(
            "on-policy generation needs a pad token id, and the model defines neither pad nor eos",
            "set on_policy.pad_token_id (e.g. the tokenizer's pad_token_id)",
        )
    return int(pad), (int(eos) if eos is not None else None)


def cut_after_eos(row: torch.Tensor, eos: int | None) -> torch.Tensor:
    """``row`` up to and including its first ``eos`` (all of it when there is none)."""
    if eos is not None:
        hits = (row == eos).nonzero()
        if len(hits):
            return row[: int(hits[0]) + 1]
    return row


class HFGenerator:
    """Sampling with Hugging Face ``model.generate`` (left-padded prompt batch, no grad, eval mode).

    Returns each completion cut after its first EOS (the EOS is kept), as a 1-D int64 tensor.
    Without an EOS the completion keeps its full generated length.
    """

    def __call__(self, model: torch.nn.Module, prompts: list[torch.Tensor], config: SamplingSettings,
                 ) -> list[torch.Tensor]:
        if not hasattr(model, "generate"):
            raise ConfigError(
                f"{type(model).__name__} has no generate() method",
                "use a Hugging Face causal LM, or pass generate_fn= with your own backend",
            )
        pad, eos = special_token_ids(model, config)
        device = next(model.parameters()).device
        width = max(int(p.numel()) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p.numel():
                ids[i, width - p.numel():] = p
                attn[i, width - p.numel():] = 1
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                    temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or 0,
                    max_new_tokens=config.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                )
        except Exception as exc:
            raise GenerationError(f"generation with {type(model).__name__} failed: {exc}",
                                  "check the sampling settings and that prompts are non-empty") from exc
        finally:
            model.train(was_training)
        return [cut_after_eos(row, eos) for row in out[:, width:].cpu()]
