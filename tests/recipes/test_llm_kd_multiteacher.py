"""llm_kd with several teachers (kdforge.recipes.llm_teachers): teachers: and teacher: ensemble."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tests.recipes.test_llm_kd import _config, tiny_setup  # noqa: F401  (shared tiny teacher/corpus fixture)
from tests.recipes.test_llm_kd_regimes import CE, _rows

from kdforge.errors import ConfigError, VocabMismatchError
from kdforge.recipes import llm_teachers
from kdforge.recipes.llm_kd import LLMKD, check_inputs, subrun_fingerprint

FKL = {"name": "forward_kl", "weight": 1.0, "params": {"sparse_policy": "tail_bucket"}}


def _fast(root, methods, steps=4, lr=1e-3, **kw):
    return _config(root, methods=methods, plot=False, save_students=False,
                   train={"max_steps": steps, "batch_size": 4, "lr": lr, "log_every": 1, "eval_every": steps,
                          "progress": False}, **kw)


@pytest.fixture(scope="module")
def two_teachers(tiny_setup):  # noqa: F811
    """The tiny teacher plus a second one: the same tokenizer, perturbed weights (a 'fine-tuned copy')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_setup / "teacher_b"
    if not folder.exists():
        model = AutoModelForCausalLM.from_pretrained(tiny_setup / "teacher")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std().clamp_min(1e-3))
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny_setup / "teacher").save_pretrained(folder)
    return tiny_setup


