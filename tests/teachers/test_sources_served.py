"""ServedTeacher against a loopback vLLM-protocol server that serves a real tiny model's top-k.

The served top-k must equal the local model's (ids exactly, log-probs to float32 precision) at
every loss position, through both protocols, through the fault proxy of the elicitation tests
(dropped connections, 429/503 with Retry-After), and fail with clear errors otherwise.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.elicit.elicit_servers import FaultProxy  # noqa: E402

from kdforge.errors import ConfigError, GenerationError  # noqa: E402
from kdforge.losses.signal import SparseTeacher  # noqa: E402
from kdforge.teachers import OnlineTeacher, ServedTeacher, TeacherSource  # noqa: E402
from kdforge.teachers.signal import TeacherSignal  # noqa: E402

from ._fake_vllm import LoopbackServer, build_app  # noqa: E402
from ._standin_task import CausalLMTask, ClassifierTask  # noqa: E402
from .conftest import tiny_llama, train_tiny_tokenizer  # noqa: E402

K = 5


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(vocab_size=len(tok))


@pytest.fixture(scope="module")
def server(model, tok):
    app = build_app(model, tok, max_logprobs=20)
    with LoopbackServer(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(autouse=True)
def _reset(server):
    server.app.state.behaviour["mode"] = "ok"
    server.app.state.seen.clear()


@pytest.fixture
def batch(tok):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, len(tok), (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: 9 real tokens
    mask[2, 4:] = 0  # 4 real tokens
    return {"input_ids": ids, "attention_mask": mask}


def _teacher(url: str, **kw) -> ServedTeacher:
    kw.setdefault("k", K)
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("timeout_s", 20)
    return ServedTeacher(url, "tiny", rng_seed=0, **kw)


def _served_positions(batch):
    """[B, T-1] True where loss position t has a served distribution (tokens t and t+1 real)."""
    m = batch["attention_mask"].bool()
    return m[:, :-1] & m[:, 1:]


def _assert_matches_local(sparse, model, batch):
    ref = OnlineTeacher(model).topk(batch["input_ids"], batch["attention_mask"], k=K)
    where = _served_positions(batch)
    assert sparse.ids.shape == (3, 11, K) and sparse.ids.dtype == torch.int64
    assert sparse.logprobs.dtype == torch.float32
    assert torch.equal(sparse.ids[where], ref.ids[:, :-1][where])
    torch.testing.assert_close(sparse.logprobs[where], ref.logprobs[:, :-1][where], rtol=0, atol=1e-5)


def test_prompt_logprobs_protocol_returns_the_local_models_true_top_k(server, model, batch):
    with _teacher(server.base_url) as teacher:
        signal = teacher.signal(batch, CausalLMTask())
    assert signal.kind == "sparse" and signal.logits is None
    _assert_matches_local(signal.sparse, model, batch)
    bodies = server.app.state.seen
    assert sorted(len(b["prompt"]) for b in bodies) == [4, 9, 12]  # only the real tokens, as ids
    assert all(b["prompt_logprobs"] == K and b["max_tokens"] == 1 and "echo" not in b for b in bodies)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_protocol_with_token_id_keys_returns_the_same_top_k(server, model, batch, max_tokens):
    with _teacher(server.base_url, protocol="echo", max_tokens=max_tokens) as teacher:
        sparse = teacher.score(batch["input_ids"], batch["attention_mask"])
    _assert_matches_local(sparse, model, batch)
    assert all(b["echo"] and b["logprobs"] == K and b["return_tokens_as_token_ids"] for b in server.app.state.seen)


def test_echo_protocol_maps_token_strings_back_through_the_tokenizer(server, model, tok, batch):
    with _teacher(server.base_url, protocol="echo", token_ids=False, tokenizer=tok) as teacher:
        sparse = teacher.score(batch["input_ids"], batch["attention_mask"])
    _assert_matches_local(sparse, model, batch)
    assert not any("return_tokens_as_token_ids" in b for b in server.app.state.seen)


def test_positions_without_a_served_distribution_hold_a_finite_placeholder(server, batch):
    with _teacher(server.base_url) as teacher:
        sparse = teacher.score(batch["input_ids"], batch["attention_mask"])
    empty = ~_served_positions(batch)
    assert empty.sum() == 3 + 8  # row 1: positions 8..10, row 2: positions 3..10
    assert (sparse.ids[empty] == 0).all()
    assert (sparse.logprobs[empty][:, 0] == 0).all() and torch.isneginf(sparse.logprobs[empty][:, 1:]).all()
    assert torch.isfinite(sparse.logprobs[~empty]).all()


def test_left_padding_is_scored_at_the_right_positions(server, model):
    ids = torch.tensor([[7, 7, 12, 40, 5, 9, 33]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with _teacher(server.base_url) as teacher:
        sparse = teacher.score(ids, mask)
    ref = OnlineTeacher(model).topk(ids[:, 2:], k=K)  # the real tokens alone
    assert torch.equal(sparse.ids[0, 2:], ref.ids[0, :-1])
    torch.testing.assert_close(sparse.logprobs[0, 2:], ref.logprobs[0, :-1], rtol=0, atol=1e-5)
    assert (sparse.logprobs[0, :2, 0] == 0).all()


def test_survives_dropped_connections_and_429_503_with_retry_after(server, model, batch):
    with FaultProxy(server.base_url, ["drop", "status:429:0", "status:503:0", "drop"]) as proxy:
        with _teacher(proxy.base_url, concurrency=1, max_retries=6) as teacher:
            sparse = teacher.score(batch["input_ids"], batch["attention_mask"])
            stats = teacher.stats
        actions = proxy.actions()
    _assert_matches_local(sparse, model, batch)
    assert actions[:4] == ["drop", "status:429:0", "status:503:0", "drop"] and actions[4:] == ["ok"] * 3
    assert stats.retries == 4 and stats.requests == 7
    assert stats.errors.get("http_429") == 1 and stats.errors.get("http_503") == 1


def test_retry_after_header_sets_the_wait_capped_by_retry_after_max_s(server, batch, caplog):
    # backoff alone would wait at most backoff_base_s = 0.01 s; Retry-After: 7 capped at 0.05 s shows it was obeyed
    caplog.set_level("DEBUG", logger="kdforge.teachers.sources.served")
    with FaultProxy(server.base_url, ["status:429:7"]) as proxy, \
            _teacher(proxy.base_url, concurrency=1, retry_after_max_s=0.05) as teacher:
        teacher.score(batch["input_ids"][:1])
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 1 and retries[0].endswith("retrying in 0.05s") and "HTTP 429" in retries[0]


def test_unreachable_server_is_a_generation_error_naming_the_fix(batch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _teacher(f"http://127.0.0.1:{port}/v1", max_retries=1, connect_timeout_s=2) as teacher, \
            pytest.raises(GenerationError, match="did not answer after 2 attempt") as err:
        teacher.score(batch["input_ids"][:1])
    assert "server is up" in err.value.fix and f"127.0.0.1:{port}" in err.value.problem


def test_missing_prompt_logprobs_is_an_error_pointing_at_vllm(server, batch):
    server.app.state.behaviour["mode"] = "no_logprobs"
    for protocol in ("prompt_logprobs", "echo"):
        with _teacher(server.base_url, protocol=protocol) as teacher, pytest.raises(GenerationError) as err:
            teacher.score(batch["input_ids"][:1])
        assert "no prompt_logprobs" in err.value.problem or "no logprobs.top_logprobs" in err.value.problem
        assert "vllm serve" in err.value.fix and "transformers serve" in err.value.fix


def test_fewer_than_k_entries_is_an_error_naming_max_logprobs(server, batch):
    server.app.state.behaviour["mode"] = "few"
    with _teacher(server.base_url) as teacher, pytest.raises(GenerationError, match="fewer than k=5") as err:
        teacher.score(batch["input_ids"][:1])
    assert "--max-logprobs 5" in err.value.fix


def test_k_above_the_servers_cap_is_rejected_at_once_with_the_fix(server, batch):
    with _teacher(server.base_url, k=21) as teacher, pytest.raises(GenerationError, match="HTTP 400") as err:
        teacher.score(batch["input_ids"][:1])
    assert "--max-logprobs 21" in err.value.fix
    assert len(server.app.state.seen) == 1  # a 400 is not retried


def test_misuse_is_a_config_error(server, batch, tok):
    with pytest.raises(ConfigError, match="no tokenizer"):
        ServedTeacher(server.base_url, "tiny", protocol="echo", token_ids=False)
    with pytest.raises(ConfigError, match="protocol"):
        ServedTeacher(server.base_url, "tiny", protocol="chat")
    with pytest.raises(ConfigError, match="max_tokens=0"):
        ServedTeacher(server.base_url, "tiny", max_tokens=0)
    teacher = _teacher(server.base_url)
    with pytest.raises(ConfigError, match="intermediate features"):
        teacher.signal(batch, CausalLMTask(), features=object())
    with pytest.raises(ConfigError, match="input_ids"):
        teacher.signal({"inputs": torch.randn(2, 4)}, ClassifierTask())
    holes = dict(batch, attention_mask=torch.tensor([[1, 0, 1] + [1] * 9] * 3))
    with pytest.raises(ConfigError, match="holes"):
        teacher.signal(holes, CausalLMTask())
    teacher.close()


def test_ids_beyond_vocab_size_are_an_error(server, batch):
    with _teacher(server.base_url, vocab_size=3) as teacher, pytest.raises(GenerationError, match="vocab_size=3"):
        teacher.score(batch["input_ids"][:1])


def test_api_key_is_sent_but_never_shown(server, batch, monkeypatch):
    monkeypatch.setenv("KDF_TEST_KEY", "sekret-123")
    with _teacher(server.base_url, api_key_env="KDF_TEST_KEY") as teacher:
        assert "sekret" not in repr(teacher)
        teacher.score(batch["input_ids"][:1])
    monkeypatch.delenv("KDF_TEST_KEY")
    with pytest.raises(ConfigError, match="KDF_TEST_KEY"):
        _teacher(server.base_url, api_key_env="KDF_TEST_KEY")


def test_source_contract_and_deepcopy(server, batch):
    import copy

    teacher = _teacher(server.base_url)
    assert teacher.provides == frozenset({"sparse"}) and teacher.scores_new_samples
    assert teacher.modules() == [] and teacher.state_dict() == {}
    a = teacher.score(batch["input_ids"][:1])
    clone = copy.deepcopy(teacher)  # the event loop and client are not copied, only rebuilt
    b = clone.score(batch["input_ids"][:1])
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    teacher.close()
    clone.close()
    teacher.close()  # idempotent


@pytest.mark.slow
def test_transformers_serve_cannot_serve_prompt_logprobs(tmp_path):
    """The real ``transformers serve`` refuses (422) what a ServedTeacher needs, and says why."""
    from tests.elicit.conftest import build_tiny_model
    from tests.elicit.elicit_servers import start_transformers_serve, stop_process

    model_dir = build_tiny_model(tmp_path / "tiny")
    proc, base_url = start_transformers_serve(model_dir, tmp_path / "serve.log")
    try:
        for protocol in ("prompt_logprobs", "echo"):
            with _teacher(base_url, protocol=protocol, max_retries=0) as teacher, \
                    pytest.raises(GenerationError) as err:
                teacher.score(torch.tensor([[5, 6, 7, 8]]))
            assert "HTTP 4" in err.value.problem and "transformers serve" in err.value.fix
    finally:
        stop_process(proc)


def test_works_with_the_trainers_causal_lm_task(server, model, batch):
    from kdforge.train.tasks import CausalLMTask as RealTask

    with _teacher(server.base_url) as teacher:
        signal = teacher.signal(batch, RealTask())
        no_mask = teacher.signal({"input_ids": batch["input_ids"]}, RealTask())  # attention_mask None
    _assert_matches_local(signal.sparse, model, batch)
    assert no_mask.sparse.shape == (3, 11) and torch.isfinite(no_mask.sparse.logprobs).all()


def test_a_distiller_trains_against_the_served_teacher(tmp_path):
    """Two optimizer steps of forward KL to the served top-k give the loss of the local top-k."""
    from tests.train._tiny import TokenDataset, pad_collate
    from tests.train._tiny import tiny_llama as trainer_llama

    from kdforge.train import CausalLMTask as RealTask
    from kdforge.train import Distiller, LossTerm, TrainConfig

    served_model = trainer_llama(seed=3, head_scale=20.0).eval()

    def run(teacher, out):
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, progress=False, log_every=1, output_dir=str(out),
                          seed=1)
        d = Distiller(trainer_llama(seed=1), teacher, task=RealTask(),
                      objective=[LossTerm("forward_kl", 1.0, {"sparse_policy": "tail_bucket"})], config=cfg,
                      train_data=TokenDataset(n=8), collate_fn=pad_collate())
        d.train()
        return d

    with LoopbackServer(build_app(served_model)) as srv, _teacher(srv.base_url) as teacher:
        served = run(teacher, tmp_path / "served")
    assert teacher.stats.requests == 8  # 2 steps x 4 rows

    class LocalTopK(TeacherSource):  # the same top-k computed in process: the reference
        provides = frozenset({"sparse"})

        def signal(self, batch, task, *, features=None):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            sparse = OnlineTeacher(served_model).topk(ids, mask, k=K)
            return TeacherSignal(sparse=SparseTeacher(sparse.ids[:, :-1], sparse.logprobs[:, :-1], 0))

    local = run(LocalTopK(), tmp_path / "local")
    for a, b in zip(served.unwrapped_student.parameters(), local.unwrapped_student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
