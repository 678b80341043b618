"""fashion_mnist_kd methods with a ``data:`` block (HARD, active, KD3) end to end on tiny synthetic
images; misconfigured blocks are config errors at the method; the bundled config validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdforge.config import validate
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.errors import ConfigError
from kdforge.recipes import load_recipe_file
from kdforge.recipes.fashion_mnist import FashionMnistConfig

REPO = Path(__file__).resolve().parents[2]
KD = [{"name": "forward_kl", "weight": 0.5, "params": {"temperature": 2.0}}, {"name": "cross_entropy", "weight": 0.5}]


def _config(data: Path, methods: list[dict], transfer: int = 60) -> FashionMnistConfig:
    return validate(FashionMnistConfig, {
        "data": {"root": str(data), "labelled": 40, "transfer": transfer},
        "teacher": {"arch": "small_cnn", "epochs": 1, "batch_size": 32},
        "train": {"epochs": 2, "batch_size": 16},
        "seeds": [0],
        "methods": [{"name": "labels only", "role": "baseline", "terms": [{"name": "cross_entropy", "weight": 1.0}]},
                    *methods],
        "eval": {"latency_warmup": 1, "latency_repeats": 2},
    }, source="test")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=160, n_test=40)


def test_data_methods_train_and_record_what_they_did(data_dir, tmp_path):
    from kdforge.recipes.fashion_mnist import FashionMnistKD

    online = {"source": "online"}
    config = _config(data_dir, [
        {"name": "hard search", "teacher": online, "terms": KD, "data": {"kind": "hard_search", "candidates": 3}},
        {"name": "hard learned", "teacher": online, "terms": KD, "data": {"kind": "hard_learned", "net_width": 4, "noise_dim": 2, "warmup": 0.5}},
        {"name": "active robust", "transfer_set": True, "terms": KD,
         "data": {"kind": "active", "budget": 25, "rounds": 2, "round_epochs": 1, "bins": 1, "calibrate": True}},
        {"name": "kd3", "transfer_set": True, "terms": KD, "data": {"kind": "kd3", "select": 20, "balanced": True}},
    ])
    results = FashionMnistKD().run(config, tmp_path)
    assert len(results["models"]) == 6
    hard_row = next(m for m in results["models"] if m["name"] == "student / hard search")
    assert hard_row["data"]["kind"] == "hard_search" and 0.0 <= hard_row["metrics"]["ood_accuracy"] <= 1.0
    rec = {name: json.loads((tmp_path / "students" / name / "seed-0" / "result.json").read_text())
           for name in ("hard-search", "hard-learned", "active-robust", "kd3")}
    assert (tmp_path / "students" / "hard-search" / "seed-0" / "hard_grid.png").stat().st_size > 1000
    assert (tmp_path / "students" / "hard-learned" / "seed-0" / "hard_grid.png").is_file()
    active = rec["active-robust"]["data_method"]
    assert active["queries"] == 25 and len(set(active["pool_indices"])) == 25  # the budget, spent exactly
    assert rec["active-robust"]["train_images"] == 40 + 25
    assert len(rec["kd3"]["data_method"]["pool_indices"]) == 20
    for r in rec.values():
        assert 0.0 <= r["data_method"]["ood_accuracy"] <= 1.0
    again = FashionMnistKD().run(config, tmp_path)  # finished students are reused under the same fingerprint
    assert again["models"][2]["metrics"]["accuracy"] == results["models"][2]["metrics"]["accuracy"]


@pytest.mark.parametrize(("method", "match"), [
    ({"data": {"kind": "hard_search"}}, "source: online"),
    ({"data": {"kind": "active", "budget": 5}}, "transfer_set: true"),
    ({"transfer_set": True, "teacher": {"source": "online"}, "data": {"kind": "kd3", "select": 5}}, "remove the method"),
    ({"data": {"kind": "hard_magic"}}, "hard_magic"),
])
def test_misfitting_data_blocks_are_config_errors(data_dir, method, match):
    with pytest.raises(ConfigError, match=match):
        _config(data_dir, [{"name": "x", "terms": KD, **method}])


def test_bundled_data_methods_config_validates():
    _, config = load_recipe_file(REPO / "configs" / "fashion_mnist_data_methods.yaml")
    kinds = {m.data.kind for m in config.methods if m.data is not None}
    assert kinds == {"hard_search", "hard_learned", "active", "kd3"}


def test_a_data_method_is_never_taken_for_plain_kd():
    from kdforge.recipes.compare import _is_plain_kd

    terms = [{"name": "forward_kl"}, {"name": "cross_entropy"}]
    assert _is_plain_kd({"terms": terms})
    assert not _is_plain_kd({"terms": terms, "data": {"kind": "active", "budget": 10}})
