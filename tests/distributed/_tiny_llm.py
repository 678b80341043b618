"""A tiny ``llm_kd`` setup on disk: a 4-layer Llama teacher + word-level tokenizer saved with
``save_pretrained``, a two-document corpus, and a recipe YAML (seconds on one CPU core)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

WORDS = [f"w{i}" for i in range(60)]


def make_teacher_and_corpus(root: Path) -> Path:
    """Write ``root/teacher`` (model + tokenizer) and ``root/corpus/{book_a,book_b}.txt``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

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
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name in ("book_a", "book_b"):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(30)]
        (corpus / f"{name}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    return root


def recipe_yaml(root: Path, path: Path, *, train: dict[str, Any] | None = None, **top: Any) -> Path:
    """An ``llm_kd`` recipe over the tiny setup (labels-only and KD methods, seed 0)."""
    data: dict[str, Any] = {
        "recipe": "llm_kd",
        "teacher": {"model": str(root / "teacher")},
        "student": {"layers": "first_last"},
        "data": {"corpus": str(root / "corpus"), "train_docs": ["book_a"], "eval_docs": ["book_b"],
                 "seq_len": 16, "train_sequences": 8, "eval_sequences": 4},
        "cache": {"k": 8, "batch_size": 4},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "eval_every": 2,
                  "save_every": 2, "progress": False, **(train or {})},
        "eval": {"batch_size": 2, "during_training_sequences": 2, "speed_batch": 2, "speed_repeats": 1},
        "seeds": [0],
        **top,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
