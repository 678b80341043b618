"""benchmarks/trl_gold.py on tiny models and tokenizers (no Hub), so the side-by-side cannot rot."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trl_gold.py"

CORPUS = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife. However little known the feelings or views of such a man may be on his "
          "first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, "
          "that he is considered the rightful property of some one or other of their daughters.")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kdforge_bench_trl_gold", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _llama(vocab: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two byte-level BPEs of different sizes (so the vocabularies differ but share strings) + tiny Llamas."""
    from kdforge.recipes.cross_tokenizer import train_bpe

    student_tok, teacher_tok = train_bpe([CORPUS], 300), train_bpe([CORPUS], 340)
    teacher_dir = tmp_path_factory.mktemp("teacher_tok")
    teacher_tok.save_pretrained(teacher_dir)
    teacher = _llama(len(teacher_tok), seed=1).requires_grad_(False).eval()
    words = CORPUS.split()
    texts = [" ".join(words[i: i + 12]) for i in range(0, 48, 6)]  # 8 overlapping pieces
    return student_tok, teacher_tok, str(teacher_dir), teacher, texts


def _args(**kw) -> argparse.Namespace:
    base = {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup": 0, "seed": 0, "seq_len": 96}
    return argparse.Namespace(**{**base, **kw})


def test_prompt_completion_gives_trl_a_non_empty_prompt_and_keeps_the_text(bench):
    assert bench.prompt_completion("It is a truth") == {"prompt": "It", "completion": " is a truth"}
    assert bench.prompt_completion("Word") == {"prompt": "W", "completion": "ord"}  # no space: still non-empty
    for text in ("a b", "  leading", "x"):
        part = bench.prompt_completion(text)
        assert part["prompt"] and part["prompt"] + part["completion"] == text


def test_trl_gold_arm_trains_the_student_on_another_tokenizer(bench, pair, tmp_path):
    pytest.importorskip("trl.experimental.gold")
    student_tok, _, teacher_dir, teacher, texts = pair
    student = _llama(len(student_tok), seed=0)
    before = [p.detach().clone() for p in student.parameters()]
    (train_s, cpu_s), losses = bench.train_trl(student, student_tok, teacher, teacher_dir, texts,
                                      _args(steps=6, batch_size=8), str(tmp_path))
    assert train_s > 0 and cpu_s > 0 and len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # one fixed batch of 8 texts, lr 1e-2: the loss must fall
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_kdforge_gold_arm_and_the_shared_evaluator(bench, pair):
    from kdforge.recipes.cross_tokenizer import evaluate, teacher_top_tokens
    from kdforge.teachers import CrossTokenizerCollator, CrossTokenizerTeacher

    student_tok, teacher_tok, _, teacher, texts = pair
    source = CrossTokenizerTeacher(teacher, teacher_tok, student_tok)
    collate = CrossTokenizerCollator(student_tok, teacher_tok, max_length=96)
    held = [collate(texts[:4])]
    tops = [teacher_top_tokens(source, b) for b in held]
    student = _llama(len(student_tok), seed=0)
    start = evaluate(student, held, tops)["ppl"]
    assert min(bench.train_kdforge(student, source, collate, texts, _args(steps=6, batch_size=8))) > 0  # wall, CPU
    after = evaluate(student, held, tops)
    assert after["ppl"] < start  # the held batch is among the training texts
    assert 0.0 <= after["agreement"] <= 1.0 and after["agreement_positions"] > 0
