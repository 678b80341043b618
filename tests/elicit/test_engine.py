"""Engine behaviour with an in-process backend: ids, resume, failures, summaries."""

from __future__ import annotations

import json

import pytest

from kdforge.elicit import (
    GenerationEngine,
    SamplingParams,
    build_requests,
    generate,
    read_records,
    request_id,
)
from kdforge.errors import ConfigError, GenerationError


def test_request_ids_are_stable_and_depend_on_prompt_params_and_sample_index():
    p = SamplingParams(n=2, temperature=0.5, seed=7)
    a = build_requests(["x", "y"], p)
    b = build_requests(["x", "y"], p)
    assert [r.id for r in a] == [r.id for r in b] and len({r.id for r in a}) == 4
    assert a[0].params["seed"] == 7 and a[1].params["seed"] == 8
    other = build_requests(["x"], SamplingParams(n=1, temperature=0.6, seed=7))
    assert other[0].id != a[0].id
    assert request_id("x", a[0].params, 0) == a[0].id


def test_user_id_column_gives_readable_ids_and_rejects_duplicates():
    reqs = build_requests(["a", "b"], SamplingParams(n=2), ids=["q1", "q2"])
    assert [r.id for r in reqs] == ["q1#0", "q1#1", "q2#0", "q2#1"]
    with pytest.raises(ConfigError, match="duplicate"):
        build_requests(["a", "b"], SamplingParams(), ids=["q1", "q1"])


def test_rerun_skips_finished_ids_and_calls_the_backend_only_for_new_ones(tmp_path, scripted):
    b = scripted(lambda r: f"answer to {r.prompt}")
    s1, recs = generate(["a", "b"], b, tmp_path, SamplingParams(n=2), progress=False)
    assert s1.generated == 4 and len(b.calls) == 4
    s2, recs2 = generate(["a", "b", "c"], b, tmp_path, SamplingParams(n=2), progress=False)
    assert s2.skipped == 4 and s2.generated == 2 and len(b.calls) == 6
    assert [r["text"] for r in recs2[:4]] == [r["text"] for r in recs]
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == 4


def test_identical_prompts_collapse_to_one_request(tmp_path, scripted):
    b = scripted(lambda r: "x")
    s, _ = generate(["same", "same"], b, tmp_path, progress=False)
    assert s.requests == 1 and len(b.calls) == 1


def test_on_error_skip_keeps_going_and_reports_failures(tmp_path, scripted):
    b = scripted(lambda r: GenerationError("boom") if r.prompt == "bad" else "ok", batch_size=1)
    reqs = build_requests(["a", "bad", "c"], SamplingParams())
    s = GenerationEngine(b, tmp_path, progress=False, on_error="skip").run(reqs)
    assert s.generated == 2 and s.failed == 1 and not s.complete
    assert len(read_records(tmp_path)) == 2


def test_on_error_raise_saves_finished_work_before_raising(tmp_path, scripted):
    b = scripted(lambda r: GenerationError("boom") if r.prompt == "bad" else "ok", batch_size=1)
    reqs = build_requests(["a", "bad"], SamplingParams())
    with pytest.raises(GenerationError, match="1 of 2 are saved"):
        GenerationEngine(b, tmp_path, progress=False).run(reqs)
    assert [r["text"] for r in read_records(tmp_path)] == ["ok"]


def test_cost_estimate_uses_token_counts_and_prices(tmp_path, scripted):
    b = scripted(lambda r: "one two three")
    s = GenerationEngine(b, tmp_path, progress=False, price_per_1k_prompt=1.0,
                         price_per_1k_completion=2.0).run(build_requests(["a", "b"], SamplingParams()))
    assert s.prompt_tokens == 6 and s.completion_tokens == 6
    assert s.cost_usd == pytest.approx((6 * 1.0 + 6 * 2.0) / 1000)


def test_reusing_user_ids_for_different_prompts_is_refused_not_silently_mixed(tmp_path, scripted):
    from kdforge.errors import CacheError

    b = scripted(lambda r: "x")
    generate(["old prompt"], b, tmp_path, ids=["q1"], progress=False)
    with pytest.raises(CacheError, match="different prompt"):
        generate(["new prompt"], b, tmp_path, ids=["q1"], progress=False)
    s, _ = generate(["old prompt"], b, tmp_path, ids=["q1"], progress=False)  # same request: fine
    assert s.skipped == 1
