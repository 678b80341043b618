"""Preference pairs (long-to-short, teacher-judged), response encoding, and DPO / SFT training."""

from __future__ import annotations

import random

import torch
from tests.recipes._arith import tiny_arith_model

from kdforge.train.preference import (
    Answer,
    PreferencePair,
    build_pairs,
    encode_responses,
    response_logprobs,
    teacher_pairs,
    train_dpo,
    train_sft,
)


def test_shortest_correct_answer_is_chosen():
    answers = [Answer("3 + 4 = 7", True, 5), Answer("7", True, 1), Answer("8", False, 1),
               Answer("the 3 + 4 is 7", True, 6), Answer("7", True, 1)]
    pairs = build_pairs("q", answers)
    assert {p.chosen for p in pairs} == {"7"}
    assert {p.rejected for p in pairs} == {"8", "3 + 4 = 7", "the 3 + 4 is 7"}
    # wrong answers come first when the number of pairs is capped
    capped = build_pairs("q", answers, max_pairs=1, rng=random.Random(0))
    assert [p.rejected for p in capped] == ["8"]


def test_no_pair_without_a_correct_answer_or_a_preference():
    assert build_pairs("q", [Answer("8", False, 1), Answer("9", False, 1)]) == []
    assert build_pairs("q", [Answer("7", True, 1), Answer("07", True, 1)]) == []  # same length: no preference


def test_teacher_pairs_pick_most_and_least_likely():
    assert teacher_pairs("q", ["a", "b", "c"], [-1.0, -0.2, -3.0]) == [PreferencePair("q", "b", "c")]
    assert teacher_pairs("q", ["a", "a"], [-1.0, -1.0]) == []


def test_encode_responses_labels_only_the_response(tmp_path):
    _, _, tok = tiny_arith_model(tmp_path)
    batch = encode_responses(tok, ["What is 3 + 4 ?", "What is 1 + 1 ?"], ["7", "1 + 1 = 2"])
    ids, labels = batch["input_ids"], batch["labels"]
    # row 0: 6 prompt tokens, response "7" + EOS; labels[t] predicts ids[t + 1]
    assert labels[0].tolist()[:7] == [-100] * 5 + [ids[0, 6].item(), tok.eos_token_id]
    assert (labels[0, 7:] == -100).all()
    assert int((labels[1] != -100).sum()) == 6  # 5 response tokens + EOS
    assert batch["attention_mask"].sum(1).tolist() == [8, 12]


def test_dpo_raises_the_chosen_margin_and_sft_the_chosen_likelihood(tmp_path):
    _, model, tok = tiny_arith_model(tmp_path)
    reference = tiny_arith_model(tmp_path / "ref")[1].requires_grad_(False)
    pairs = [PreferencePair(f"What is {a} + {b} ?", str(a + b), f"{a} + {b} = {a + b + 1}")
             for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]]
    history = train_dpo(model, reference, tok, pairs, steps=8, batch_size=4, lr=5e-3, beta=0.5)
    assert history[0]["loss"] == history[0]["loss"]  # finite
    assert abs(history[0]["loss"] - 0.6931) < 1e-3  # policy == reference at the start: log 2
    assert history[-1]["margin"] > history[0]["margin"] + 0.5
    assert history[-1]["loss"] < history[0]["loss"]

    chosen = [(p.prompt, p.chosen) for p in pairs]
    batch = encode_responses(tok, [c[0] for c in chosen], [c[1] for c in chosen])
    with torch.no_grad():
        before = response_logprobs(model, batch).sum()
    sft = train_sft(model, tok, chosen, steps=6, batch_size=4, lr=5e-3)
    with torch.no_grad():
        after = response_logprobs(model, batch).sum()
    assert after > before and sft[-1]["loss"] < sft[0]["loss"]
