"""fashion_mnist_kd with teacher sources other than the cached teacher (docs/regimes.md): PS-KD,
an ensemble of cached teachers, mutual peers and born-again generations, end to end on tiny
synthetic images; and the bundled regimes config validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdforge.config import validate
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.errors import ConfigError
from kdforge.recipes import load_recipe_file
from kdforge.recipes.fashion_mnist import FashionMnistConfig

REPO = Path(__file__).resolve().parents[2]
KD = [{"name": "forward_kl", "weight": 0.5, "params": {"temperature": 2.0}}, {"name": "cross_entropy", "weight": 0.5}]


def test_bundled_regimes_config_validates():
    _, config = load_recipe_file(REPO / "configs" / "fashion_mnist_regimes.yaml")
    sources = {m.teacher.source for m in config.methods if m.teacher is not None}
    assert {"pskd", "mutual", "ensemble", "born_again"} <= sources
    assert config.data.labelled == 2000 and config.train.epochs == 40


def _config(data: Path, methods: list[dict]) -> FashionMnistConfig:
    return validate(FashionMnistConfig, {
        "data": {"root": str(data), "labelled": 40, "transfer": 0},
        "teacher": {"arch": "mlp", "kwargs": {"hidden": [64]}, "epochs": 1, "batch_size": 64},
        "extra_teachers": [{"name": "mlp2", "arch": "mlp", "kwargs": {"hidden": [32]}, "epochs": 1,
                            "batch_size": 64, "seed": 1}],
        "train": {"epochs": 3, "batch_size": 16},
        "seeds": [0],
        "methods": [{"name": "labels only", "role": "baseline", "terms": [{"name": "cross_entropy", "weight": 1.0}]},
                    *methods],
        "eval": {"latency_warmup": 1, "latency_repeats": 2},
    }, source="test")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=160, n_test=40)


def test_every_regime_trains_and_is_reported(data_dir, tmp_path):
    from kdforge.recipes.fashion_mnist import FashionMnistKD

    config = _config(data_dir, [
        {"name": "kd", "terms": KD},
        {"name": "pskd", "teacher": {"source": "pskd"},
         "terms": [{"name": "cross_entropy", "weight": {"schedule": "linear", "start": 1.0, "end": 0.2}},
                   {"name": "forward_kl", "weight": {"schedule": "linear", "start": 0.0, "end": 0.8},
                    "params": {"temperature": 1.0}}]},
        {"name": "ensemble", "teacher": {"source": "ensemble", "members": ["teacher", "mlp2"],
                                         "weighting": "entropy"}, "terms": KD},
        {"name": "per teacher", "teacher": {"source": "ensemble", "members": ["teacher", "mlp2"]},
         "terms": [{"name": "reverse_kl", "weight": 0.5, "per_teacher": True}, KD[1]]},
        {"name": "mutual", "teacher": {"source": "mutual"}, "terms": KD},
        {"name": "born again", "teacher": {"source": "born_again", "generations": 2, "first": "random"},
         "terms": KD},
    ])
    results = FashionMnistKD().run(config, tmp_path / "run")
    rows = {m["name"]: m for m in results["models"]}
    for name in ("kd", "pskd", "ensemble", "per teacher", "mutual", "born again"):
        met = rows[f"student / {name}"]["metrics"]
        assert 0.0 <= met["accuracy"] <= 1.0 and met["ece"] >= 0.0
    assert (tmp_path / "run" / "teacher-mlp2" / "teacher.json").is_file()
    assert (tmp_path / "run" / "students" / "born-again" / "seed-0" / "gen-2").is_dir()
    # a re-run reuses every finished student (fingerprints include the regime)
    again = FashionMnistKD().run(config, tmp_path / "run")
    assert [m["metrics"]["accuracy"] for m in again["models"]] == [m["metrics"]["accuracy"] for m in results["models"]]


def test_unknown_ensemble_member_and_stray_keys_are_config_errors(data_dir):
    with pytest.raises(ConfigError, match="unknown ensemble member"):
        _config(data_dir, [{"name": "e", "teacher": {"source": "ensemble", "members": ["nope"]}, "terms": KD}])
    with pytest.raises(ConfigError, match="do\\(es\\) not apply to source 'pskd'"):
        _config(data_dir, [{"name": "p", "teacher": {"source": "pskd", "members": ["teacher"]}, "terms": KD}])
    with pytest.raises(ConfigError, match="per_teacher.*needs teacher: {source: ensemble"):
        _config(data_dir, [{"name": "k", "terms": [{**KD[0], "per_teacher": True}]}])


def test_an_ensemble_of_one_teacher_trains_like_that_teacher():
    """EnsembleTeacher([t]) gives t's log-probabilities: the KD run matches the cached-teacher run."""
    from kdforge.teachers.sources import EnsembleTeacher
    from kdforge.teachers.sources.cached import BatchLogitsTeacher
    from kdforge.train import ClassificationTask, Distiller

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(32, 6, generator=g), torch.randn(32, 4, generator=g) * 3
    y = t.argmax(-1)

    class Set(torch.utils.data.Dataset):
        def __init__(self, key):
            self.key = key

        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"inputs": x[i], "labels": y[i], self.key: t[i]}

    def train(teacher, key):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        Distiller(model, teacher, task=ClassificationTask(), objective=KD,
                  config={"max_steps": 10, "batch_size": 8, "lr": 0.1, "seed": 0, "progress": False},
                  train_data=Set(key)).train()
        return model

    cached = train(None, "teacher_logits")
    ensemble = train(EnsembleTeacher([BatchLogitsTeacher("t0")]), "t0")
    for a, b in zip(cached.parameters(), ensemble.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_online_teacher_trains_like_its_cached_logits_and_feeds_feature_terms(data_dir, tmp_path):
    from kdforge.recipes.fashion_mnist import FashionMnistKD

    config = _config(data_dir, [
        {"name": "kd cached", "terms": KD},
        {"name": "kd online", "teacher": {"source": "online"}, "terms": KD},
        {"name": "cka", "teacher": {"source": "online"},
         "terms": [{"name": "cross_entropy", "weight": 1.0},
                   {"name": "cka", "weight": 1.0, "params": {"student_modules": ["classifier.0"],
                                                             "teacher_modules": ["net.1"]}}]},
    ])
    config = config.model_copy(update={"extra_teachers": []})
    rows = {m["name"]: m for m in FashionMnistKD().run(config, tmp_path / "run")["models"]}
    cached, online = rows["student / kd cached"], rows["student / kd online"]
    assert [p["accuracy"] for p in cached["per_seed"]] == [p["accuracy"] for p in online["per_seed"]]
    assert cached["metrics"]["kl_to_teacher"] == pytest.approx(online["metrics"]["kl_to_teacher"], rel=1e-5)
    assert 0.0 <= rows["student / cka"]["metrics"]["accuracy"] <= 1.0


def test_an_ema_teacher_of_the_student_trains_as_a_teacher_source(data_dir, tmp_path):
    from kdforge.recipes.fashion_mnist import FashionMnistKD

    config = _config(data_dir, [{"name": "ema", "teacher": {"source": "ema", "decay": 0.9},
                                 "terms": [{"name": "cross_entropy", "weight": 1.0}, {"name": "forward_kl", "weight": 1.0}]}])
    results = FashionMnistKD().run(config, tmp_path / "run")
    met = {m["name"]: m for m in results["models"]}["student / ema"]["metrics"]
    assert 0.0 <= met["accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="decay"):
        _config(data_dir, [{"name": "ema", "teacher": {"source": "ema", "decay": 1.5}, "terms": KD}])
