"""benchmarks/closed_form_chunk.py: every variant (old, current, rejected) computes the same value
and gradient as the old eager kernel (the script checks it before timing) and prints its line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "closed_form_chunk.py"


@pytest.mark.slow  # torch.compile of three graphs: tens of seconds on a CPU
@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_every_variant_agrees_and_reports(loss, capsys):
    spec = importlib.util.spec_from_file_location("kdforge_bench_closed_form_chunk", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert module.main(["--rows", "12", "--vocab", "40", "--loss", loss, "--repeats", "1", "--blocks", "5"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    names = {x["variant"] for x in lines}
    assert {"before_eager", "before_compiled", "after_eager", "after_compiled", "after_blocks_5"} <= names
    assert ("fused_compiled" in names) == (loss == "reverse_kl")
    assert all(x["min_cpu_ms"] >= 0 for x in lines)
