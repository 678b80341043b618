"""Running a model: input checks, and a frozen model's logits (and captured features) under
``no_grad`` with the inputs moved to it.

``torch.no_grad`` rather than ``torch.inference_mode``: inference tensors cannot be saved for
backward, and a KD loss multiplies the teacher's probabilities with the student's log-probs,
which autograd must save.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdforge.errors import ShapeError, VocabMismatchError

__all__ = ["check_lm_input", "extract_logits", "module_device", "run_model", "run_model_features"]


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


def check_lm_input(model: nn.Module, input_ids: torch.Tensor, who: str = "model") -> None:
    """Refuse a batch a causal LM cannot take: token ids beyond its embedding table (torch fails
    deep inside with ``IndexError``) or sequences longer than ``max_position_embeddings`` (most
    models silently extrapolate their position encoding and produce garbage).

    Models without an HF-style ``config`` / ``get_input_embeddings`` are not checked; a config
    with dynamic RoPE scaling (meant to run past its nominal length) skips the length check.
    """
    if input_ids.numel() == 0 or input_ids.is_floating_point():
        return
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int):
        top = int(input_ids.max().item())
        if top >= rows:
            raise VocabMismatchError(
                f"token id {top} in the batch is outside the {who}'s vocabulary of {rows} embeddings",
                f"tokenize the data with the {who}'s tokenizer (or build the cache with it)",
            )
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    dynamic = isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope")
    if isinstance(limit, int) and not dynamic and input_ids.shape[-1] > limit:
        raise ShapeError(
            f"the batch has sequences of {input_ids.shape[-1]} tokens, longer than the {who}'s "
            f"max_position_embeddings={limit}",
            f"pack or truncate the data to at most {limit} tokens (seq_len / block_size / max_length)",
        )
