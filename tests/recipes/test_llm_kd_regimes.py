"""llm_kd per-method regimes: on-policy GKD, TAID schedule, chunked loss, and their config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.recipes.test_llm_kd import _config, tiny_setup  # noqa: F401  (shared tiny teacher/corpus fixture)

from kdforge.config import validate
from kdforge.errors import ConfigError
from kdforge.recipes import load_recipe_file
from kdforge.recipes.llm_kd import LLMKD, LLMKDConfig

REPO = Path(__file__).resolve().parents[2]
TAID = {"name": "taid", "weight": 1.0}
CE = {"name": "cross_entropy", "weight": 1.0}


def _fast(root, methods, **kw):
    return _config(root, methods=methods, plot=False, save_students=False,
                   train={"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 2, "eval_every": 4,
                          "progress": False}, **kw)


def _rows(out):
    return {m["name"]: m for m in json.loads((out / "results.json").read_text())["models"]}


def test_on_policy_taid_and_chunked_methods_train_and_write_results(tiny_setup, tmp_path):  # noqa: F811
    methods = [
        {"name": "labels only", "role": "baseline", "objective": [CE]},
        {"name": "gkd", "objective": [{"name": "generalized_jsd", "weight": 1.0, "params": {"beta": 0.5}}],
         "on_policy": {"lmbda": 1.0, "max_new_tokens": 6, "prompt_tokens": 6}},
        {"name": "taid", "objective": [TAID, {"name": "cross_entropy", "weight": 0.0}],
         "taid": {"t_start": 0.4, "mode": "linear"}},
        {"name": "kd chunked", "objective": [{"name": "forward_kl", "weight": 1.0}, CE], "chunked": True},
    ]
    out = tmp_path / "run"
    LLMKD().run(_fast(tiny_setup, methods), out)
    rows = _rows(out)
    for name in ("labels only", "gkd", "taid", "kd chunked"):
        m = rows[f"student / {name}"]["metrics"]
        assert m["perplexity"] > 1 and 0 <= m["agreement"] <= 1, name
    assert rows["student / gkd"]["regime"]["on_policy"]["lmbda"] == 1.0
    assert rows["student / kd chunked"]["regime"]["chunked"] is True
    # linear TAID over 4 steps: t goes 0.4 -> 1.0 and the last log says so
    assert rows["student / taid"]["per_seed"][0]["taid_t_final"] == pytest.approx(1.0)
    taid_log = [json.loads(x) for x in (out / "taid" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["taid/t"] for r in taid_log if r["split"] == "train"] == pytest.approx([0.4 + 0.6 * 2 / 4, 1.0])
    assert [r["step"] for r in gkd_log(out) if r["split"] == "train"] == [2, 4]


def gkd_log(out):
    return [json.loads(x) for x in (out / "gkd" / "seed-0" / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_method_trains_on_student_samples_scored_by_the_online_teacher(tiny_setup, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    from kdforge.train import onpolicy

    calls = []
    real = onpolicy.HFGenerator.__call__

    def spy(self, model, prompts, config):
        calls.append((type(model).__name__, [len(p) for p in prompts], config.max_new_tokens))
        return real(self, model, prompts, config)

    monkeypatch.setattr(onpolicy.HFGenerator, "__call__", spy)
    methods = [{"name": "labels only", "role": "baseline", "objective": [CE]},
               {"name": "gkd", "objective": [{"name": "reverse_kl", "weight": 1.0}],
                "on_policy": {"lmbda": 1.0, "max_new_tokens": 5, "prompt_tokens": 7}}]
    LLMKD().run(_fast(tiny_setup, methods), tmp_path / "run")
    # lmbda=1: each of the 4 steps samples the student on 4 prompts of 7 tokens; the cached-teacher
    # baseline never generates
    assert len(calls) == 4
    assert all(lengths == [7, 7, 7, 7] and new == 5 for _, lengths, new in calls)
    assert all(r["loss/reverse_kl"] >= 0 for r in gkd_log(tmp_path / "run") if r["split"] == "train")

def test_chunked_method_gives_the_same_training_as_the_unchunked_one(tiny_setup, tmp_path):  # noqa: F811
    kd = [{"name": "forward_kl", "weight": 1.0}, {"name": "cross_entropy", "weight": 0.5}]
    out = tmp_path / "run"
    LLMKD().run(_fast(tiny_setup, [{"name": "plain", "objective": kd},
                                   {"name": "chunked", "objective": kd, "chunked": True}]), out)
    rows = _rows(out)
    assert rows["student / chunked"]["metrics"]["perplexity"] == pytest.approx(
        rows["student / plain"]["metrics"]["perplexity"], rel=1e-4)


@pytest.mark.parametrize(("method", "key"), [
    ({"name": "m", "objective": [CE], "taid": {"t_start": 0.4}}, "taid"),
    ({"name": "m", "objective": [TAID], "taid": {"t_start": 0.9, "t_end": 0.5}}, "t_start"),
    ({"name": "m", "objective": [TAID], "taid": {"term": "nope"}}, "taid.term"),
    ({"name": "m", "objective": [CE], "on_policy": {"lmbda": 1.5}}, "lmbda"),
    ({"name": "m", "objective": [CE], "on_policy": {"max_new_tokns": 4}}, "max_new_tokns"),
    ({"name": "m", "objective": [TAID, CE, {"name": "reverse_kl", "weight": 1.0}], "chunked": True}, "chunked"),
    ({"name": "m", "objective": [CE], "on_policy": {"prompt_tokens": 16}}, "prompt_tokens"),
    ({"name": "m", "objective": [CE], "on_policy": {"vllm": {"sync_every": 2}}}, "backend"),
    ({"name": "m", "objective": [CE], "on_policy": {"backend": "vllm", "vllm": {"sync_evry": 2}}}, "sync_evry"),
    ({"name": "m", "objective": [CE], "on_policy": {"backend": "sglang"}}, "backend"),
])
def test_bad_regime_option_is_a_config_error_naming_the_key(tiny_setup, method, key):  # noqa: F811
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        _fast(tiny_setup, [method])
    assert "methods" in str(info.value)


@pytest.mark.parametrize("name", ["gkd.yaml", "taid.yaml"])
def test_shipped_regime_configs_validate(name):
    recipe, config = load_recipe_file(REPO / "configs" / name)
    assert isinstance(config, LLMKDConfig)
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    assert raw["recipe"] == "llm_kd"
    regimes = [m for m in config.methods if m.on_policy is not None or m.taid is not None]
    assert regimes and any(m.role == "baseline" for m in config.methods)


def test_taid_without_schedule_keeps_its_fixed_t(tiny_setup):  # noqa: F811
    config = validate(LLMKDConfig, {"methods": [{"name": "m", "objective": [{**TAID, "params": {"t": 0.7}}]}]},
                      source="test")
    assert config.methods[0].taid is None and config.methods[0].objective[0].params == {"t": 0.7}
