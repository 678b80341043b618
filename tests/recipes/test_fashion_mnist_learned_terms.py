"""fashion_mnist_kd with the losses that bring learnable parts (dual-head KD's auxiliary head,
trilateral KD's ratio network) and DAC-KL, end to end on tiny synthetic images."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kdforge.config import validate
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.errors import ConfigError
from kdforge.losses import DACClipNet, TrilateralFusion
from kdforge.recipes.fashion_mnist import FashionMnistConfig, FashionMnistKD
from kdforge.recipes.learned_terms import attach_learned_terms, unwrap_student
from kdforge.students import DualHeadStudent, build_vision_model
from kdforge.train.objective import Objective

METHODS = [
    {"name": "dual head", "terms": [{"name": "dual_head_kd", "weight": 1.0,
                                     "params": {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 2.0}}]},
    {"name": "trilateral", "terms": [{"name": "trilateral_kd", "weight": 1.0, "params": {"temperature": 2.0}}]},
    {"name": "dac", "terms": [{"name": "dac_kl", "weight": 0.5, "params": {"mass": 0.9, "temperature": 2.0}},
                              {"name": "cross_entropy", "weight": 0.5}]},
    {"name": "dac learned", "terms": [{"name": "dac_kl", "weight": 0.5,
                                       "params": {"learned": True, "mass": 0.9, "temperature": 2.0}},
                                      {"name": "cross_entropy", "weight": 0.5}]},
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=160, n_test=40)


def test_attach_wraps_for_dual_head_and_creates_the_ratio_network():
    model = build_vision_model("small_cnn")
    objective = Objective(METHODS[0]["terms"])
    wrapped, extras = attach_learned_terms(model, objective)
    assert isinstance(wrapped, DualHeadStudent) and extras == {}
    assert objective.terms[0].params["heads"] is wrapped and unwrap_student(wrapped) is model
    objective = Objective(METHODS[1]["terms"])
    same, extras = attach_learned_terms(model, objective)
    assert same is model and isinstance(objective.terms[0].params["fusion"], TrilateralFusion)
    assert list(extras.values()) == [objective.terms[0].params["fusion"]]
    with pytest.raises(ConfigError, match="single-process"):
        attach_learned_terms(model, Objective(METHODS[0]["terms"]), world_size=2)
    objective = Objective(METHODS[3]["terms"])
    same, extras = attach_learned_terms(model, objective)
    assert same is model and isinstance(objective.terms[0].params["clip_net"], DACClipNet)
    assert list(extras.values()) == [objective.terms[0].params["clip_net"]]


def test_the_learned_terms_train_from_yaml_and_the_deployed_student_is_the_main_head(data_dir, tmp_path):
    config = validate(FashionMnistConfig, {
        "data": {"root": str(data_dir), "labelled": 40, "transfer": 0},
        "teacher": {"arch": "mlp", "kwargs": {"hidden": [64]}, "epochs": 1, "batch_size": 64},
        "train": {"epochs": 6, "batch_size": 16},
        "seeds": [0],
        "methods": [{"name": "labels only", "role": "baseline", "terms": [{"name": "cross_entropy", "weight": 1.0}]},
                    *METHODS],
        "eval": {"latency_warmup": 1, "latency_repeats": 2},
    }, source="test")
    results = FashionMnistKD().run(config, tmp_path / "run")
    rows = {m["name"]: m for m in results["models"]}
    for name in ("dual head", "trilateral", "dac", "dac learned"):
        assert 0.0 <= rows[f"student / {name}"]["metrics"]["accuracy"] <= 1.0
        records = [json.loads(line) for line in
                   (tmp_path / "run" / "students" / name.replace(" ", "-") / "seed-0" / "metrics.jsonl")
                   .read_text().splitlines()]
        losses = [r["loss"] for r in records if r.get("split") == "train" and "loss" in r]
        assert losses[-1] < losses[0]  # the student learned
    weights = load_file(str(tmp_path / "run" / "students" / "dual-head" / "seed-0" / "model.safetensors"))
    assert set(weights) == set(build_vision_model("small_cnn").state_dict())  # no auxiliary head deployed
    assert not any(k.startswith("aux_head") for k in weights)


def test_trilateral_ratio_network_is_optimised_by_the_distiller():
    from kdforge.train import ClassificationTask, Distiller, TrainConfig

    torch.manual_seed(0)
    model = build_vision_model("small_cnn")
    objective = Objective(METHODS[1]["terms"])
    model, extras = attach_learned_terms(model, objective)
    fusion = objective.terms[0].params["fusion"]
    before = [p.detach().clone() for p in fusion.parameters()]
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    data = [{"inputs": x[i], "labels": y[i], "teacher_logits": torch.randn(10)} for i in range(32)]
    Distiller(model, None, task=ClassificationTask(), objective=objective, train_data=data, extra_modules=extras,
              config=TrainConfig(max_steps=3, batch_size=16, lr=1e-2, progress=False, log_every=1)).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, fusion.parameters()))
