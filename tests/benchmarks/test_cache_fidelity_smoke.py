"""benchmarks/cache_fidelity.py on tiny models (seconds), so the benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_fidelity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kdforge_bench_cache_fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _tiny_teacher(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # peaked teacher distributions, so top-k truncation matters
        model.lm_head.weight.mul_(20.0)
    return model.requires_grad_(False).eval()


def _run(bench, tmp_path, cases, precompute=False, seed=0):
    from kdforge.students.from_teacher import student_from_teacher

    teacher = _tiny_teacher()
    template = student_from_teacher(teacher, "every_k", num_layers=2)
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 64, (8, 16), generator=g)
    held = torch.randint(0, 64, (4, 16), generator=g)
    cfg = {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": seed, "progress": False, "log_every": 1}
    seen = []
    pre = (bench.teacher_pass(teacher, train), bench.teacher_pass(teacher, held)) if precompute else None
    records = bench.run_cases(teacher, template, train, held, cases, train_config=cfg,
                              work_dir=tmp_path, eval_batch_size=2, cache_batch_size=4, on_result=seen.append,
                              precomputed=pre)
    return records, seen


def test_lossless_full_vocab_cache_trains_the_same_student_as_the_online_teacher(bench, tmp_path):
    # k = V with lossless fp32 storage: the cache holds the teacher's whole distribution, so the
    # student must land where the online one does. This proves both cases see the same batches,
    # the same initial student and the same objective; only the teacher source differs.
    cases = [bench.Case(64, "raw-fp32", "tail_bucket"), bench.Case()]
    records, seen = _run(bench, tmp_path, cases)
    assert [r["case"] for r in records] == ["online", "cache-k64-raw-fp32-tail_bucket"]  # online first
    assert seen == records
    online, cached = records
    assert online["kl_rel_gap"] == 0.0 and online["bytes_per_token"] is None
    assert cached["bytes_per_token"] > 0
    assert cached["heldout_kl_to_teacher"] == pytest.approx(online["heldout_kl_to_teacher"], rel=1e-4)
    assert abs(cached["kl_rel_gap"]) < 1e-4


def test_truncated_compressed_cache_gives_a_measurable_gap_and_a_summary(bench, tmp_path):
    cases = bench.parse_cases("online,k2,k2:renormalize")
    records, _ = _run(bench, tmp_path, cases)
    by = {r["case"]: r for r in records}
    assert set(by) == {"online", "cache-k2-compact-u8-zstd-tail_bucket", "cache-k2-compact-u8-zstd-renormalize"}
    for r in records:
        for key in ("heldout_kl_to_teacher", "heldout_perplexity", "heldout_agreement", "train_s"):
            assert math.isfinite(r[key])
        assert r["steps"] == 3
    # a top-2 teacher is a different target: the students differ from the online one
    assert by["cache-k2-compact-u8-zstd-tail_bucket"]["kl_rel_gap"] != 0.0
    summary = bench.summarize(records, max_bytes=1e9, max_gap=10.0)["summary"]
    assert summary["reference"] == "online"
    assert sorted(summary["meets_goal"]) == sorted(c for c in by if c != "online")
    assert bench.summarize(records, max_bytes=0.0)["summary"]["meets_goal"] == []


def test_case_spec_parsing(bench):
    cases = bench.parse_cases("online, k16,k32:renormalize", "compact-u8-zstd")
    assert [c.name for c in cases] == ["online", "cache-k16-compact-u8-zstd-tail_bucket",
                                       "cache-k32-compact-u8-zstd-renormalize"]
    with pytest.raises(SystemExit):
        bench.parse_cases("top16")


def test_case_spec_parsing_of_tail_samples(bench):
    cases = bench.parse_cases("k16+s16,s32:student_full", "compact-u8-zstd")
    assert [(c.k, c.tail_samples, c.policy) for c in cases] == [(16, 16, "tail_bucket"), (0, 32, "student_full")]
    assert cases[0].name == "cache-k16+s16-compact-u8-zstd-tail_bucket"
    with pytest.raises(SystemExit):
        bench.parse_cases("k16+x4")


def test_precomputed_teacher_pass_gives_the_same_students_as_the_live_teacher(bench, tmp_path):
    # the --precompute-teacher speed-up must not change what is measured: the online student and
    # a cache (top-k, and with tail draws) built from the stored logits match the live-teacher runs
    cases = bench.parse_cases("online,k4,k2+s4")
    live, _ = _run(bench, tmp_path / "live", cases)
    pre, _ = _run(bench, tmp_path / "pre", cases, precompute=True)
    for a, b in zip(live, pre):
        assert a["case"] == b["case"] and b["teacher_precomputed"] and not a["teacher_precomputed"]
        assert b["heldout_kl_to_teacher"] == pytest.approx(a["heldout_kl_to_teacher"], rel=1e-4)
        if a["bytes_per_token"] is not None:  # None for the online case
            assert b["bytes_per_token"] == pytest.approx(a["bytes_per_token"], rel=0.02)


def test_sampled_tail_case_trains_and_seeds_are_summarised_with_mean_and_std(bench, tmp_path):
    cases = bench.parse_cases("online,k2+s4")
    records = []
    for seed in (0, 1):
        records += _run(bench, tmp_path, cases, precompute=True, seed=seed)[0]
    sampled = [r for r in records if r["tail_samples"] == 4]
    assert len(sampled) == 2 and all(math.isfinite(r["kl_rel_gap"]) for r in sampled)
    assert sampled[1].get("cache_reused")  # the second seed replays the first seed's cache
    row = bench.summarize(records, max_bytes=1e9, max_gap=10.0)["summary"]["cases"]["cache-k2+s4-compact-u8-zstd-tail_bucket"]
    assert row["seeds"] == [0, 1] and len(row["kl_rel_gaps"]) == 2
    assert row["kl_rel_gap"] == pytest.approx(sum(row["kl_rel_gaps"]) / 2, abs=1e-4)
    assert row["kl_rel_gap_std"] is not None and row["every_seed_within"] is True
