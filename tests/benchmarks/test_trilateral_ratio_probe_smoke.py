"""benchmarks/trilateral_ratio_probe.py on a tiny synthetic run (seconds), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml

from kdforge.config import validate
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.recipes.fashion_mnist import FashionMnistConfig, FashionMnistKD

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trilateral_ratio_probe.py"


def test_the_probe_records_the_ratio_of_every_step_for_both_rules(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("kdforge_bench_trilateral_ratio_probe", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    raw = {
        "data": {"root": str(write_synthetic_fashion_mnist(tmp_path / "fm", n_train=160, n_test=40)),
                 "labelled": 40, "transfer": 0},
        "teacher": {"arch": "mlp", "kwargs": {"hidden": [32]}, "epochs": 1, "batch_size": 64},
        "train": {"epochs": 3, "batch_size": 16}, "seeds": [0],
        "methods": [{"name": "first", "terms": [{"name": "trilateral_kd", "weight": 1.0}]},
                    {"name": "bilevel", "terms": [{"name": "trilateral_kd", "weight": 1.0,
                                                   "params": {"bilevel": {"holdout": "batch"}}}]}],
        "eval": {"latency_warmup": 1, "latency_repeats": 2},
    }
    FashionMnistKD().run(validate(FashionMnistConfig, raw, source="test"), tmp_path / "run")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"recipe": "fashion_mnist_kd", **raw}))
    out = tmp_path / "probe.jsonl"
    for method in ("first", "bilevel"):
        monkeypatch.setattr(sys, "argv", ["probe", "--run", str(tmp_path / "run"), "--config", str(config),
                                          "--method", method, "--out", str(out)])
        bench.main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["first", "bilevel"]
    for r in rows:
        assert r["steps"] == 9 and abs(r["r_step1"] - 0.5) < 0.01  # 40 images / 16 per batch x 3 epochs
        assert all(0.0 < r[f"r_quarter{q}"] < 1.0 for q in range(1, 5))
    from kdforge.recipes import fashion_mnist

    assert fashion_mnist.attach_learned_terms.__name__ == "attach_learned_terms"  # the spy is undone
