"""Sentence encoders as teachers and students: a transformers encoder + pooling (+ a projection).

:class:`SentenceEncoder` wraps any ``AutoModel`` encoder (BERT, MPNet, MiniLM, ...) into
``(input_ids, attention_mask) -> [B, D]`` sentence embeddings, pooled as its sentence-transformers
folder says (``1_Pooling/config.json``: mean over real tokens, or the CLS token; mean when the file
is absent), optionally L2-normalised, optionally followed by a linear projection to another width
(a 384-wide student distilled into a 768-wide teacher's space, as Reimers & Gurevych 2020 add a
dense layer). :func:`keep_encoder_layers` cuts an encoder to a subset of its layers (a smaller
student initialised from a pretrained one, as DistilBERT takes every other layer).

:func:`encode` embeds a list of texts in batches sorted by length (no gradient), which is how the
teacher's embeddings are computed once and reused (``kdforge.recipes.encoder_kd``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.errors import AssetError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["SentenceEncoder", "encode", "keep_encoder_layers", "load_sentence_encoder", "pooling_of"]

Pooling = Literal["mean", "cls"]


def pooling_of(folder: str | Path) -> Pooling:
    """The pooling a sentence-transformers folder declares (``1_Pooling/config.json``); ``mean`` if none."""
    path = Path(folder) / "1_Pooling" / "config.json"
    if not path.is_file():
        return "mean"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ConfigError(f"{path}: only mean or CLS pooling is supported", "use a mean- or CLS-pooled encoder")


class SentenceEncoder(nn.Module):
    """``backbone`` + pooling (+ L2 normalisation) (+ a linear projection to ``projection_dim``).

    ``forward(input_ids, attention_mask) -> [B, D]`` (``D`` = ``projection_dim`` when given, else the
    backbone's hidden size). The projection, when present, comes after the normalisation, so the
    student's vectors can match the teacher's (unit) vectors in norm as well as direction.
    """

    def __init__(self, backbone: nn.Module, *, pooling: Pooling = "mean", normalize: bool = True,
                 projection_dim: int | None = None) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"unknown pooling {pooling!r}", "use mean or cls")
        self.backbone, self.pooling, self.normalize = backbone, pooling, normalize
        hidden = int(backbone.config.hidden_size)
        self.projection = nn.Linear(hidden, projection_dim) if projection_dim and projection_dim != hidden else None
        self.dim = projection_dim or hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return self.projection(emb) if self.projection is not None else emb


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(f"cannot find the layer list of {type(model).__name__}",
                      "kdforge knows encoder.layer (BERT, MPNet, MiniLM) and encoder.layers; cut the model yourself")


def keep_encoder_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Keep only ``layers`` (indices, in order) of an encoder, in place; updates ``num_hidden_layers``."""
    stack = _encoder_layers(model)
    n = len(stack)
    bad = [i for i in layers if not -n <= i < n]
    if not layers or bad:
        raise ConfigError(f"layers {list(layers)} do not index a {n}-layer encoder",
                          f"choose indices in 0..{n - 1}, e.g. {list(range(0, n, 2))}")
    kept = [stack[i] for i in layers]
    stack._modules.clear()
    for i, layer in enumerate(kept):
        stack.add_module(str(i), layer)
    model.config.num_hidden_layers = len(kept)
    return model


def load_sentence_encoder(source: Any, *, layers: Sequence[int] | None = None, normalize: bool = True,
                          projection_dim: int | None = None, what: str = "encoder") -> tuple[SentenceEncoder, Any]:
    """A :class:`SentenceEncoder` and its tokenizer from a :class:`kdforge.models.ModelSource`
    (asset name such as ``all-mpnet-base-v2``, a local folder, or a Hub id), on the CPU.

    Raises:
        AssetError: the folder/Hub id cannot be loaded as an encoder (the message names the fix).
    """
    from transformers import AutoModel, AutoTokenizer

    from kdforge.models import (
        classify_model_name,
        pretrained_kwargs,
        resolve_model_path,
        torch_dtype,
    )

    path = resolve_model_path(source.model)
    kwargs = pretrained_kwargs(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        backbone = AutoModel.from_pretrained(path, dtype=torch_dtype(source.dtype), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        hub = classify_model_name(source.model) == "hub"
        raise AssetError(f"cannot load {what} {source.model!r} as an encoder: {str(exc).splitlines()[0]}",
                         "check the Hub id and your network/HF_TOKEN, or pass a local folder" if hub else
                         "point it at a folder with config.json, the weights and a tokenizer (save_pretrained)") from None
    if layers is not None:
        keep_encoder_layers(backbone, layers)
    pooling = pooling_of(path) if Path(path).is_dir() else "mean"
    model = SentenceEncoder(backbone, pooling=pooling, normalize=normalize, projection_dim=projection_dim)
    log.info("%s %s: %s, %d layers, %s pooling, dim %d", what, source.model, type(backbone).__name__,
             backbone.config.num_hidden_layers, pooling, model.dim)
    return model, tokenizer


@torch.no_grad()
def encode(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128,
           device: torch.device | str | None = None) -> torch.Tensor:
    """``[len(texts), D]`` float32 embeddings, computed in batches sorted by length (then unsorted)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            emb = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
            for row, i in enumerate(idx):
                out[i] = emb[row]
    finally:
        model.train(was_training)
    return torch.stack(out) if texts else torch.empty(0, 0)