def _train_log(out, name):
    lines = (out / name / "seed-0" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train" and "loss" in r]


def _teachers(root):
    return [{"name": "b", "model": str(root / "teacher_b")}]


def test_an_ensemble_of_the_one_teacher_gives_the_single_teacher_loss(two_teachers, tmp_path):
    methods = [{"name": "kd", "objective": [FKL, CE]},
               {"name": "ens", "teacher": "ensemble", "ensemble": {"members": ["teacher"]}, "objective": [FKL, CE]}]
    out = tmp_path / "run"
    LLMKD().run(_fast(two_teachers, methods), out)
    single, ens = _train_log(out, "kd"), _train_log(out, "ens")
    assert len(single) == len(ens) == 4
    for a, b in zip(single, ens, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["loss/forward_kl"] == pytest.approx(b["loss/forward_kl"], rel=1e-5)
    rows = _rows(out)
    assert rows["student / ens"]["metrics"]["perplexity"] == pytest.approx(
        rows["student / kd"]["metrics"]["perplexity"], rel=1e-4)
    assert rows["student / ens"]["regime"]["ensemble"]["members"] == ["teacher"]
    assert not (out / "teacher_cache-teacher").exists()  # the member 'teacher' reads the run's own cache


def _record_ensemble_sources(monkeypatch) -> dict:
    """``{method name: the EnsembleTeacher the recipe built for it}``, filled as the run goes."""
    sources = {}
    real = llm_teachers.ensemble_teacher

    def spy(method, teachers, data):
        got = real(method, teachers, data)
        sources[method.name] = got[0]
        return got

    monkeypatch.setattr(llm_teachers, "ensemble_teacher", spy)
    return sources


def test_two_cached_teachers_and_an_online_pair_train_the_student(two_teachers, tmp_path, monkeypatch):
    sources = _record_ensemble_sources(monkeypatch)
    methods = [
        {"name": "fixed", "teacher": "ensemble", "objective": [FKL],
         "ensemble": {"members": ["teacher", "b"], "weights": [0.5, 0.5]}},
        {"name": "entropy", "teacher": "ensemble", "objective": [FKL],
         "ensemble": {"members": ["teacher", "b"], "weighting": "entropy", "temperature": 0.5}},
        {"name": "online", "teacher": "ensemble", "objective": [{"name": "forward_kl", "weight": 1.0}],
         "ensemble": {"members": ["teacher", "b"], "weighting": "confidence", "source": "online"}},
    ]
    out = tmp_path / "run"
    LLMKD().run(_fast(two_teachers, methods, steps=8, lr=3e-3, teachers=_teachers(two_teachers)), out)
    for name in ("fixed", "entropy", "online"):
        log = _train_log(out, name)
        assert len(log) == 8
        first, last = sum(r["loss"] for r in log[:2]), sum(r["loss"] for r in log[-2:])
        assert last < first, (name, [r["loss"] for r in log])
        w = sources[name].last_weights  # [members, samples of the last batch it scored]
        assert w.shape[0] == 2 and torch.allclose(w.sum(0), torch.ones(w.shape[1]))
    assert torch.all(sources["fixed"].last_weights == 0.5)
    assert not torch.allclose(sources["entropy"].last_weights, torch.tensor(0.5))
    # one cache per cached member: the run's own and teacher b's beside it
    for cache in ("teacher_cache", "teacher_cache-b"):
        assert (out / cache / "manifest.json").is_file(), cache
    rows = _rows(out)
    assert rows["teacher / b"]["role"] == "teacher"
    assert rows["teacher / b"]["metrics"]["perplexity"] != pytest.approx(rows["teacher"]["metrics"]["perplexity"])


def test_member_caches_are_built_once_and_reused_on_resume(two_teachers, tmp_path):
    methods = [{"name": "ens", "teacher": "ensemble", "objective": [FKL],
                "ensemble": {"members": ["teacher", "b"]}}]
    config = _fast(two_teachers, methods, teachers=_teachers(two_teachers))
    out = tmp_path / "run"
    LLMKD().run(config, out)

    def stamps():
        return {p.relative_to(out): p.stat().st_mtime_ns for c in ("teacher_cache", "teacher_cache-b")
                for p in sorted((out / c).rglob("*")) if p.is_file()}

    before = stamps()
    assert len(before) >= 4
    LLMKD().run(config, out, resume=True)
    assert stamps() == before
    # the fingerprint of an ensemble sub-run follows its further teachers; another method's does not
    moved = tmp_path / "teacher_b_copy"
    shutil.copytree(two_teachers / "teacher_b", moved)
    other = _fast(two_teachers, methods + [{"name": "ce", "objective": [CE]}],
                  teachers=[{"name": "b", "model": str(moved)}])
    same = _fast(two_teachers, methods + [{"name": "ce", "objective": [CE]}], teachers=_teachers(two_teachers))
    assert subrun_fingerprint(other, other.methods[0], 0) != subrun_fingerprint(same, same.methods[0], 0)
    assert subrun_fingerprint(other, other.methods[1], 0) == subrun_fingerprint(same, same.methods[1], 0)


ENS = {"name": "m", "teacher": "ensemble", "objective": [FKL], "ensemble": {"members": ["teacher", "b"]}}


@pytest.mark.parametrize("method, extra, match", [
    ({"name": "m", "teacher": "ensemble", "objective": [FKL]}, {}, "needs ensemble"),
    ({"name": "m", "objective": [FKL], "ensemble": {"members": ["teacher"]}}, {}, "teacher is not ensemble"),
    ({**ENS, "ensemble": {"members": ["teacher", "c"]}}, {}, r"\['c'\] name no teacher"),
    ({**ENS, "ensemble": {"members": ["teacher", "b"], "weights": [1.0]}}, {}, "one weight per member"),
    ({**ENS, "ensemble": {"members": ["teacher", "b"], "weights": [1, 1], "weighting": "entropy"}}, {},
     "drop weights"),
    ({**ENS, "ensemble": {"members": ["teacher", "teacher"]}}, {}, "distinct"),
    ({**ENS, "on_policy": {"lmbda": 1.0}}, {}, "Python API"),
    ({"name": "m", "objective": [{**FKL, "per_teacher": True}]}, {}, "per_teacher.*needs teacher: ensemble"),
    (ENS, {"cache": {"k": 8, "tail_samples": 4}}, "tail_samples"),
    (ENS, {"teachers": [{"name": "teacher", "model": "x"}]}, "run's own teacher"),
    (ENS, {"teachers": [{"name": "b", "model": "x"}, {"name": "b", "model": "y"}]}, "distinct"),
])
def test_inconsistent_ensemble_keys_are_config_errors_naming_the_fix(two_teachers, method, extra, match):
    extra = {"teachers": _teachers(two_teachers), **extra}
    with pytest.raises(ConfigError, match=match):
        _fast(two_teachers, [method], **extra)


def test_a_teacher_of_another_vocabulary_is_refused_before_anything_is_written(two_teachers, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    wider = tmp_path / "wider"
    model = AutoModelForCausalLM.from_pretrained(two_teachers / "teacher")
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(wider)
    shutil.copy(two_teachers / "teacher" / "tokenizer.json", wider)
    shutil.copy(two_teachers / "teacher" / "tokenizer_config.json", wider)
    other_tok = tmp_path / "other_tok"
    AutoModelForCausalLM.from_pretrained(two_teachers / "teacher").save_pretrained(other_tok)
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *(f"x{i}" for i in range(60))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(other_tok)
    for folder, match in ((wider, "logits per position"), (other_tok, "another tokenizer")):
        config = _fast(two_teachers, [ENS], teachers=[{"name": "b", "model": str(folder)}])
        with pytest.raises(VocabMismatchError, match=match) as info:
            check_inputs(config)
        assert info.value.fix
        out = tmp_path / f"run-{folder.name}"
        with pytest.raises(VocabMismatchError):
            LLMKD().run(config, out)
        assert not out.exists()


def test_per_teacher_terms_over_a_cached_pair_sum_the_members_losses(two_teachers, tmp_path, monkeypatch):
    """``per_teacher: true`` on a cached two-member ensemble: the recipe builds the source with the members'
    signals; an ensemble of the one teacher with per_teacher gives the single teacher's reverse KL."""
    rkl = {"name": "reverse_kl", "weight": 1.0}
    sources = _record_ensemble_sources(monkeypatch)
    methods = [{"name": "kd", "objective": [rkl, CE]},
               {"name": "one", "teacher": "ensemble", "ensemble": {"members": ["teacher"]},
                "objective": [{**rkl, "per_teacher": True}, CE]},
               {"name": "pair", "teacher": "ensemble", "ensemble": {"members": ["teacher", "b"]},
                "objective": [{**rkl, "per_teacher": True}, CE]}]
    out = tmp_path / "run"
    LLMKD().run(_fast(two_teachers, methods, teachers=_teachers(two_teachers)), out)
    assert sources["one"].per_member_signals and sources["pair"].per_member_signals
    single, one, pair = _train_log(out, "kd"), _train_log(out, "one"), _train_log(out, "pair")
    for a, b in zip(single, one, strict=True):
        assert a["loss/reverse_kl"] == pytest.approx(b["loss/reverse_kl"], rel=1e-5)
    assert pair[0]["loss/reverse_kl"] != pytest.approx(single[0]["loss/reverse_kl"], rel=1e-3)
