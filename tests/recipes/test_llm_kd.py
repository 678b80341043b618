"""The llm_kd recipe end to end on a tiny teacher and corpus, plus its config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from kdforge.config import validate
from kdforge.errors import ConfigError, DataError
from kdforge.recipes import load_recipe_file
from kdforge.recipes.llm_kd import LLMKD, LLMKDConfig

from ._tiny import seeded_teacher_and_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return seeded_teacher_and_corpus(tmp_path_factory.mktemp("llm_kd"))


def _config(root: Path, **overrides) -> LLMKDConfig:
    data = {
        "teacher": {"model": str(root / "teacher")},
        "student": {"layers": "first_last"},
        "data": {"corpus": str(root / "corpus"), "train_docs": ["book_a"], "eval_docs": ["book_b"],
                 "seq_len": 16, "train_sequences": 8, "eval_sequences": 4},
        "cache": {"k": 8, "batch_size": 4},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "eval_every": 2,
                  "progress": False},
        "eval": {"batch_size": 2, "during_training_sequences": 2, "speed_batch": 2, "speed_repeats": 1},
        **overrides,
    }
    return validate(LLMKDConfig, data, source="test")


def test_recipe_trains_the_same_student_per_method_and_writes_the_run_folder(tiny_setup, tmp_path):
    out = tmp_path / "run"
    results = LLMKD().run(_config(tiny_setup, seeds=[0, 1]), out)

    for name in ("config.yaml", "results.json", "results.md", "quickstart.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["primary_metric"] == "perplexity" and saved["higher_is_better"] is False
    roles = [(m["name"], m["role"]) for m in saved["models"]]
    assert roles == [("teacher", "teacher"), ("student / labels only", "baseline"),
                     ("student / KD top-64", "student")]
    teacher, baseline, kd = saved["models"]
    assert teacher["metrics"]["perplexity"] > 1 and teacher["metrics"]["tokens_per_s"] > 0
    for row in (baseline, kd):
        m = row["metrics"]
        assert {"perplexity", "agreement", "kl_to_teacher", "tokens_per_s", "perplexity_std"} <= set(m)
        assert 0.0 <= m["agreement"] <= 1.0 and m["kl_to_teacher"] >= 0.0
        assert [p["seed"] for p in row["per_seed"]] == [0, 1]
        assert row["params"] < teacher["params"]
    assert saved["student_init"]["source_layers"] == [0, 3]
    assert results["models"][1]["metrics"]["perplexity"] == pytest.approx(baseline["metrics"]["perplexity"])

    # same initial student and same first batch: the first logged CE is identical across methods
    first_ce = []
    for rel in (baseline["run_dir"][0], kd["run_dir"][0]):
        recs = [json.loads(x) for x in (out / rel / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["split"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3]
        assert any(r["split"] == "eval" and "eval/perplexity" in r for r in recs)
        first_ce.append(train[0]["loss/cross_entropy"])
    assert first_ce[0] == pytest.approx(first_ce[1], rel=1e-5)

    student_dir = out / kd["run_dir"][1] / "student"
    reloaded = AutoModelForCausalLM.from_pretrained(student_dir)
    assert reloaded.config.num_hidden_layers == 2
    assert "| teacher |" in (out / "results.md").read_text()


def test_rerun_reuses_the_teacher_cache(tiny_setup, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _config(tiny_setup, methods=[{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}],
                  save_students=False, plot=False)
    LLMKD().run(cfg, out)
    manifest = (out / "teacher_cache" / "manifest.json").read_bytes()
    with caplog.at_level("INFO"):
        LLMKD().run(cfg, out)
    assert "already complete" in caplog.text
    assert (out / "teacher_cache" / "manifest.json").read_bytes() == manifest


def test_config_rejects_unknown_keys_duplicate_methods_and_empty_objectives():
    with pytest.raises(ConfigError, match="unknown key"):
        validate(LLMKDConfig, {"studnet": {}}, source="t")
    with pytest.raises(ConfigError, match="unique"):
        validate(LLMKDConfig, {"methods": [{"name": "a", "objective": [{"name": "cross_entropy", "weight": 1}]}] * 2},
                 source="t")
    with pytest.raises(ConfigError, match="at least one loss term"):
        validate(LLMKDConfig, {"methods": [{"name": "a", "objective": []}]}, source="t")


def test_shipped_quickstart_yaml_is_valid_and_uses_the_documented_regime():
    recipe, config = load_recipe_file(REPO / "configs" / "quickstart.yaml")
    assert isinstance(recipe, LLMKD)
    assert config.data.train_sequences == 160 and config.data.seq_len == 128
    assert config.train.max_steps == 60 and config.train.batch_size == 8 and config.train.lr == 1e-3
    assert config.student.num_layers == 6 and config.student.freeze_embeddings
    assert [m.role for m in config.methods] == ["baseline", "student"]
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert raw["recipe"] == "llm_kd"


def test_unknown_corpus_is_a_clear_error(tiny_setup, tmp_path):
    cfg = _config(tiny_setup, data={"corpus": str(tmp_path / "nope"), "train_docs": ["a"], "eval_docs": ["b"]})
    with pytest.raises(DataError, match="neither 'austen' nor a folder"):
        LLMKD().run(cfg, tmp_path / "run")


def _no_timings(rows):
    return [{k: v for k, v in r.items() if k != "per_seed" and "per_s" not in k and "time" not in k}
            | {"metrics": {k: v for k, v in r["metrics"].items() if "per_s" not in k}} for r in rows]


def test_resume_reuses_finished_sub_runs_and_retrains_those_whose_config_changed(tiny_setup, tmp_path, caplog):
    out = tmp_path / "run"
    methods = [{"name": "ce", "role": "baseline", "objective": [{"name": "cross_entropy", "weight": 1.0}]},
               {"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}]
    cfg = _config(tiny_setup, methods=methods, save_students=False, plot=False)
    first = LLMKD().run(cfg, out)
    assert json.loads((out / "kd" / "seed-0" / "subrun.json").read_text())["weights"] == "final.safetensors"
    with caplog.at_level("INFO"):
        again = LLMKD().run(cfg, out, resume=True)
    assert "'ce', seed 0 finished earlier" in caplog.text and "'kd', seed 0 finished earlier" in caplog.text
    assert _no_timings(again["models"]) == _no_timings(first["models"])  # the reloaded weights score the same

    caplog.clear()
    changed = _config(tiny_setup, methods=[methods[0], {**methods[1], "objective": [
        {"name": "forward_kl", "weight": 0.5}]}], save_students=False, plot=False)
    with caplog.at_level("INFO"):
        LLMKD().run(changed, out, resume=True)
    assert "'ce', seed 0 finished earlier" in caplog.text
    assert "'kd', seed 0 finished earlier" not in caplog.text and "trained with another config" in caplog.text


def test_resume_retrains_a_sub_run_whose_weights_no_longer_match_their_checksum(tiny_setup, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _config(tiny_setup, methods=[{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}],
                  plot=False)  # save_students: the record points at student/model.safetensors
    LLMKD().run(cfg, out)
    record = json.loads((out / "kd" / "seed-0" / "subrun.json").read_text())
    assert record["weights"] == "student/model.safetensors"
    weights = out / "kd" / "seed-0" / record["weights"]
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with caplog.at_level("INFO"):
        LLMKD().run(cfg, out, resume=True)
    assert "do not match their checksum" in caplog.text and "finished earlier" not in caplog.text


def test_a_cache_with_sampled_tail_trains_forward_kl_and_refuses_a_nonlinear_loss(tiny_setup, tmp_path):
    """cache.tail_samples reaches the cache and the trainer: the batches carry how many entries are
    exact, so forward KL trains on the unbiased estimate and JSD (not linear in p) is refused."""
    cfg = _config(tiny_setup, cache={"k": 2, "tail_samples": 4, "batch_size": 4},
                  methods=[{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}],
                  save_students=False, plot=False)
    saved = LLMKD().run(cfg, tmp_path / "ok")
    manifest = json.loads((tmp_path / "ok" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["tail_samples"] == 4
    assert saved["models"][1]["metrics"]["kl_to_teacher"] >= 0.0

    jsd = cfg.model_copy(update={"methods": [validate(type(cfg.methods[0]), {
        "name": "jsd", "objective": [{"name": "generalized_jsd", "weight": 1.0}]}, source="test")]})
    with pytest.raises(ConfigError, match="sampled|estimate|forward"):
        LLMKD().run(jsd, tmp_path / "refused")
