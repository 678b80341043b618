"""The two-step probe behind ``kdforge run --probe``: seconds per optimizer step, measured.

A stand-in for one training step is timed: the run's student architecture (randomly
initialised, same dtype and device as training; no teacher weights are read), a batch of the
run's shape, the first distillation objective of the config against a random teacher signal of
the shape the run uses, ``backward`` and one AdamW step. The first step pays one-off costs
(allocation, kernel selection), so the second is the one reported. What it leaves out: the
teacher's forward pass of online methods, on-policy generation, data loading and evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["materialize", "time_steps"]


def materialize(meta_model: Any, device: str) -> Any:
    """A randomly initialised copy of a meta-device Hugging Face model on ``device``: same config,
    dtype and trainable parameters (``requires_grad`` copied by name)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = next(iter(meta_model.parameters())).dtype
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(meta_model.config, dtype=dtype)
    trainable = {n: p.requires_grad for n, p in meta_model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(trainable.get(name, True))
    return model


def time_steps(model: Any, batch_fn: Callable[[], Any], loss_fn: Callable[[Any, Any], Any], *,
               steps: int = 2, lr: float = 1e-4) -> float:
    """Seconds of the last of ``steps`` optimizer steps (forward, loss, backward, AdamW step).

    Args:
        model: the stand-in student (trainable parameters set as in training).
        batch_fn: ``() -> batch`` (on the model's device).
        loss_fn: ``(model, batch) -> scalar loss``.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    seconds = 0.0
    for _ in range(max(1, steps)):
        batch = batch_fn()
        _sync(params)
        start = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(params)
        seconds = time.perf_counter() - start
    return seconds


def _sync(params: list[Any]) -> None:
    import torch

    if params and params[0].device.type == "cuda":
        torch.cuda.synchronize(params[0].device)
