"""benchmarks/swing_canary.py on a few hundred characters and a few steps (seconds), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "swing_canary.py"


def test_swing_canary_runs_and_reports_exposure_and_perplexity(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("kdforge_bench_swing_canary", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40
    (tmp_path / "prideprejudice.txt").write_text(text)
    (tmp_path / "emma.txt").write_text("Emma Woodhouse, handsome, clever, and rich. " * 800)
    out = tmp_path / "swing.jsonl"
    monkeypatch.setattr(sys, "argv", ["swing_canary.py", "--data", str(tmp_path), "--chars", "3000", "--copies", "3",
                                      "--teacher-steps", "3", "--student-steps", "2", "--teacher-hidden", "16",
                                      "--student-hidden", "8", "--seeds", "0", "--out", str(out)])
    bench.main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["teacher", "labels", "kd", "swing"]
    for r in rows:
        assert 0.0 <= r["exposure"] <= 13.3 and r["space"] == 10_000 and r["heldout_ppl"] > 1.0
