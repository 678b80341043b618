"""benchmarks/loss_memory.py: every implementation computes the same loss, and the summary's ratios."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loss_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kdforge_bench_loss_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_every_eager_implementation_computes_the_same_loss_and_gradients(bench, loss):
    impls = ["kdforge_eager", "kdforge_autograd", "trl", "naive"]
    if importlib.util.find_spec("liger_kernel") is not None:
        impls.append("liger_eager")  # the compiled variants are the same functions through torch.compile
    args = argparse.Namespace(loss=loss, beta=0.3, chunk_size="5")
    values, grads = {}, {}
    for impl in impls:
        torch.manual_seed(0)
        inputs = bench.make_inputs(12, 40, 8, "head", torch.device("cpu"))
        with torch.no_grad():  # logits of order 1 (the benchmark's scales give near-uniform ones at H = 8)
            inputs[1].mul_(60.0)
            inputs[4].mul_(60.0)
        values[impl] = float(bench.make_step(impl, args, *inputs)())
        grads[impl] = (inputs[0].grad.clone(), inputs[1].grad.clone())
    ref = values["naive"]
    assert ref > 0
    for impl in impls:
        assert values[impl] == pytest.approx(ref, rel=1e-5), impl
        if impl != "liger_eager":  # Liger averages over tokens: its gradients are ours / N
            torch.testing.assert_close(grads[impl][0], grads["naive"][0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grads[impl][1], grads["naive"][1], rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(grads[impl][1] * 12, grads["naive"][1], rtol=1e-4, atol=1e-6)


def test_the_gemm_floor_runs_the_four_products_of_each_chunk(bench, monkeypatch):
    args = argparse.Namespace(loss="jsd", beta=0.5, chunk_size="4")
    inputs = bench.make_inputs(10, 16, 6, "head", torch.device("cpu"))
    step = bench.make_step("gemm_floor", args, *inputs)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append("mm") or real_mm(*a, **k))
    step()
    assert step.rows == 4 and calls.count("mm") == 3 * 3  # 3 chunks: student, teacher logits and g W (+ addmm_)


def test_summary_gives_medians_and_ratios_to_the_floor_and_liger(bench):
    rows = []
    for rnd, (k, floor, liger) in enumerate([(10.0, 8.0, 12.0), (30.0, 10.0, 20.0), (20.0, 9.0, 16.0)]):
        for impl, ms, peak in (("kdforge", k, 100.0), ("gemm_floor", floor, 50.0), ("liger_compiled", liger, 400.0)):
            rows.append({"impl": impl, "loss_name": "jsd", "tokens": 8, "vocab": 16, "cpu_ms": ms, "ms": ms * 3,
                         "peak_mib": peak, "device": "cpu (1 threads)", "round": rnd})
    rows.append({"impl": "naive", "loss_name": "jsd", "tokens": 8, "vocab": 16, "skipped": "too big"})
    out = {r["impl"]: r for r in bench.summarize(rows)}
    assert set(out) == {"kdforge", "gemm_floor", "liger_compiled"}
    assert out["kdforge"]["median_cpu_ms"] == 20.0 and out["kdforge"]["runs"] == 3
    assert out["kdforge"]["time_vs_gemm_floor"] == pytest.approx(20.0 / 9.0, abs=1e-3)
    assert out["kdforge"]["time_vs_liger_compiled"] == pytest.approx(20.0 / 16.0, abs=1e-3)
    assert out["kdforge"]["peak_vs_liger_compiled"] == pytest.approx(0.25)


def test_sparse_teacher_closed_form_and_autograd_agree(bench):
    """``--teacher sparse``: the kdforge default (sparse closed form) and the autograd path compute
    the same loss and gradients; the floor then runs only the student's three products."""
    args = argparse.Namespace(loss="forward_kl", beta=0.5, chunk_size="5")
    out = {}
    for impl in ("kdforge_eager", "kdforge_autograd"):
        torch.manual_seed(0)
        inputs = bench.make_inputs(12, 40, 8, "sparse", torch.device("cpu"), k=4)
        with torch.no_grad():
            inputs[1].mul_(60.0)
        out[impl] = (float(bench.make_step(impl, args, *inputs)()), inputs[0].grad.clone(), inputs[1].grad.clone())
    assert out["kdforge_eager"][0] == pytest.approx(out["kdforge_autograd"][0], rel=1e-5)
    for a, b in zip(out["kdforge_eager"][1:], out["kdforge_autograd"][1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
