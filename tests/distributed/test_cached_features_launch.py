"""``llm_kd`` with a ``teacher: cache`` feature method under ``accelerate launch`` (2 gloo processes):
rank 0 decides the cache's hidden-state layers, every rank builds and reads the same cache, and the
results match one process with the same global batch (kdforge.recipes.llm_features)."""

from __future__ import annotations

import json
import sys

import pytest

from ._tiny_llm import make_teacher_and_corpus, recipe_yaml
from .test_recipe_launch import (
    WORKER,
    _assert_results_match,
    _env,
    _launch_prefix,
    _run_side_by_side,
)

HINT = {"name": "hidden_mse", "weight": 1.0, "params": {"layers": "uniform"}}
METHODS = [{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]},
           {"name": "hint", "teacher": "cache", "objective": [{"name": "cross_entropy", "weight": 1.0}, HINT]}]


@pytest.mark.slow
def test_a_cached_feature_method_under_two_processes_matches_one_process(tmp_path):
    root = make_teacher_and_corpus(tmp_path / "setup")
    config = recipe_yaml(root, tmp_path / "recipe.yaml", methods=METHODS, save_students=False, plot=False)
    one, two = tmp_path / "one", tmp_path / "two"
    _run_side_by_side({
        "the 1-process run (batch 4)": ([sys.executable, str(WORKER), "run", str(config), "-o", str(one),
                                         "--no-report"], _env()),
        "the 2-process run (batch 2 each)": ([*_launch_prefix(), str(WORKER), "run", str(config), "-o", str(two),
                                              "--set", "train.batch_size=2", "--no-report"], _env()),
    })
    results = [json.loads((out / "results.json").read_text()) for out in (one, two)]
    _assert_results_match(*results)
    assert results[1]["teacher_cache"]["features"]["layers"] == [2, 4]
    state = json.loads((two / "hint" / "seed-0" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
