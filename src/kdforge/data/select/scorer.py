"""Per-document log-likelihood of a causal LM, computed from text (the model tokenizes for itself).

:class:`CausalLMScorer` turns a list of documents into ``(sum log p, n)`` pairs: the summed
log-probability of every predicted token of the document (tokens ``2..n+1`` given their prefix,
after truncation to ``max_length`` tokens) and how many tokens that is. The per-token average
``sum / n`` is what data selection compares across models, so two models with different
tokenizers can be compared on the same text (each normalises by its own token count).

Batches are right-padded; a document shorter than two tokens has ``n = 0`` (no prediction).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from kdforge.errors import ConfigError
from kdforge.teachers.online import OnlineTeacher

log = logging.getLogger(__name__)

__all__ = ["CausalLMScorer", "DocumentScorer"]


class DocumentScorer(Protocol):
    """``scorer(texts) -> [(sum_logprob, num_tokens), ...]``; ``identity()`` names the model and
    its weights (recorded so a resumed scoring pass cannot mix two models)."""

    def __call__(self, texts: Sequence[str]) -> list[tuple[float, int]]: ...

    def identity(self) -> dict[str, Any]: ...


class CausalLMScorer:
    """Summed next-token log-probabilities of documents under a causal LM.

    Args:
        model: a causal LM (``AutoModelForCausalLM``) or an :class:`OnlineTeacher`. It is frozen
            in place (``requires_grad_(False)``, eval mode): score a copy of a model you will train.
        tokenizer: the model's own tokenizer (special tokens added as the tokenizer does by default).
        max_length: documents are truncated to this many tokens.
        batch_size: documents per forward pass.
        name: identifier recorded in the score manifest (default: the model's ``_name_or_path``).
        device: where the model runs (default: where it is).

    Returns per document ``(sum_{t=1}^{n} log p(x_{t+1} | x_{<=t}), n)`` with ``n = len(ids) - 1``.
    """

    def __init__(self, model: nn.Module | OnlineTeacher, tokenizer: Any, *, max_length: int = 512,
                 batch_size: int = 8, name: str | None = None, device: str | torch.device | None = None) -> None:
        if max_length < 2 or batch_size < 1:
            raise ConfigError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})",
                              "use e.g. max_length=256, batch_size=8")
        self.lm = model if isinstance(model, OnlineTeacher) else OnlineTeacher(model, device=device, name=name)
        if name:
            self.lm.name = name
        self.tokenizer = tokenizer
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    def identity(self) -> dict[str, Any]:
        from kdforge.teachers.vocab import tokenizer_fingerprint

        return {"id": self.lm.name, "weights_sha256": self.lm.weights_hash(),
                "tokenizer": tokenizer_fingerprint(self.tokenizer), "max_length": self.max_length}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        ids = self.tokenize(texts)
        out: list[tuple[float, int]] = [(0.0, 0)] * len(ids)
        # longest first, so a batch pads little; the order inside a batch is fixed by the input
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
        for b in range(0, len(order), self.batch_size):
            rows = [i for i in order[b : b + self.batch_size] if len(ids[i]) >= 2]
            if not rows:
                continue
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            logits = self.lm.logits(input_ids, mask)[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            valid = mask[:, 1:].bool()
            sums = torch.where(valid, logp, torch.zeros_like(logp)).double().sum(-1)
            for r, i in enumerate(rows):
                out[i] = (float(sums[r]), int(valid[r].sum()))
        return out
