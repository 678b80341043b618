""""Bring your own" fixtures: a tiny teacher and a different, smaller pretrained student sharing a
locally trained word-level tokenizer with a chat template, saved as HF folders, plus chat jsonl and
prompt/completion csv data."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(60)]
SPECIAL = ["<eos>", "<unk>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tokenizer(extra_words: int = 0) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; ``extra_words`` appends tokens (a vocabulary that extends this one)."""
    words = WORDS + [f"x{i}" for i in range(extra_words)]
    vocab = {w: i for i, w in enumerate([*SPECIAL, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama(folder: Path, *, hidden: int, layers: int, seed: int, tok: PreTrainedTokenizerFast,
          vocab_size: int | None = None) -> Path:
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def teacher_and_student(root: Path) -> tuple[Path, Path]:
    """``root/teacher`` (4 layers, width 32) and ``root/student`` (2 layers, width 16, other weights)."""
    tok = tokenizer()
    return (llama(root / "teacher", hidden=32, layers=4, seed=0, tok=tok),
            llama(root / "student", hidden=16, layers=2, seed=1, tok=tok))


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat_jsonl(path: Path, rows: int = 24, seed: int = 0) -> int:
    """Two-turn chats; returns the number of assistant tokens (words + one ``<|end|>`` per turn)."""
    rng = random.Random(seed)
    assistant_tokens = 0
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(rows):
            msgs = []
            for _turn in range(2):
                reply = _sentence(rng, rng.randint(3, 8))
                msgs += [{"role": "user", "content": _sentence(rng, rng.randint(2, 6))},
                         {"role": "assistant", "content": reply}]
                assistant_tokens += len(reply.split()) + 1
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return assistant_tokens


def prompt_completion_csv(path: Path, rows: int = 24, seed: int = 1) -> int:
    """``question,answer`` rows; returns the number of completion tokens (words + EOS per row)."""
    rng = random.Random(seed)
    completion_tokens = 0
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer"])
        for _ in range(rows):
            answer = _sentence(rng, rng.randint(3, 7))
            writer.writerow([_sentence(rng, rng.randint(2, 5)), answer])
            completion_tokens += len(answer.split()) + 1
    return completion_tokens
