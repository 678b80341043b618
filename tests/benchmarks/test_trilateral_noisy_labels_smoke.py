"""benchmarks/trilateral_noisy_labels.py on tiny synthetic images (seconds), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdforge.data.vision import write_synthetic_fashion_mnist

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trilateral_noisy_labels.py"


def _bench():
    spec = importlib.util.spec_from_file_location("kdforge_bench_trilateral_noisy_labels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_flip_labels_moves_the_given_share_to_another_class():
    labels = torch.arange(10).repeat(20)
    noisy = _bench().flip_labels(labels, 0.4, 10)
    assert int((noisy != labels).sum()) == 80 and int(noisy.max()) < 10 and int(noisy.min()) >= 0


def test_the_benchmark_trains_each_method_and_reports_accuracy_and_the_ratio(tmp_path, monkeypatch):
    bench = _bench()
    root = write_synthetic_fashion_mnist(tmp_path / "fm", n_train=160, n_test=40)
    (tmp_path / "teacher").mkdir()
    save_file({"train": torch.randn(160, 10), "test": torch.randn(40, 10)}, str(tmp_path / "teacher" / "logits.safetensors"))
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench", "--teacher", str(tmp_path / "teacher"), "--root", str(root),
                                      "--labelled", "40", "--epochs", "2", "--seeds", "0", "--out", str(out),
                                      "--methods", "labels only", "trilateral KD (bilevel, head, in-batch)",
                                      "trilateral KD (bilevel, head, split, clean held-out labels)"])
    bench.main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["labels only", "trilateral KD (bilevel, head, in-batch)",
                                          "trilateral KD (bilevel, head, split, clean held-out labels)"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 for r in rows)  # 40 images, batch 128: 1 step an epoch
    assert "r_last_quarter" not in rows[0] and 0.0 < rows[1]["r_last_quarter"] < 1.0 and "r_last_quarter" in rows[2]
    parts = [rows[1][f"r_last_quarter_teacher_{k}"] for k in ("agrees", "disagrees")]
    assert all(x != x or 0.0 < x < 1.0 for x in parts) and any(x == x for x in parts)  # NaN: no such sample
