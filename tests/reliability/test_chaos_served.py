"""Chaos (b): training from a served teacher behind a fault proxy ends exactly as a fault-free run.

A loopback vLLM-protocol server serves a real tiny model's top-k; between it and the
:class:`~kdforge.teachers.ServedTeacher` sits the elicitation tests' fault proxy, which drops
connections, answers 500/503, answers too slowly for the client's timeout, and cuts response
bodies (short of their Content-Length, or a 200 whose JSON is cut off). The student trained
through it must be bit-identical to one trained through the proxy with no faults, the server must
have answered every row exactly once per step beyond the faulted attempts (nothing lost), and the
loss log must hold each step once (nothing duplicated).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.elicit.elicit_servers import FaultProxy  # noqa: E402
from tests.teachers._fake_vllm import LoopbackServer, build_app  # noqa: E402
from tests.train._tiny import TokenDataset, pad_collate, tiny_llama  # noqa: E402

from kdforge.teachers import ServedTeacher  # noqa: E402
from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig  # noqa: E402

STEPS, BATCH, ROWS = 3, 4, 8
FAULTS = ["drop", "status:500", "truncate", "delay:1.5", "status:503:0", "truncate-json", "drop", "status:502"]


def _train(url: str, out) -> tuple[Distiller, ServedTeacher]:
    torch.manual_seed(0)
    teacher = ServedTeacher(url, "tiny", k=5, rng_seed=0, concurrency=1, max_retries=8, backoff_base_s=0.01,
                            backoff_max_s=0.05, timeout_s=0.75)
    cfg = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=1e-2, progress=False, log_every=1, output_dir=str(out),
                      seed=1)
    d = Distiller(tiny_llama(seed=1), teacher, task=CausalLMTask(),
                  objective=[LossTerm("forward_kl", 1.0, {"sparse_policy": "tail_bucket"})], config=cfg,
                  train_data=TokenDataset(n=ROWS), collate_fn=pad_collate())
    with teacher:
        d.train()
    return d, teacher


def test_served_teacher_training_through_faults_is_identical_to_a_fault_free_run(tmp_path):
    served_model = tiny_llama(seed=3, head_scale=20.0).eval()
    app = build_app(served_model)
    with LoopbackServer(app) as srv:
        with FaultProxy(srv.base_url) as clean:
            ref, _ = _train(clean.base_url, tmp_path / "clean")
        clean_requests = len(app.state.seen)
        app.state.seen.clear()
        with FaultProxy(srv.base_url, list(FAULTS)) as proxy:
            got, teacher = _train(proxy.base_url, tmp_path / "faulty")
            actions = proxy.actions()
    assert clean_requests == STEPS * BATCH
    assert actions[: len(FAULTS)] == FAULTS and actions[len(FAULTS):] == ["ok"] * (len(actions) - len(FAULTS))
    # every row answered: the faulted attempts were retried, no row was skipped
    assert actions.count("ok") == STEPS * BATCH
    stats = teacher.stats
    assert (stats.requests, stats.retries) == (STEPS * BATCH + len(FAULTS), len(FAULTS))
    assert sum(stats.errors.values()) == len(FAULTS) and {"ReadTimeout", "bad_json", "http_500"} <= set(stats.errors)
    for a, b in zip(got.unwrapped_student.state_dict().values(), ref.unwrapped_student.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    logs = [json.loads(line) for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in logs] == [r["loss"] for r in want]
