"""MiniPLM difference sampling: the score's definition, the kept documents, resume, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.data.select import (
    CausalLMScorer,
    miniplm_select,
    read_scores,
    score_documents,
    select_indices,
)
from kdforge.errors import CacheError, ConfigError

from ._select_models import A_WORDS, Biased, char_tokenizer, domain_docs, tiny_lm, word_tokenizer


@pytest.fixture(scope="module")
def models():
    tok = word_tokenizer(A_WORDS + [f"b{i}" for i in range(20)])
    base = tiny_lm(len(tok))
    bias = torch.zeros(len(tok))
    bias[[tok.convert_tokens_to_ids(w) for w in A_WORDS]] = 3.0  # the teacher "knows" domain A
    teacher = CausalLMScorer(Biased(base, bias), tok, batch_size=3, name="teacher")
    reference = CausalLMScorer(base, tok, batch_size=4, name="reference")
    return tok, base, teacher, reference


def test_scorer_matches_a_direct_forward(models):
    tok, base, _, reference = models
    texts, _ = domain_docs(2)
    got = reference(texts)
    for text, (s, n) in zip(texts, got):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
        want = logp.gather(-1, ids[0, 1:, None]).sum().item()
        assert n == ids.shape[1] - 1
        assert s == pytest.approx(want, abs=1e-4)  # padding in a batch does not change a document's score


def test_kept_documents_are_those_the_teacher_prefers(models, tmp_path):
    _, _, teacher, reference = models
    texts, domains = domain_docs(6)
    result = miniplm_select(texts, teacher, reference, tmp_path, fraction=0.5, chunk_size=5)
    assert sorted(domains[i] for i in result.kept) == ["A"] * 6
    by_domain = {d: [s.score for s, dd in zip(result.scores, domains) if dd == d] for d in "AB"}
    assert min(by_domain["A"]) > max(by_domain["B"])
    # the score is the per-token average difference
    s0 = result.scores[0]
    assert s0.score == pytest.approx(s0.teacher_logprob / s0.teacher_tokens
                                     - s0.reference_logprob / s0.reference_tokens)
    from datasets import load_from_disk

    ds = load_from_disk(str(result.dataset_dir))
    assert ds["text"] == [texts[i] for i in result.kept]
    assert ds["miniplm_score"] == pytest.approx([result.scores[i].score for i in result.kept])
    lines = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [x["kept"] for x in lines] == [i in set(result.kept) for i in range(len(texts))]


def test_other_columns_of_a_dataset_are_kept(models, tmp_path):
    from datasets import Dataset

    _, _, teacher, reference = models
    texts, domains = domain_docs(3)
    result = miniplm_select(Dataset.from_dict({"text": texts, "domain": domains}), teacher, reference, tmp_path,
                            fraction=0.5)
    from datasets import load_from_disk

    assert load_from_disk(str(result.dataset_dir))["domain"] == ["A"] * 3


class Killed(RuntimeError):
    pass


class Counting:
    """A scorer that counts documents and can die after ``die_after`` calls (a killed job)."""

    def __init__(self, inner, die_after=None):
        self.inner, self.die_after, self.calls, self.docs = inner, die_after, 0, 0

    def identity(self):
        return self.inner.identity()

    def __call__(self, texts):
        if self.die_after is not None and self.calls >= self.die_after:
            raise Killed
        self.calls += 1
        self.docs += len(texts)
        return self.inner(texts)


def test_resume_after_a_kill_gives_identical_scores(models, tmp_path):
    _, _, teacher, reference = models
    texts, _ = domain_docs(7)  # 14 documents, chunks of 4 -> 4 chunks
    full = score_documents(texts, teacher, reference, tmp_path / "full", chunk_size=4)
    dying = Counting(teacher, die_after=2)
    with pytest.raises(Killed):
        score_documents(texts, dying, reference, tmp_path / "killed", chunk_size=4)
    with pytest.raises(CacheError, match="unfinished"):
        read_scores(tmp_path / "killed")
    resumed_teacher = Counting(teacher)
    resumed = score_documents(texts, resumed_teacher, reference, tmp_path / "killed", chunk_size=4)
    assert resumed_teacher.docs == 14 - 8  # the two finished chunks were not scored again
    assert resumed == full
    a = sorted((tmp_path / "full" / "scores").glob("chunk-*"))
    b = sorted((tmp_path / "killed" / "scores").glob("chunk-*"))
    assert [x.read_bytes() for x in a] == [x.read_bytes() for x in b]


def test_other_settings_are_refused_then_overwritten(models, tmp_path):
    _, _, teacher, reference = models
    texts, _ = domain_docs(2)
    score_documents(texts, teacher, reference, tmp_path, chunk_size=4)
    with pytest.raises(CacheError, match="other settings"):
        score_documents(texts[:-1], teacher, reference, tmp_path, chunk_size=4)
    assert len(score_documents(texts[:-1], teacher, reference, tmp_path, chunk_size=4, overwrite=True)) == 3


def test_models_with_different_tokenizers(models, tmp_path):
    """Only text is shared: the reference tokenizes characters, the teacher words."""
    _, _, teacher, _ = models
    ctok = char_tokenizer()
    reference = CausalLMScorer(tiny_lm(len(ctok), seed=1), ctok, max_length=256)
    texts, _ = domain_docs(2, length=5)
    scores = score_documents(texts, teacher, reference, tmp_path)
    for d, text in zip(scores, texts):
        assert d.teacher_tokens == 4 and d.reference_tokens == len(text) - 1
        assert math.isfinite(d.score)


def test_select_indices_top_and_sample():
    assert select_indices([0.1, 0.9, 0.5, 0.9], 0.5) == [1, 3]
    assert select_indices([float("nan"), 1.0, -math.inf], 0.34) == [1]
    with pytest.raises(ConfigError):
        select_indices([1.0], 0.0)
    # sampling: a document with a much larger score is (almost surely) kept; seeded
    s = [0.0] * 9 + [50.0]
    assert 9 in select_indices(s, 0.2, mode="sample", seed=3)
    assert select_indices(s, 0.5, mode="sample", seed=1) == select_indices(s, 0.5, mode="sample", seed=1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=40), st.floats(0.01, 1.0),
       st.sampled_from(["top", "sample"]), st.integers(0, 5))
def test_select_indices_invariants(scores, fraction, mode, seed):
    kept = select_indices(scores, fraction, mode=mode, seed=seed)
    assert len(kept) == max(1, round(fraction * len(scores)))
    assert kept == sorted(set(kept))
    if mode == "top":  # every kept score >= every dropped score
        dropped = [scores[i] for i in range(len(scores)) if i not in set(kept)]
        assert not dropped or min(scores[i] for i in kept) >= max(dropped)


def test_cli_select(models, tmp_path, capsys):
    tok, base, _, _ = models
    from kdforge.cli.main import main

    base.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    teacher = tiny_lm(len(tok), seed=5)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    texts, domains = domain_docs(3)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in zip(texts, domains)))
    argv = ["select", "--method", "miniplm", "--teacher", str(tmp_path / "teacher"), "--reference",
            str(tmp_path / "ref"), "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--fraction", "0.5",
            "--chunk-size", "4", "--set", "teacher.device=cpu", "--set", "reference.device=cpu"]
    assert main(argv) == 0
    assert "kept 3 of 6 documents" in capsys.readouterr().out
    from datasets import load_from_disk

    ds = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert set(ds.column_names) == {"text", "domain", "miniplm_score"} and len(ds) == 3
    assert main(argv) == 0  # a finished pass is reused, not rescored
    assert main([*argv[:-4], "--max-documents", "4"]) == 2  # other corpus, same folder: refused with a fix
    assert "--overwrite" in capsys.readouterr().err
