"""Labeling, expansion, curation and rationales: parsing, voting, dedup and their outputs."""

from __future__ import annotations

import json

import pytest

from kdforge.elicit import SamplingParams
from kdforge.elicit.backends import TransformersConfig, build_backend
from kdforge.elicit.curation import CurationConfig, JudgeConfig, curate_rows, parse_score
from kdforge.elicit.expansion import (
    Deduplicator,
    ExpansionConfig,
    clean_candidate,
    expand_rows,
    rouge_l_f1,
)
from kdforge.elicit.labeling import LabelingConfig, aggregate_votes, label_rows, parse_label
from kdforge.elicit.rationales import (
    RationalesConfig,
    extract_answer,
    rationale_rows,
    split_rationale,
)

LABELS = ["fresh", "rotten"]
ALIASES = {"fresh": ["positive"], "rotten": ["negative"]}


# ---- labeling -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Fresh.", "fresh"), ("**ROTTEN**", "rotten"), ("Positive!", "fresh"),
    ("fresh, not rotten", "fresh"), ("It is rotten rather than fresh", "rotten"),
    ("refreshing", None), ("I cannot tell", None),
])
def test_parse_label_maps_free_text_to_the_earliest_whole_word_label(text, expected):
    assert parse_label(text, LABELS, ALIASES) == expected


def test_vote_gives_majority_and_agreement_over_valid_answers():
    v = aggregate_votes(["fresh", "rotten", None, "fresh"])
    assert v == {"label": "fresh", "agreement": 2 / 3, "votes": {"fresh": 2, "rotten": 1}, "n_valid": 3}
    assert aggregate_votes([None, None])["label"] is None


def test_label_rows_stores_votes_agreement_and_accuracy_against_gold(tmp_path, scripted):
    rows = [{"text": "great fun", "label": "fresh"}, {"text": "dull", "label": "rotten"},
            {"text": "meh", "label": "fresh"}]

    def reply(r):
        if "great" in r.prompt[-1]["content"]:
            return "Fresh"
        if "dull" in r.prompt[-1]["content"]:
            return ["negative", "rotten", "fresh"][r.sample_index]
        return "no idea"

    labeled, res = label_rows(rows, scripted(reply), tmp_path, labeling=LabelingConfig(
        labels=LABELS, aliases=ALIASES, gold_field="label"), params=SamplingParams(n=3, temperature=0.7),
        progress=False)
    assert [x["label"] for x in labeled] == ["fresh", "rotten", None]
    assert labeled[1]["agreement"] == pytest.approx(2 / 3)
    assert res["accuracy"] == pytest.approx(2 / 3) and res["unlabeled"] == 1
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 3


def test_loglik_label_scoring_with_a_local_model_gives_a_distribution(tmp_path, tiny_model_dir):
    backend = build_backend(TransformersConfig(model=str(tiny_model_dir), device="cpu"))
    rows = [{"text": "the movie was great fun", "label": "fresh"}]
    labeled, res = label_rows(rows, backend, tmp_path, labeling=LabelingConfig(
        labels=LABELS, gold_field="label", score_loglik=True), params=SamplingParams(max_tokens=3),
        progress=False)
    probs = labeled[0]["label_probs"]
    assert set(probs) == set(LABELS) and sum(probs.values()) == pytest.approx(1.0)
    assert labeled[0]["loglik_label"] == max(probs, key=probs.get)
    assert "loglik_accuracy" in res


def test_loglik_scoring_needs_a_local_backend(tmp_path, scripted):
    from kdforge.errors import ConfigError

    with pytest.raises(ConfigError, match="log-likelihood"):
        label_rows([{"text": "x"}], scripted(lambda r: "fresh"), tmp_path,
                   labeling=LabelingConfig(labels=LABELS, score_loglik=True), progress=False)


# ---- expansion ------------------------------------------------------------------------------
def test_dedup_rejects_exact_near_and_too_similar_candidates_and_keeps_novel_ones():
    d = Deduplicator(near_dup_threshold=0.6, diversity_threshold=0.7)
    d.add("Write a poem about the sea at night and the stars above it")
    assert d.check("write a poem about the SEA at night, and the stars above it!")[0] == "exact_duplicate"
    assert d.check("Write a poem about the sea at night and the stars above it please")[0] == "near_duplicate"
    assert d.check("Compose a poem about the sea during the night and the stars above")[0] == "too_similar"
    assert d.add_if_novel("Explain how a bicycle gear system works") == (True, None)
    assert len(d.texts) == 2


