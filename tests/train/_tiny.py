"""Tiny models and datasets for the trainer tests (CPU, seconds)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB = 64


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, classes: int = 4, dropout: float = 0.0,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


class ClassDataset(Dataset):
    def __init__(self, n: int = 48, d_in: int = 8, classes: int = 4, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d_in, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.y[i]}


def tiny_llama(seed: int, vocab: int = VOCAB, hidden: int = 32, layers: int = 2, head_scale: float = 1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


class TokenDataset(Dataset):
    """Variable-length token rows; the first ``prompt`` tokens have label -100."""

    def __init__(self, n: int = 32, min_len: int = 5, max_len: int = 12, prompt: int = 2, seed: int = 2,
                 vocab: int = VOCAB) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
        self.rows = [torch.randint(3, vocab, (int(n_),), generator=g) for n_ in lengths]
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def pad_collate(prompt: int = 2):
    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            attn[i, : len(r)] = 1
            labels[i, prompt : len(r)] = r[prompt:]
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    return collate


class BagLM(torch.nn.Module):
    """A transformers-free causal 'LM' (embedding -> linear; logits [B, T, V]) for multi-process tests."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16, scale: float = 1.0) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.head(torch.tanh(self.emb(input_ids))) * self.scale


def one_step_grads(student: torch.nn.Module, teacher, objective, collate_fn):
    """Train ``student`` one optimizer step (4 rows x 2 micro-batches of :class:`TokenDataset`) and return
    ``(gradients by parameter name at the step, last logs)``: the step chunked-vs-plain tests compare."""
    from kdforge.train import CausalLMTask, Distiller, TrainConfig

    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=collate_fn, objective=objective,
                  config=TrainConfig(max_steps=1, batch_size=4, grad_accum_steps=2, max_grad_norm=None,
                                     progress=False, log_every=1),
                  train_data=TokenDataset(n=8))
    grads = {}
    d.optimizer.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in student.named_parameters()}))
    return grads, d.train().last_logs
