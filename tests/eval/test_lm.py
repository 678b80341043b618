"""LM task-quality metrics against hand-computed values, and the one-pass evaluator."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.data._cmd import private_datasets_cache  # noqa: F401  (autouse: datasets cache in tmp)

from kdforge.errors import DataError, ShapeError
from kdforge.eval.classification import expected_calibration_error
from kdforge.eval.fidelity import fidelity
from kdforge.eval.lm import (
    IGNORE_INDEX,
    LMAccumulator,
    StreamingReliability,
    answer_calibration,
    batches_from_blocks,
    block_batches,
    evaluate_language_models,
    exact_match,
    load_qa_rows,
    load_texts,
    load_token_blocks,
    normalize_answer,
    perplexity_from_loglik,
    rouge_l,
    score_choices,
    shift_for_next_token,
)

from ._tiny import CORPUS, tiny_llama, tiny_tokenizer


def test_perplexity_is_exp_of_mean_nll_from_known_logliks():
    # token probabilities 1/2, 1/4, 1/8: mean NLL = ln(8)/... -> ppl = (2*4*8)^(1/3) = 4
    ll = math.log(1 / 2) + math.log(1 / 4) + math.log(1 / 8)
    assert perplexity_from_loglik(ll, 3) == pytest.approx(4.0)
    with pytest.raises(DataError):
        perplexity_from_loglik(0.0, 0)


def test_lm_accumulator_perplexity_matches_known_token_probabilities_and_ignores_padding():
    # vocab 4; logits are log-probs, so the target's probability is known exactly
    probs = torch.tensor([[[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]])
    labels = torch.tensor([[1, 3, IGNORE_INDEX]])
    acc = LMAccumulator()
    acc.update(probs.log(), labels)
    out = acc.compute()
    assert out["n_tokens"] == 2
    assert out["nll"] == pytest.approx(-(math.log(0.25) + math.log(0.25)) / 2)
    assert out["perplexity"] == pytest.approx(4.0)
    # top-1 of row 0 is token 0 (wrong), row 1 is a tie -> argmax 0 (wrong)
    assert out["token_accuracy"] == 0.0


def test_perplexity_is_pooled_over_batches_not_averaged_per_batch():
    acc = LMAccumulator()
    acc.update(torch.tensor([[[0.5, 0.5]]]).log(), torch.tensor([[0]]))  # p = 1/2
    acc.update(torch.tensor([[[0.125, 0.875], [0.125, 0.875], [0.125, 0.875]]]).log(),
               torch.tensor([[0, 0, 0]]))  # p = 1/8 three times
    expected = math.exp(-(math.log(0.5) + 3 * math.log(0.125)) / 4)
    assert acc.compute()["perplexity"] == pytest.approx(expected)


def test_shift_for_next_token_aligns_targets_and_masks_padding():
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[3, 1, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    s, labels = shift_for_next_token(logits, ids, mask)
    assert s.shape == (1, 3, 5)
    assert labels.tolist() == [[1, 4, IGNORE_INDEX]]


def test_streaming_ece_on_a_constructed_case():
    # 4 predictions at confidence 0.9 (3 right, bin 13) and 2 at 0.62 (0 right, bin 9), 15 bins
    rel = StreamingReliability(15)
    rel.update(torch.tensor([0.9, 0.9]), torch.tensor([1.0, 1.0]))
    rel.update(torch.tensor([0.9, 0.9, 0.62, 0.62]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    expected = (4 / 6) * abs(0.75 - 0.9) + (2 / 6) * abs(0.0 - 0.62)
    assert rel.ece() == pytest.approx(expected)
    d = rel.result().to_dict()
    assert sum(d["bin_count"]) == 6 and d["bin_count"][13] == 4 and d["bin_count"][9] == 2


def test_streaming_ece_equals_classification_ece_on_the_same_predictions():
    torch.manual_seed(0)
    logits, labels = 3 * torch.randn(500, 7), torch.randint(0, 7, (500,))
    acc = LMAccumulator(n_bins=15)
    acc.update(logits[None], labels[None])
    assert acc.compute()["ece"] == pytest.approx(expected_calibration_error(logits, labels), abs=1e-6)


def test_exact_match_normalises_case_punctuation_and_articles_and_takes_max_over_refs():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert exact_match(["Paris.", "rome", "a cat"], ["paris", ["Milan", "Rome"], "dog"]) == pytest.approx(2 / 3)
    assert exact_match(["Paris."], ["paris"], normalize=False) == 0.0
    with pytest.raises(DataError):
        exact_match(["a"], ["a", "b"])


def test_rouge_l_matches_hand_computed_lcs_f_measure():
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 1, R = 3/6, F = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l(["x y"], [["a b", "x y"]]) == pytest.approx(1.0)


def test_answer_calibration_accuracy_ece_and_brier_by_hand():
    # q1: options loglik ln(0.8), ln(0.2) -> conf 0.8, gold 0 (right)
    # q2: ln(0.3), ln(0.7) -> conf 0.7 predicts 1, gold 0 (wrong)
    res = answer_calibration([[math.log(0.8), math.log(0.2)], [math.log(0.3), math.log(0.7)]], [0, 0])
    assert res.accuracy == pytest.approx(0.5)
    assert res.ece == pytest.approx(0.5 * abs(1 - 0.8) + 0.5 * abs(0 - 0.7))
    assert res.brier == pytest.approx(((0.2**2 + 0.2**2) + (0.7**2 + 0.7**2)) / 2)
    with pytest.raises(DataError, match="gold"):
        answer_calibration([[0.0, 1.0]], [2])


def test_answer_calibration_length_normalisation_changes_the_choice():
    res = answer_calibration([[-4.0, -3.0]], [0], choice_lengths=[[4, 1]])
    assert res.accuracy == 1.0  # -1/token beats -3/token


def test_load_texts_reads_txt_jsonl_and_dataset_folders(tmp_path):
    # the package's .txt rule: one document per file, wrapped lines rejoined inside each paragraph
    (tmp_path / "a.txt").write_text("first para\nline two\n\nsecond para\n")
    assert load_texts(tmp_path / "a.txt") == ["first para line two\n\nsecond para"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    assert load_texts(tmp_path / "b.jsonl", text_field="body") == ["x", "y"]
    import datasets

    datasets.Dataset.from_dict({"text": ["u", "v"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(tmp_path / "ds") == ["u", "v"]
    with pytest.raises(DataError, match="column"):
        load_texts(tmp_path / "ds", text_field="nope")
    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")


def test_token_id_files_are_cut_into_blocks(tmp_path):
    import numpy as np

    np.save(tmp_path / "ids.npy", np.arange(10))
    blocks = load_token_blocks(tmp_path / "ids.npy", block_size=4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5]}\n')
    assert load_token_blocks(tmp_path / "ids.jsonl", block_size=5).tolist() == [[1, 2, 3, 4, 5]]


def test_qa_rows_are_validated(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"prompt": "q", "choices": ["a", "b"]}\n')
    with pytest.raises(DataError, match="gold"):
        load_qa_rows(p)


def test_evaluator_matches_direct_metrics_on_tiny_models():
    tok = tiny_tokenizer()
    vocab = len(tok)
    teacher, student = tiny_llama(vocab, seed=0), tiny_llama(vocab, seed=1)
    batches = block_batches(tok, CORPUS, block_size=8, batch_size=2)
    out = evaluate_language_models({"teacher": teacher, "student": student}, batches, teacher="teacher")
    assert set(out) == {"teacher", "student"}
    assert "agreement" not in out["teacher"]["metrics"]
    # recompute directly
    acc = LMAccumulator()
    s_all, t_all, m_all = [], [], []
    with torch.no_grad():
        for b in batches:
            s, labels = shift_for_next_token(student(input_ids=b["input_ids"]).logits, b["input_ids"])
            t, _ = shift_for_next_token(teacher(input_ids=b["input_ids"]).logits, b["input_ids"])
            acc.update(s, labels)
            s_all.append(s.reshape(-1, vocab))
            t_all.append(t.reshape(-1, vocab))
            m_all.append((labels != IGNORE_INDEX).reshape(-1))
    direct = fidelity(torch.cat(s_all), torch.cat(t_all), torch.cat(m_all))
    sm = out["student"]["metrics"]
    assert sm["perplexity"] == pytest.approx(acc.compute()["perplexity"], rel=1e-5)
    assert sm["kl_to_teacher"] == pytest.approx(direct["kl_to_teacher"], rel=1e-5)
    assert sm["agreement"] == pytest.approx(direct["agreement"])
    assert sum(out["student"]["reliability"]["bin_count"]) == sm["n_tokens"]


def test_evaluator_on_blocks_and_score_choices_run_on_tiny_model():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    blocks = torch.randint(0, len(tok), (3, 6))
    out = evaluate_language_models({"m": model}, batches_from_blocks(blocks, batch_size=2))
    assert out["m"]["metrics"]["n_tokens"] == 15
    scores, lengths = score_choices(model, tok, "paris is the capital of", [" france", " italy"])
    assert len(scores) == 2 and lengths == [1, 1] and all(s < 0 for s in scores)
    with pytest.raises(ShapeError):
        LMAccumulator().update(torch.randn(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))


def test_domain_tagged_batches_give_per_domain_breakdowns_equal_to_separate_runs():
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    a = block_batches(tok, CORPUS[:3], block_size=6, batch_size=2, domain="animals")
    b = block_batches(tok, CORPUS[3:], block_size=6, batch_size=2, domain="capitals")
    models = {"t": teacher, "s": student}
    both = evaluate_language_models(models, a + b, teacher="t")
    only_b = evaluate_language_models(models, b, teacher="t")
    bd = both["s"]["breakdowns"]
    assert set(bd["perplexity by domain"]) == {"animals", "capitals"}
    assert bd["perplexity by domain"]["capitals"] == pytest.approx(only_b["s"]["metrics"]["perplexity"], rel=1e-6)
    assert bd["agreement by domain"]["capitals"] == pytest.approx(only_b["s"]["metrics"]["agreement"])
    assert "agreement by domain" not in both["t"]["breakdowns"]
    untagged = evaluate_language_models(models, block_batches(tok, CORPUS, block_size=6), teacher="t")
    assert "breakdowns" not in untagged["s"]
