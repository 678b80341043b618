"""The fashion_mnist_kd recipe end to end on a tiny synthetic IDX dataset (seconds, no real data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdforge.config import read_yaml
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.errors import ConfigError
from kdforge.recipes import load_recipe_file

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "configs" / "fashion_mnist.yaml"

TINY = {
    "data.labelled": 40,
    "data.transfer": 60,
    "teacher.arch": "mlp",  # a wide MLP: cheap on CPU, still >10x the student
    "teacher.kwargs": {"hidden": [256]},
    "teacher.epochs": 1,
    "teacher.batch_size": 64,
    "train.epochs": 2,
    "train.batch_size": 32,
    "seeds": [0, 1],
    "eval.latency_warmup": 1,
    "eval.latency_repeats": 3,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=200, n_test=50)


def tiny_recipe(data_dir: Path, **extra):
    overrides = {"data.root": str(data_dir), **TINY, **extra}
    return load_recipe_file(BUNDLED, overrides)


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    recipe, config = tiny_recipe(data_dir)
    results = recipe.run(config, out)
    return out, results


def test_bundled_config_validates_and_uses_the_few_labels_long_training_regime():
    _, config = load_recipe_file(BUNDLED)
    assert config.data.labelled == 2000 and config.train.epochs == 40
    assert len(config.seeds) >= 3
    names = [m.name for m in config.methods]
    assert names[0] == "labels only" and config.methods[0].role == "baseline"
    assert any(t.name == "forward_kl" for m in config.methods for t in m.terms)
    assert any(t.name == "dkd" for m in config.methods for t in m.terms)


def test_run_writes_results_json_md_plots_and_config(first_run):
    out, results = first_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["recipe"] == "fashion_mnist_kd" and saved["primary_metric"] == "accuracy"
    roles = [m["role"] for m in saved["models"]]
    assert roles[0] == "teacher" and roles.count("baseline") == 1 and roles.count("student") == 3
    for model in saved["models"][1:]:
        met = model["metrics"]
        for key in ("accuracy", "accuracy_std", "agreement", "agreement_std", "ece", "latency_ms",
                    "accuracy_gain_vs_baseline"):
            assert key in met, key
        assert 0.0 <= met["accuracy"] <= 1.0 and 0.0 <= met["agreement"] <= 1.0
        assert [s["seed"] for s in model["per_seed"]] == [0, 1]
        assert len(model["reliability"]["bin_count"]) == 15
        assert sum(model["reliability"]["bin_count"]) == 2 * 50  # pooled over 2 seeds x 50 test images
        assert len(model["run_dir"]) == 2 and all((out / d / "metrics.jsonl").is_file() for d in model["run_dir"])
    assert saved["models"][0]["params"] > 10 * saved["models"][1]["params"]
    md = (out / "results.md").read_text()
    assert "| model | params |" in md and "student / KD T=2 a=0.5" in md and "student / DKD" in md
    for png in ("accuracy.png", "cost_quality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = read_yaml(out / "config.yaml")
    assert again["recipe"] == "fashion_mnist_kd" and again["data"]["labelled"] == 40
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "split"} <= set(line) for line in lines) and len(lines) == len(saved["models"])


def test_transfer_set_method_trains_on_labelled_plus_unlabelled_images(first_run):
    _, results = first_run
    by_method = {m.get("method"): m for m in results["models"]}
    assert by_method["KD + transfer set"]["train_images"] == 40 + 60
    assert by_method["KD T=2 a=0.5"]["train_images"] == 40
    assert results["transfer_images"] == 60


def test_rerun_reuses_cached_teacher_and_finished_students(first_run, data_dir):
    out, results = first_run
    assert results["teacher_cached"] is False
    assert list((out / "teacher" / "run" / "checkpoints").glob("step-*"))  # resumable teacher
    weights = out / "teacher" / "model.safetensors"
    student = out / "students" / "labels-only" / "seed-0" / "result.json"
    stamps = (weights.stat().st_mtime_ns, student.stat().st_mtime_ns)
    recipe, config = tiny_recipe(data_dir)
    again = recipe.run(config, out)
    assert again["teacher_cached"] is True
    assert (weights.stat().st_mtime_ns, student.stat().st_mtime_ns) == stamps
    assert again["models"][1]["metrics"]["accuracy"] == results["models"][1]["metrics"]["accuracy"]


def test_changed_teacher_config_invalidates_the_cache(data_dir, tmp_path):
    recipe, config = tiny_recipe(data_dir, **{"methods": [
        {"name": "labels only", "role": "baseline", "terms": [{"name": "cross_entropy", "weight": 1.0}]}],
        "seeds": [0]})
    assert recipe.run(config, tmp_path)["teacher_cached"] is False
    recipe, config = tiny_recipe(data_dir, **{"teacher.lr": 0.001, "methods": config.model_dump()["methods"],
                                              "seeds": [0]})
    assert recipe.run(config, tmp_path)["teacher_cached"] is False


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_config_key_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_recipe_file(_write(tmp_path, {"recipe": "fashion_mnist_kd", "train": {"epoch": 3}}))
    assert "train.epoch" in str(info.value) and "epochs" in str(info.value)


def test_unknown_loss_name_is_a_config_error_listing_registered_losses(tmp_path):
    data = {"recipe": "fashion_mnist_kd", "methods": [{"name": "x", "terms": [{"name": "kl", "weight": 1.0}]}]}
    with pytest.raises(ConfigError) as info:
        load_recipe_file(_write(tmp_path, data))
    assert "methods.0.terms.0.name" in str(info.value) and "forward_kl" in str(info.value)


def test_duplicate_method_names_are_rejected(tmp_path):
    term = [{"name": "cross_entropy", "weight": 1.0}]
    data = {"recipe": "fashion_mnist_kd", "methods": [{"name": "a", "terms": term}, {"name": "a", "terms": term}]}
    with pytest.raises(ConfigError, match="unique"):
        load_recipe_file(_write(tmp_path, data))


def test_missing_weight_is_rejected_no_hidden_default(tmp_path):
    data = {"recipe": "fashion_mnist_kd", "methods": [{"name": "a", "terms": [{"name": "cross_entropy"}]}]}
    with pytest.raises(ConfigError, match="weight"):
        load_recipe_file(_write(tmp_path, data))


def test_interrupted_teacher_resumes_from_its_checkpoint_instead_of_restarting(first_run, data_dir, caplog):
    # simulate a crash after training but before the cache was committed: teacher.json is the marker
    out, results = first_run
    (out / "teacher" / "teacher.json").unlink()
    recipe, config = tiny_recipe(data_dir)
    with caplog.at_level("INFO"):
        again = recipe.run(config, out)
    assert again["teacher_cached"] is False
    assert any("resumed from" in r.getMessage() for r in caplog.records)
    # same weights as before the crash, so the same teacher accuracy
    assert again["models"][0]["metrics"]["accuracy"] == results["models"][0]["metrics"]["accuracy"]
