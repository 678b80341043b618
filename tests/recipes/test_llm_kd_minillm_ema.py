"""llm_kd method keys of kdforge.recipes.llm_regimes: MiniLLM (minillm:) and EMA self-KD (teacher: ema)."""

from __future__ import annotations

import json

import pytest
from tests.recipes.test_llm_kd import tiny_setup  # noqa: F401  (shared tiny teacher/corpus fixture)
from tests.recipes.test_llm_kd_regimes import CE, _fast, _rows

from kdforge.errors import ConfigError
from kdforge.recipes.llm_kd import LLMKD

MINILLM = {"name": "minillm", "weight": 1.0}
FKL = {"name": "forward_kl", "weight": 1.0}


def _log(out, name):
    return [json.loads(x) for x in (out / name / "seed-0" / "metrics.jsonl").read_text().splitlines()]


def test_minillm_and_ema_methods_train_from_yaml_keys_and_record_their_regime(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    from kdforge.train import minillm

    calls = []
    real = minillm.sample_mixed

    def spy(student, teacher, prompts, alpha, config, **kw):
        calls.append((alpha, [len(p) for p in prompts], config.max_new_tokens))
        return real(student, teacher, prompts, alpha, config, **kw)

    monkeypatch.setattr(minillm, "sample_mixed", spy)
    methods = [{"name": "labels only", "role": "baseline", "objective": [CE]},
               {"name": "minillm", "objective": [MINILLM],
                "minillm": {"alpha": 0.2, "max_new_tokens": 5, "prompt_tokens": 7}},
               {"name": "ema", "teacher": "ema", "ema": {"decay": 0.9}, "objective": [FKL, CE]}]
    out = tmp_path / "run"
    LLMKD().run(_fast(tiny_setup, methods), out)
    rows = _rows(out)
    for name in ("minillm", "ema"):
        m = rows[f"student / {name}"]["metrics"]
        assert m["perplexity"] > 1 and 0 <= m["agreement"] <= 1, name
    assert rows["student / minillm"]["regime"]["minillm"]["alpha"] == 0.2
    assert rows["student / ema"]["regime"]["ema"] == {"decay": 0.9, "every": 1}
    assert "minillm" not in rows["student / labels only"]["regime"]
    # every one of the 4 steps samples 4 prompts of 7 tokens from the teacher-student mix
    assert calls == [(0.2, [7, 7, 7, 7], 5)] * 4
    assert all(r["loss/minillm"] >= 0 for r in _log(out, "minillm") if r["split"] == "train")
    # the EMA method distils from its own average: the dense KL term is logged beside the labels
    ema_log = [r for r in _log(out, "ema") if r["split"] == "train"]
    assert ema_log and all("loss/forward_kl" in r and "loss/cross_entropy" in r for r in ema_log)


@pytest.mark.parametrize("method, match", [
    ({"name": "m", "objective": [CE], "minillm": {"alpha": 0.2}}, "needs a term"),
    ({"name": "m", "objective": [MINILLM], "minillm": {"alpha": 1.5}}, "alpha"),
    ({"name": "m", "objective": [{"name": "minillm", "weight": 1.0, "params": {"alpha": 0.5}}],
      "minillm": {"alpha": 0.2}}, "set alpha once"),
    ({"name": "m", "teacher": "cache", "objective": [MINILLM], "minillm": {}}, "teacher: cache"),
    ({"name": "m", "objective": [MINILLM], "minillm": {}, "on_policy": {"lmbda": 1.0}}, "keep one"),
    ({"name": "m", "objective": [FKL], "ema": {"decay": 0.9}}, "teacher is not ema"),
    ({"name": "m", "objective": [MINILLM], "minillm": {"prompt_tokens": 64}}, "prompt_tokens"),
])
def test_inconsistent_minillm_or_ema_keys_are_config_errors_naming_the_problem(tiny_setup, tmp_path, method, match):  # noqa: F811
    with pytest.raises(ConfigError, match=match):
        _fast(tiny_setup, [method])
