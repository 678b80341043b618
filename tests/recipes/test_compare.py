"""The compare recipe's leaderboard: paired differences, the exact sign test, cost columns."""

from __future__ import annotations

import json
import math

import pytest

from kdforge.config import validate
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.errors import ConfigError
from kdforge.recipes.compare import Compare, CompareConfig, leaderboard, paired, sign_test


def test_sign_test_against_hand_values():
    assert sign_test(3, 0) == pytest.approx(0.25)  # 2 * (1/8)
    assert sign_test(5, 0) == pytest.approx(0.0625)
    assert sign_test(4, 1) == pytest.approx(2 * (1 + 5) / 32)  # 0.375
    assert sign_test(2, 2) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)


def test_paired_differences_drop_ties_and_respect_direction():
    p = paired({0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.79, 1: 0.82, 2: 0.80, 3: 0.5})
    assert p["seeds"] == [0, 1, 2] and (p["wins"], p["losses"], p["ties"]) == (2, 0, 1)
    assert p["mean"] == pytest.approx(0.02 / 3) and p["sign_p"] == pytest.approx(0.5)
    lower = paired({0: 0.1}, {0: 0.2}, higher_is_better=False)  # e.g. ECE: lower wins
    assert (lower["wins"], lower["losses"]) == (1, 0)


def _results():
    def model(name, role, accs, terms, teacher=None):
        m = {"name": f"student / {name}", "method": name, "role": role, "terms": [{"name": t} for t in terms],
             "metrics": {"ece": 0.03, "ece_std": 0.01},
             "per_seed": [{"seed": s, "accuracy": a} for s, a in enumerate(accs)],
             "cost": {"cpu_s_per_step": 0.01, "peak_rss_mb": 500.0, "steps": 10}}
        if teacher:
            m["teacher"] = {"source": teacher}
        return m

    return {"seeds": [0, 1, 2], "models": [
        {"name": "teacher", "role": "teacher", "metrics": {}},
        model("ce", "baseline", [0.80, 0.81, 0.79], ["cross_entropy"]),
        model("kd", "student", [0.83, 0.83, 0.82], ["forward_kl", "cross_entropy"]),
        model("pskd", "student", [0.81, 0.80, 0.80], ["forward_kl", "cross_entropy"], teacher="pskd"),
    ]}


def test_leaderboard_ranks_and_finds_the_baseline_and_plain_kd():
    board = leaderboard(_results())
    assert board["baseline"] == "ce" and board["reference"] == "kd"  # pskd has a teacher block: not plain KD
    assert [r["method"] for r in board["rows"]] == ["kd", "pskd", "ce"]
    kd = board["rows"][0]
    assert kd["vs_baseline"]["wins"] == 3 and kd["vs_baseline"]["sign_p"] == pytest.approx(0.25)
    assert kd["vs_reference"] is None
    pskd = board["rows"][1]
    assert pskd["vs_reference"]["losses"] == 3 and math.isclose(pskd["vs_baseline"]["mean"], 0.01 / 3)


def test_unknown_reference_is_a_config_error():
    with pytest.raises(ConfigError, match="compare.reference"):
        validate(CompareConfig, {"compare": {"reference": "nope"}}, source="test")


def test_compare_runs_end_to_end_and_writes_the_leaderboard(tmp_path):
    data = write_synthetic_fashion_mnist(tmp_path / "fm", n_train=120, n_test=30)
    config = validate(CompareConfig, {
        "data": {"root": str(data), "labelled": 30, "transfer": 0},
        "teacher": {"arch": "mlp", "kwargs": {"hidden": [32]}, "epochs": 1, "batch_size": 64},
        "train": {"epochs": 2, "batch_size": 16}, "seeds": [0, 1],
        "methods": [{"name": "ce", "role": "baseline", "terms": [{"name": "cross_entropy", "weight": 1.0}]},
                    {"name": "kd", "terms": [{"name": "forward_kl", "weight": 0.5},
                                             {"name": "cross_entropy", "weight": 0.5}]},
                    {"name": "sinkd", "terms": [{"name": "sinkhorn", "weight": 1.0},
                                                {"name": "cross_entropy", "weight": 0.5}]}],
        "eval": {"latency_warmup": 1, "latency_repeats": 2},
    }, source="test")
    out = Compare().run(config, tmp_path / "run")
    board = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    assert {r["method"] for r in board["rows"]} == {"ce", "kd", "sinkd"}
    for r in board["rows"]:
        assert r["cost"]["cpu_s_per_step"] > 0 and r["cost"]["peak_rss_mb"] > 0
    md = (tmp_path / "run" / "leaderboard.md").read_text()
    assert "sign p" in md and "| 1 |" in md
    assert (tmp_path / "run" / "leaderboard.png").stat().st_size > 0
    assert out["leaderboard"]["reference"] == "kd"
