"""fashion_mnist_kd with trilateral KD's true bilevel ratio update, from YAML, on tiny synthetic images."""

from __future__ import annotations

import json

import pytest
import torch

from kdforge.config import validate
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.recipes.fashion_mnist import FashionMnistConfig, FashionMnistKD
from kdforge.recipes.learned_terms import attach_bilevel, attach_learned_terms
from kdforge.students import build_vision_model
from kdforge.train import TrilateralMetaLearner
from kdforge.train.objective import Objective


def _term(**bilevel):
    return {"name": "trilateral_kd", "weight": 1.0, "params": {"temperature": 2.0, "bilevel": bilevel}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=160, n_test=40)


def test_attach_bilevel_holds_out_a_split_and_builds_the_learner():
    model = build_vision_model("small_cnn")
    objective = Objective([_term(holdout="split", holdout_fraction=0.2)])
    attach_learned_terms(model, objective)
    data = [{"inputs": torch.zeros(1, 28, 28), "labels": torch.tensor(i % 4)} for i in range(40)]
    train, learners = attach_bilevel(objective, data, seed=0)
    assert len(train) == 32 and len(learners) == 1 and isinstance(learners[0], TrilateralMetaLearner)
    assert learners[0].fusion is objective.terms[0].params["fusion"] and learners[0].temperature == 2.0
    assert len(learners[0].holdout[1]) == 8
    same, none = attach_bilevel(Objective([{"name": "trilateral_kd", "weight": 1.0}]), data)
    assert same is data and none == []


def test_bilevel_methods_train_from_yaml(data_dir, tmp_path):
    config = validate(FashionMnistConfig, {
        "data": {"root": str(data_dir), "labelled": 40, "transfer": 0},
        "teacher": {"arch": "mlp", "kwargs": {"hidden": [64]}, "epochs": 1, "batch_size": 64},
        "train": {"epochs": 6, "batch_size": 16},
        "seeds": [0],
        "methods": [{"name": "labels only", "role": "baseline", "terms": [{"name": "cross_entropy", "weight": 1.0}]},
                    {"name": "bilevel head", "terms": [_term(lookahead="head", holdout="split")]},
                    {"name": "bilevel all", "terms": [_term(lookahead="all", holdout="batch")]}],
        "eval": {"latency_warmup": 1, "latency_repeats": 2},
    }, source="test")
    results = FashionMnistKD().run(config, tmp_path / "run")
    rows = {m["name"]: m for m in results["models"]}
    for name in ("bilevel head", "bilevel all"):
        assert 0.0 <= rows[f"student / {name}"]["metrics"]["accuracy"] <= 1.0
        records = [json.loads(line) for line in
                   (tmp_path / "run" / "students" / name.replace(" ", "-") / "seed-0" / "metrics.jsonl")
                   .read_text().splitlines()]
        losses = [r["loss"] for r in records if r.get("split") == "train" and "loss" in r]
        assert losses[-1] < losses[0]  # the student learned