def test_rouge_l_is_one_for_identical_and_zero_for_disjoint_texts():
    assert rouge_l_f1("a b c d", "a b c d") == 1.0
    assert rouge_l_f1("a b c", "x y z") == 0.0
    assert rouge_l_f1("a b c d", "a x c d") == pytest.approx(0.75)


def test_clean_candidate_strips_numbering_and_extra_paragraphs():
    assert clean_candidate('4. "Name three rivers in Asia."\n\nSure, here it is') == "Name three rivers in Asia."


def test_expansion_reaches_target_with_dedup_and_resumes_from_stored_rounds(tmp_path, scripted):
    pool = ["Name a famous river in Africa", "Name a famous river in Africa",  # exact dup
            "Describe the water cycle in three steps", "List two prime numbers above fifty",
            "Explain why the sky looks blue at noon", "hi",  # too short
            "Summarise the plot of a heist movie", "Translate good morning into French"]

    def reply(r):  # a deterministic "teacher": the k-th request gets the k-th pool item
        reply.k += 1
        return pool[(reply.k - 1) % len(pool)]

    reply.k = 0
    seeds = [{"text": "Name a famous river in Africa"}, {"text": "Give a synonym for happy"}]
    cfg = ExpansionConfig(target=4, per_round=3, max_rounds=5, examples_per_prompt=2, seed=0)
    backend = scripted(reply)
    accepted, res = expand_rows(seeds, backend, tmp_path, expansion=cfg,
                                params=SamplingParams(temperature=1.0), progress=False)
    texts = [a["text"] for a in accepted]
    assert len(texts) == 4 and len(set(texts)) == 4 and res["target_reached"]
    assert "Name a famous river in Africa" not in texts
    assert res["rejected_by_reason"].get("exact_duplicate", 0) >= 1 and res["rejected_by_reason"].get("length", 0) >= 1
    calls = len(backend.calls)
    again, res2 = expand_rows(seeds, backend, tmp_path, expansion=cfg,
                              params=SamplingParams(temperature=1.0), progress=False)
    assert [a["text"] for a in again] == texts and len(backend.calls) == calls  # nothing regenerated
    assert res2["generation"]["generated"] == 0


# ---- curation -------------------------------------------------------------------------------
def test_parse_score_takes_the_first_number_in_range():
    assert parse_score("Score: 8/10", 1, 10) == 8.0
    assert parse_score("I'd give it 7.5", 1, 10) == 7.5
    assert parse_score("0 issues, rating 4", 1, 5) == 4.0
    assert parse_score("great", 1, 10) is None


def test_curation_filters_by_length_format_consistency_and_judge(tmp_path, scripted):
    rows = [
        {"pid": 1, "text": '{"answer": 4, "why": "2+2"}'},
        {"pid": 1, "text": '{"answer": 4, "why": "two and two"}'},
        {"pid": 1, "text": '{"answer": 5, "why": "guess"}'},
        {"pid": 2, "text": "not json at all"},
        {"pid": 3, "text": "{}"},
        {"pid": 4, "text": '{"answer": 9, "why": "x"}'},
    ]
    cfg = CurationConfig(min_chars=2, json=True, json_keys=["answer"], group_field="pid",
                         answer_pattern=r'"answer":\s*(\d+)', min_agreement=0.5,
                         judge=JudgeConfig(min_score=1, max_score=10, threshold=5))
    judge = scripted(lambda r: "Score: 9" if "2+2" in r.prompt[-1]["content"] else "3")
    kept, res = curate_rows(rows, cfg, backend=judge, output_dir=tmp_path, progress=False)
    assert [k["row"]["text"] for k in kept] == [rows[0]["text"]]
    assert kept[0]["weight"] == pytest.approx((9 - 1) / 9 * 2 / 3)
    assert res["rejected_by_reason"] == {"invalid_json": 1, "json_missing_keys": 1,
                                         "disagrees_with_majority": 1, "judge_below_threshold": 2}
    assert len((tmp_path / "rejected.jsonl").read_text().splitlines()) == 5


