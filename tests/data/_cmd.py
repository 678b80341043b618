"""Shared fixtures of the per-command data tests (eval, sft, generate, cache-teacher): a tiny
byte-level tokenizer with a ChatML template, tiny Llama models from configs, and the same
conversations as a chat jsonl and as a prompt/completion csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tests.data.conftest import make_tokenizer

CHATS = [
    [{"role": "user", "content": "hello there, how are you today?"},
     {"role": "assistant", "content": "I am fine, thank you very much."}],
    [{"role": "system", "content": "tell me a story about a cat"},
     {"role": "user", "content": "what is two plus two?"},
     {"role": "assistant", "content": "four is the answer."},
     {"role": "user", "content": "tell me a story about a cat"},
     {"role": "assistant", "content": "once upon a time a cat sat on a mat"}],
    [{"role": "user", "content": "the quick brown fox"},
     {"role": "assistant", "content": "jumps over the lazy dog"}],
    [{"role": "user", "content": "It is a truth"},
     {"role": "assistant", "content": "universally acknowledged"}],
]
PAIRS = [("what is two plus two?", "four is the answer."),
         ("tell me a story about a cat", "once upon a time a cat sat on a mat"),
         ("the quick brown fox", "jumps over the lazy dog"),
         ("hello there, how are you today?", "I am fine, thank you very much.")]


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def write_models(root: Path, names=(("teacher", 0, 48), ("student", 1, 32))) -> dict[str, Path]:
    """Tiny teacher/student folders sharing the chat tokenizer (saved with each)."""
    tok = make_tokenizer()
    out = {}
    for name, seed, hidden in names:
        tiny_llama(len(tok), seed=seed, hidden=hidden).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def write_chat_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS), encoding="utf-8")
    return path


def write_pc_csv(path: Path, prompt: str = "question", completion: str = "answer") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([prompt, completion])
        w.writerows(PAIRS)
    return path


def assistant_token_count(tokenizer) -> int:
    """Hand count of the trained tokens of :data:`CHATS` under the ChatML template: each assistant
    turn is ``content <|im_end|> \\n`` (the template's rendering of the turn)."""
    n = 0
    for chat in CHATS:
        for m in chat:
            if m["role"] == "assistant":
                n += len(tokenizer(m["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
    return n


def completion_token_count(tokenizer) -> int:
    """Hand count of the trained tokens of :data:`PAIRS`: completion tokens + EOS."""
    return sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in PAIRS)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory, monkeypatch):
    """``datasets`` writes its cache in a temporary folder, not under the user's home (import this
    fixture into a test module to use it there)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))
