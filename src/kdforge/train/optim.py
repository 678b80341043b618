"""Optimizer, learning-rate schedule, accelerator and precision set-up of the trainer."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError, DeviceError

logger = logging.getLogger(__name__)

__all__ = ["lr_lambda", "param_groups", "refuse_meta", "resolve_mixed_precision"]


def resolve_mixed_precision(requested: str) -> str:
    """``requested`` if this machine supports it, else ``"no"`` with a logged notice."""
    if requested == "fp16" and not torch.cuda.is_available():
        logger.warning("mixed_precision='fp16' needs a CUDA device; training in full precision instead")
        return "no"
    if requested == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU does not support bf16; training in full precision instead")
        return "no"
    return requested


def lr_lambda(scheduler: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s``: linear warm-up, then constant/linear/cosine."""

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant":
            return 1.0
        span = max(max_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        if scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW-style groups over the trainable parameters of ``modules`` (each tensor once):
    ``weight_decay`` for matrices, 0 for biases and norms."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the student has no trainable parameters", "unfreeze some student parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def new_accelerator(cls: Any, kwargs: dict[str, Any]) -> Any:
    """An ``Accelerator``; in a single process, a second one with another precision is allowed.

    accelerate keeps one process-wide state and refuses to change its mixed precision; a script or
    recipe that trains several models (teacher fp32, then students in bf16) hits that. Outside a
    distributed launch the state is only a cache, so it is reset and rebuilt.
    """
    try:
        return cls(**kwargs)
    except ValueError as exc:
        from accelerate.state import AcceleratorState, PartialState

        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise
        logger.info("re-initialising accelerate's process state for mixed_precision=%s", kwargs.get("mixed_precision"))
        AcceleratorState._reset_state()
        return cls(**kwargs)


def refuse_meta(module: nn.Module, who: str) -> None:
    """A model on the ``meta`` device has shapes but no weights: nothing can train or run it."""
    meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise DeviceError(
            f"the {who} has {len(meta)} tensors on the 'meta' device (e.g. {meta[0]!r}): its weights were "
            "never loaded",
            f"load the {who} with real weights (from_pretrained without device_map='meta' / init_empty_weights, "
            "or to_empty() followed by load_state_dict) before passing it to Distiller",
        )