def test_curation_without_a_judge_needs_no_backend(tmp_path):
    kept, res = curate_rows([{"text": "a b c"}, {"text": "a"}], CurationConfig(min_words=2), output_dir=tmp_path)
    assert res["kept"] == 1 and res["rejected_by_reason"] == {"too_short": 1}


# ---- rationales -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("3 apples plus 4 is 7.\nAnswer: 7", "7"),
    ("so the answer is $1,200.", "1200"),
    ("We get \\boxed{42} in the end", "42"),
    ("first 5... Answer: 5\nwait, recheck. Answer: 6", "6"),
    ("no conclusion here", None),
])
def test_extract_answer_finds_the_last_final_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_maps_onto_choices():
    assert extract_answer("Thinking...\nAnswer: Positive", choices=["fresh", "rotten"]) is None
    assert extract_answer("the tone is upbeat.\nAnswer: FRESH.", choices=["fresh", "rotten"]) == "fresh"


def test_rationales_vote_and_keep_a_rationale_that_agrees_with_the_majority(tmp_path, scripted):
    answers = {0: "Two and two.\nAnswer: 4", 1: "Hmm.\nAnswer: 5", 2: "2+2=4\nAnswer: 4"}
    rows = [{"question": "2+2?", "gold": "4"}]
    items, res = rationale_rows(rows, scripted(lambda r: answers[r.sample_index]), tmp_path,
                                rationales=RationalesConfig(gold_field="gold"),
                                params=SamplingParams(n=3, temperature=0.7), progress=False)
    it = items[0]
    assert it["answer"] == "4" and it["agreement"] == pytest.approx(2 / 3)
    assert it["rationale"] == "Two and two." and it["correct"]
    assert [s["answer"] for s in it["samples"]] == ["4", "5", "4"]
    assert res["accuracy"] == 1.0
    rec = json.loads((tmp_path / "rationales.jsonl").read_text())
    assert rec["rationale"] == "Two and two."


def test_split_rationale_drops_only_the_final_answer_line():
    assert split_rationale("a\nb\nAnswer: 3") == "a\nb"
    assert split_rationale("a\nb") == "a\nb"


def test_loglik_scoring_uses_the_verbalizers_the_prompt_asks_for(tmp_path, tiny_model_dir):
    from kdforge.elicit.data import PromptConfig, render_prompt

    backend = build_backend(TransformersConfig(model=str(tiny_model_dir), device="cpu"))
    cfg = LabelingConfig(labels=LABELS, score_loglik=True, verbalizers={"fresh": "Positive", "rotten": "Negative"},
                         template="{text} positive or negative?")
    labeled, _ = label_rows([{"text": "great fun"}], backend, tmp_path, labeling=cfg,
                            params=SamplingParams(max_tokens=2), progress=False)
    prompt = render_prompt({"text": "great fun", "labels": "fresh, rotten"}, PromptConfig(), cfg.template)
    ref = backend.score_continuations(prompt, ["Positive", "Negative"])
    assert labeled[0]["loglik"]["fresh"] == pytest.approx(ref[0], abs=1e-4)
    assert labeled[0]["loglik"]["rotten"] == pytest.approx(ref[1], abs=1e-4)


def test_contextual_calibration_subtracts_the_content_free_prior(tmp_path, tiny_model_dir):
    import math

    from kdforge.elicit.data import PromptConfig, render_prompt

    backend = build_backend(TransformersConfig(model=str(tiny_model_dir), device="cpu"))
    cfg = LabelingConfig(labels=LABELS, gold_field="label", score_loglik=True, calibrate=True)
    labeled, res = label_rows([{"text": "great fun", "label": "fresh"}], backend, tmp_path, labeling=cfg,
                              params=SamplingParams(max_tokens=2), progress=False)
    free = render_prompt({"text": "N/A", "labels": "fresh, rotten"}, PromptConfig(), cfg.template)
    prior = backend.score_continuations(free, [" fresh", " rotten"])
    ll = labeled[0]["loglik"]
    diff = (ll["fresh"] - prior[0]) - (ll["rotten"] - prior[1])
    p = labeled[0]["label_probs_calibrated"]
    assert math.log(p["fresh"] / p["rotten"]) == pytest.approx(diff, abs=1e-4)
    assert "calibrated_accuracy" in res
