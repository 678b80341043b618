"""A tiny word-level Llama over an arithmetic vocabulary (digits 0-40, + - * ? : and a few words)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

TOKENS = ["<eos>", "<unk>", "What", "is", "Answer", "?", ":", "+", "-", "*", "=", "the",
          *[str(i) for i in range(41)]]


def tiny_arith_model(root: Path, seed: int = 0) -> tuple[Path, torch.nn.Module, PreTrainedTokenizerFast]:
    vocab = {w: i for i, w in enumerate(TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=0, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root)
    fast.save_pretrained(root)
    return root, model, fast
