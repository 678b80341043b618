"""benchmarks/onpolicy_eval_run.py on a tiny finished llm_kd run (seconds), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml
from tests.recipes.test_llm_kd import _config, tiny_setup  # noqa: F401  (shared tiny teacher/corpus fixture)

from kdforge.recipes.llm_kd import LLMKD

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "onpolicy_eval_run.py"


def test_scores_every_saved_student_and_the_references_on_their_own_samples(tiny_setup, tmp_path):  # noqa: F811
    spec = importlib.util.spec_from_file_location("kdforge_bench_onpolicy_eval_run", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    run = tmp_path / "run"
    methods = [{"name": "labels only", "role": "baseline", "objective": [{"name": "cross_entropy", "weight": 1.0}]},
               {"name": "minillm", "objective": [{"name": "minillm", "weight": 1.0}],
                "minillm": {"alpha": 0.2, "max_new_tokens": 4, "prompt_tokens": 6}}]
    config = _config(tiny_setup, methods=methods, plot=False, seeds=[0, 1])
    LLMKD().run(config, run)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({"recipe": "llm_kd", **config.model_dump(mode="json", exclude_unset=True)}))
    out = tmp_path / "onpolicy.jsonl"
    assert bench.main([str(cfg_file), str(run), "--prompts", "2", "--prompt-tokens", "6", "--new-tokens", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in rows] == [("teacher", None), ("student init", None), ("labels only", 0),
                                                        ("labels only", 1), ("minillm", 0), ("minillm", 1)]
    assert rows[0]["kl_from_teacher"] == 0.0 and rows[0]["agreement"] == 1.0  # the teacher on its own samples
    assert all(r["kl_from_teacher"] > 0 and 0 < r["mean_length"] <= 4 for r in rows[1:])
    table = bench.markdown(rows)
    assert "| minillm |" in table and "±" in table
