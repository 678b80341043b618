"""Tiny word-level causal LMs for the data-selection tests: domain A uses words a0..a19, domain B
b0..b19; a teacher whose logits favour domain-A words, a reference that does not."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

A_WORDS = [f"a{i}" for i in range(20)]
B_WORDS = [f"b{i}" for i in range(20)]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Another tokenizer family: one token per character."""
    chars = sorted(set("".join(A_WORDS + B_WORDS)) | {" "})
    vocab = {c: i for i, c in enumerate(["<eos>", "<unk>", "<pad>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def tiny_lm(vocab_size: int, seed: int = 0, layers: int = 2) -> nn.Module:
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


class Biased(nn.Module):
    """``base`` with ``bias`` added to its logits: a teacher that prefers some tokens."""

    def __init__(self, base: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("bias", bias)

    def forward(self, input_ids, attention_mask=None):
        return self.base(input_ids=input_ids, attention_mask=attention_mask).logits + self.bias


def domain_docs(n_per_domain: int = 6, length: int = 12, seed: int = 0) -> tuple[list[str], list[str]]:
    """Interleaved documents and their domains (``"A"``/``"B"``)."""
    rng = random.Random(seed)
    texts, domains = [], []
    for _ in range(n_per_domain):
        for dom, words in (("A", A_WORDS), ("B", B_WORDS)):
            texts.append(" ".join(rng.choice(words) for _ in range(length)))
            domains.append(dom)
    return texts, domains
