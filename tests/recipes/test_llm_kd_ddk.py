"""llm_kd's ``ddk:`` method key (kdforge.recipes.llm_ddk): domains from data.domain_field, DDK's
measuring rows carved out of the held-out set, the sampler trained from YAML, per-domain scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from kdforge.config import validate
from kdforge.errors import ConfigError, DataError
from kdforge.recipes.llm_ddk import carve_dev, teacher_domain_losses
from kdforge.recipes.llm_kd import LLMKD, LLMKDConfig
from kdforge.recipes.lm_data import DatasetSpec, build_lm_data

from . import _byo

TRAIN = {"max_steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 1, "eval_every": None, "progress": False}
EVAL = {"batch_size": 4, "during_training_sequences": 0, "speed_batch": 2, "speed_repeats": 1}
KD = [{"name": "forward_kl", "weight": 1.0}, {"name": "cross_entropy", "weight": 0.5}]


def _domains_jsonl(path: Path, rows_per_domain: int = 20) -> None:
    """Two domains with disjoint word sets (``low``: w0-w29, ``high``: w30-w59)."""
    rng = random.Random(0)
    lines = []
    for domain, words in (("low", _byo.WORDS[:30]), ("high", _byo.WORDS[30:])):
        for _ in range(rows_per_domain):
            lines.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(6, 12))), "domain": domain})
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kd-ddk")
    _byo.teacher_and_student(root)
    _domains_jsonl(root / "domains.jsonl")
    return root


def _tok(root: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "teacher")


def _spec(root: Path, **kw) -> DatasetSpec:
    return DatasetSpec(path=str(root / "domains.jsonl"), eval_fraction=0.4, max_length=24, domain_field="domain",
                       **kw)


def _config(root: Path, out: Path, methods: list[dict], **data) -> LLMKDConfig:
    raw = {"output_dir": str(out), "teacher": {"model": str(root / "teacher")},
           "student": {"kind": "from_config", "hidden_size": 16, "num_layers": 2},
           "data": {"path": str(root / "domains.jsonl"), "eval_fraction": 0.4, "max_length": 24,
                    "domain_field": "domain", **data},
           "cache": {"k": 8, "batch_size": 8}, "train": TRAIN, "eval": EVAL, "plot": False,
           "save_students": False, "methods": methods}
    return validate(LLMKDConfig, raw, source="test")


def test_domains_follow_the_rows_through_rendering(setup):
    data = build_lm_data(_spec(setup), _tok(setup))
    assert len(data.train_domains) == data.train.shape[0] and len(data.eval_domains) == data.eval.shape[0]
    vocab = _tok(setup).get_vocab()
    low_ids = {vocab[w] for w in _byo.WORDS[:30]}
    for row, mask, domain in zip(data.train, data.train_mask, data.train_domains):
        words = set(row[mask.bool()].tolist()) & {vocab[w] for w in _byo.WORDS}
        assert (words <= low_ids) == (domain == "low")  # each row kept its own domain
    assert data.summary["domains"]["train"].keys() == {"low", "high"}
    # held-out batches hold one domain each and say which
    batches = data.eval_batches(3)
    assert {b["domain"] for b in batches} == {"low", "high"}
    assert sum(b["input_ids"].shape[0] for b in batches) == data.eval.shape[0]


def test_carve_dev_takes_the_first_rows_of_each_domain_and_keeps_the_rest(setup):
    data = build_lm_data(_spec(setup), _tok(setup))
    rest, dev = carve_dev(data, 2)
    assert sorted(dev) == ["high", "low"] and all(len(d) == 2 for d in dev.values())
    assert rest.eval.shape[0] == data.eval.shape[0] - 4 == len(rest.eval_domains)
    first_low = data.eval_domains.index("low")
    assert torch.equal(dev["low"][0]["input_ids"], data.eval[first_low])
    kept = {tuple(r.tolist()) for r in rest.eval}
    assert all(tuple(d[i]["input_ids"].tolist()) not in kept for d in dev.values() for i in range(2))
    with pytest.raises(DataError, match="none would be left"):
        carve_dev(data, 100)
    no_domains = build_lm_data(DatasetSpec(path=str(setup / "domains.jsonl"), eval_fraction=0.4, max_length=24),
                               _tok(setup))
    with pytest.raises(ConfigError, match="domain_field"):
        carve_dev(no_domains, 2)


def test_teacher_domain_loss_is_the_mean_cross_entropy_by_hand(setup):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(setup / "teacher").eval()
    data = build_lm_data(_spec(setup), _tok(setup))
    _, dev = carve_dev(data, 3)
    got = teacher_domain_losses(teacher, dev, batch_size=2)
    for domain, rows in dev.items():
        total = count = 0.0
        for i in range(len(rows)):
            item = rows[i]
            keep = item["attention_mask"].bool()
            ids = item["input_ids"][keep]
            labels = item["labels"][keep]
            with torch.no_grad():
                logp = torch.log_softmax(teacher(input_ids=ids[None]).logits[0, :-1].float(), -1)
            target = labels[1:]
            real = target != -100
            total += float(-logp[real].gather(-1, target[real, None]).sum())
            count += float(real.sum())
        assert got[domain] == pytest.approx(total / count, rel=1e-4)


def test_ddk_method_trains_from_yaml_moves_the_mixture_and_scores_by_domain(setup, tmp_path):
    methods = [{"name": "uniform", "objective": KD},
               {"name": "ddk", "objective": KD, "ddk": {"update_every": 1, "dev_examples": 2, "alpha": 0.8}}]
    out = tmp_path / "run"
    LLMKD().run(_config(setup, out, methods), out)
    history = json.loads((out / "ddk" / "seed-0" / "ddk_weights.json").read_text())
    assert history["domains"] == ["high", "low"]
    assert [h["step"] for h in history["history"]] == [0, 1, 2, 3]
    assert history["history"][-1]["weights"] != [0.5, 0.5]
    teacher_losses = {tuple(h["teacher_loss"]) for h in history["history"][1:]}
    assert len(teacher_losses) == 1  # the frozen teacher is measured once, before training
    logs = [json.loads(x) for x in (out / "ddk" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert any("ddk/weight/low" in r for r in logs if r.get("split") == "train")
    assert not (out / "uniform" / "seed-0" / "ddk_weights.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["ddk_dev_examples"] == {"high": 2, "low": 2}
    rows = {r["name"]: r for r in results["models"]}
    for name in ("teacher", "student / uniform", "student / ddk"):
        assert set(rows[name]["breakdowns"]["perplexity by domain"]) == {"high", "low"}
    assert "perplexity by domain" in (out / "results.md").read_text()


def test_ddk_without_domains_is_refused_before_anything_runs(setup, tmp_path):
    raw = {"output_dir": str(tmp_path), "teacher": {"model": str(setup / "teacher")},
           "data": {"path": str(setup / "domains.jsonl"), "eval_fraction": 0.4},
           "methods": [{"name": "ddk", "objective": KD, "ddk": {}}]}
    with pytest.raises(ConfigError, match="domain_field"):
        validate(LLMKDConfig, raw, source="test")
    with pytest.raises(ConfigError, match="packing"):
        build_lm_data(_spec(setup, packing=True, block_size=8), _tok(setup))
    with pytest.raises(DataError, match="not a column"):
        build_lm_data(DatasetSpec(path=str(setup / "domains.jsonl"), eval_fraction=0.4, domain_field="topic"),
                      _tok(setup))
