"""A pure-torch tiny causal LM (no transformers import: subprocesses start in seconds)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCausalLM(nn.Module):
    """Embedding -> dropout -> [token, causal running mean] -> tanh MLP -> dropout -> head.

    ``forward(input_ids [B, T], attention_mask [B, T] | None) -> logits [B, T, V]``; position
    ``t`` sees tokens ``<= t`` only, like any causal LM.
    """

    def __init__(self, vocab: int = 64, hidden: int = 32, dropout: float = 0.0, head_scale: float = 1.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(self.emb(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
        running = h.cumsum(dim=1) / steps
        return self.head(self.drop(torch.tanh(self.mix(torch.cat([h, running], dim=-1)))))
