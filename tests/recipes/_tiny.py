"""A tiny seeded teacher (word-level tokenizer, 4-layer Llama) and a two-book corpus for recipe tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(60)]


def seeded_teacher_and_corpus(root: Path) -> Path:
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "teacher")
    fast.save_pretrained(root / "teacher")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for name in ("book_a", "book_b"):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(30)]
        (root / "corpus" / f"{name}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    return root
