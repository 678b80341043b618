"""Running a frozen model: logits (and captured features) under ``no_grad``, inputs moved to it.

``torch.no_grad`` rather than ``torch.inference_mode``: inference tensors cannot be saved for
backward, and a KD loss multiplies the teacher's probabilities with the student's log-probs,
which autograd must save.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdforge.errors import ShapeError

__all__ = ["extract_logits", "module_device", "run_model", "run_model_features"]


def extract_logits(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, ``.logits``, ``["logits"]`` or ``output[0]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ShapeError(
            f"the model returned {type(output).__name__}, which has no logits tensor",
            "pass a causal LM (AutoModelForCausalLM) or a module returning logits [B, T, V]",
        )
    return logits


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (or buffer); CPU for a module without tensors."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def _module_float_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _input_mover(module: nn.Module) -> Any:
    """Moves a tensor argument to ``module``'s device (float tensors also to its float dtype)."""
    device = module_device(module)
    dtype = _module_float_dtype(module)

    def move(x: Any) -> Any:
        if torch.is_tensor(x):
            x = x.to(device)
            if x.is_floating_point() and dtype is not None:
                x = x.to(dtype)
        return x

    return move


@torch.no_grad()
def run_model(module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A frozen model's logits under ``no_grad`` in eval mode, inputs moved to its device/dtype."""
    if module.training:
        module.eval()
    move = _input_mover(module)
    return extract_logits(module(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()}))


@torch.no_grad()
def run_model_features(module: nn.Module, request: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Like :func:`run_model`, also capturing the :class:`~kdforge.features.FeatureRequest` ``request``."""
    from kdforge.features.taps import capture

    if module.training:
        module.eval()
    move = _input_mover(module)
    out, feats = capture(module, request, *[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
    return extract_logits(out), feats


