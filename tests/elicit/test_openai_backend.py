"""The OpenAI-compatible backend against a real server on loopback.

``transformers serve`` runs the tiny local model on CPU (module-scoped); a fault-injecting
proxy sits between client and server for the retry tests. Every server and proxy binds only
127.0.0.1 and is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from kdforge.elicit import GenerationEngine, SamplingParams, build_requests, generate, read_records  # noqa: E402
from kdforge.elicit.backends import openai_backend as ob  # noqa: E402
from kdforge.elicit.backends.openai_backend import OpenAIBackend  # noqa: E402
from kdforge.errors import ConfigError, GenerationError  # noqa: E402

from .elicit_servers import FaultProxy, start_transformers_serve, stop_process  # noqa: E402

PROMPTS = ["the movie was", "a dull film", "fresh or rotten?", "think step by step"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, base_url = start_transformers_serve(tiny_model_dir, log_path)
    try:
        yield {"base_url": base_url, "model": str(tiny_model_dir)}
    finally:
        stop_process(proc)


@pytest.fixture
def proxy(server):
    with FaultProxy(server["base_url"]) as p:
        yield p


def _backend(url: str, model: str, **kw) -> OpenAIBackend:
    kw.setdefault("concurrency", 2)
    kw.setdefault("timeout_s", 20)
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return OpenAIBackend(url, model, rng_seed=0, **kw)


PARAMS = SamplingParams(n=2, temperature=0.8, max_tokens=6, seed=1)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_real_server_answers_both_endpoints_with_text_and_usage(server, tmp_path, endpoint):
    b = _backend(server["base_url"], server["model"], endpoint=endpoint)
    summary, recs = generate(PROMPTS[:2], b, tmp_path / "out", PARAMS, progress=False)
    assert summary.generated == 4 and summary.failed == 0
    assert len({r["id"] for r in recs}) == 4
    assert all(isinstance(r["text"], str) for r in recs)
    assert all(r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= 6 for r in recs)
    assert summary.completion_tokens == sum(r["completion_tokens"] for r in recs)


def test_retries_survive_drops_timeouts_429_and_5xx_without_loss_or_duplicates(server, proxy, tmp_path):
    # one of each fault, then normal service; the delayed request exceeds the client timeout
    proxy.set_schedule(["drop", "status:429:0", "status:500", "delay:6", "status:503", "status:502"])
    b = _backend(proxy.base_url, server["model"], timeout_s=4, max_retries=8)
    summary, recs = generate(PROMPTS, b, tmp_path / "out", PARAMS, progress=False)
    ids = [r["id"] for r in recs]
    assert summary.generated == 8 and summary.failed == 0 and summary.complete
    assert len(ids) == len(set(ids)) == 8
    assert len(read_records(tmp_path / "out")) == 8
    assert summary.retries == 6  # each injected fault cost exactly one retry
    assert {"http_429", "http_500", "http_503", "http_502", "RemoteProtocolError", "ReadTimeout"} <= set(summary.errors)
    assert proxy.actions().count("ok") == 8


def test_retry_after_header_sets_the_wait_instead_of_backoff(server, proxy, tmp_path, monkeypatch):
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay, *a, **k):
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(ob.asyncio, "sleep", recording_sleep)
    proxy.set_schedule(["status:429:7", "status:503:2"])
    b = _backend(proxy.base_url, server["model"], concurrency=1, backoff_base_s=0.001, retry_after_max_s=5)
    summary, _ = generate(PROMPTS[:1], b, tmp_path / "out", SamplingParams(max_tokens=4), progress=False)
    assert summary.generated == 1
    assert waits == [5.0, 2.0]  # 7 s capped by retry_after_max_s, then 2 s as asked


def test_exhausted_retries_fail_the_request_and_rerun_completes_it(server, proxy, tmp_path):
    proxy.set_schedule(["status:500"] * 3)
    b = _backend(proxy.base_url, server["model"], concurrency=1, max_retries=2)
    reqs = build_requests(PROMPTS[:3], SamplingParams(max_tokens=4))
    with pytest.raises(GenerationError, match="rerun the same command"):
        GenerationEngine(b, tmp_path / "out", progress=False).run(reqs)
    assert len(read_records(tmp_path / "out")) == 0
    b2 = _backend(proxy.base_url, server["model"], concurrency=1)
    summary = GenerationEngine(b2, tmp_path / "out", progress=False).run(reqs)
    assert summary.generated == 3 and summary.skipped == 0
    assert sorted(r["id"] for r in read_records(tmp_path / "out")) == sorted(r.id for r in reqs)


def test_client_errors_are_not_retried_and_say_how_to_fix(server, proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("KDF_TEST_KEY", "sk-wrong")
    proxy.set_schedule(["status:401"])
    b = _backend(proxy.base_url, server["model"], api_key_env="KDF_TEST_KEY")
    with pytest.raises(GenerationError) as err:
        GenerationEngine(b, tmp_path / "out", progress=False).run(
            build_requests(PROMPTS[:1], SamplingParams(max_tokens=4)))
    assert "HTTP 401" in str(err.value) and "$KDF_TEST_KEY" in str(err.value)
    assert proxy.actions() == ["status:401"]  # one attempt only


def test_api_key_comes_from_the_named_env_var_and_never_reaches_logs_or_files(
        server, proxy, tmp_path, monkeypatch, caplog):
    secret = "sk-kdforge-TEST-7f3a9c-do-not-leak"
    monkeypatch.setenv("KDF_SECRET_KEY", secret)
    proxy.set_schedule(["status:500"])  # a retry path too, so error messages are exercised
    caplog.set_level(logging.DEBUG)
    b = _backend(proxy.base_url, server["model"], api_key_env="KDF_SECRET_KEY")
    summary, _ = generate(PROMPTS[:2], b, tmp_path / "out", PARAMS, progress=False)
    assert summary.generated == 4
    assert {s["headers"].get("authorization") for s in proxy.seen} == {f"Bearer {secret}"}
    assert secret not in caplog.text and secret not in repr(b) and secret not in json.dumps(b.describe())
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert secret not in f.read_text(errors="replace"), f


def test_missing_api_key_env_var_is_a_config_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv("KDF_ABSENT_KEY", raising=False)
    with pytest.raises(ConfigError, match="KDF_ABSENT_KEY"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env="KDF_ABSENT_KEY")


def test_killed_generation_job_resumes_with_nothing_lost_or_duplicated(server, proxy, tmp_path):
    """SIGKILL the CLI job mid-run (records journaled, no shard sealed yet), rerun it."""
    proxy.set_schedule([], default="delay:0.3")  # slow responses so the kill lands mid-job
    rows = [{"pid": f"p{i}", "prompt": f"prompt number {i}"} for i in range(8)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "job"
    cfg = {
        "task": "generate", "output_dir": str(out), "progress": False,
        "backend": {"type": "openai", "base_url": proxy.base_url, "model": server["model"],
                    "endpoint": "completions", "concurrency": 2, "timeout_s": 30},
        "data": {"path": str(data), "id_field": "pid"}, "prompt": {"template": "{prompt}", "chat": False},
        "sampling": {"n": 2, "max_tokens": 4, "temperature": 0.7, "seed": 3},
        "output": {"shard_size": 100},
    }
    recipe = tmp_path / "job.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "kdforge.cli.main", "generate", str(recipe)]
    journal = out / "generations" / "journal.partial.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    before = read_records(out / "generations")
    assert 4 <= len(before) < 16
    assert not list((out / "generations" / "shards").glob("shard-*"))  # nothing sealed yet

    proxy.set_schedule([], default="ok")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["skipped"] == len(before) and summary["generated"] == 16 - len(before)
    after = read_records(out / "generations")
    ids = [r["id"] for r in after]
    assert len(ids) == len(set(ids)) == 16
    assert sorted(ids) == sorted(f"p{i}#{k}" for i in range(8) for k in range(2))
    assert not journal.exists()  # everything sealed into shards at the end
    by_id = {r["id"]: r for r in after}
    assert all(by_id[r["id"]]["text"] == r["text"] for r in before)  # finished work was kept
