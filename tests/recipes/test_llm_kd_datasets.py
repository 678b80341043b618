"""llm_kd on kdforge.data datasets: response-only rows, every regime per method, errors before writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdforge.config import validate
from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ConfigError, DataError
from kdforge.recipes.llm_kd import LLMKD, LLMKDConfig
from kdforge.recipes.lm_data import DatasetSpec, build_lm_data

from . import _byo

TRAIN = {"max_steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 1, "eval_every": 3, "progress": False}
EVAL = {"batch_size": 4, "during_training_sequences": 4, "speed_batch": 2, "speed_repeats": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kd-data")
    _byo.teacher_and_student(root)
    _byo.chat_jsonl(root / "chats.jsonl", rows=16)
    return root


def _tok(root: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "teacher")


def test_chat_rows_train_exactly_the_assistant_turns(setup):
    tok = _tok(setup)
    data = build_lm_data(DatasetSpec(path=str(setup / "chats.jsonl"), eval_fraction=0.25, max_length=64), tok)
    expected = set()
    for line in (setup / "chats.jsonl").read_text().splitlines():
        turns = [m["content"] + " <|end|>" for m in json.loads(line)["messages"] if m["role"] == "assistant"]
        expected.add(" ".join(turns))
    for ids, labels, mask in [(data.train, data.train_labels, data.train_mask),
                              (data.eval, data.eval_labels, data.eval_mask)]:
        assert ids.shape == labels.shape == mask.shape
        for row, lab, att in zip(ids, labels, mask):
            trained = row[lab != IGNORE_INDEX]
            assert torch.equal(trained, lab[lab != IGNORE_INDEX])  # labels are the ids where trained
            assert tok.decode(trained.tolist(), skip_special_tokens=False) in expected
            assert (lab[att == 0] == IGNORE_INDEX).all()  # padding is never trained
    assert data.response_only


def test_packing_keeps_response_only_labels(setup):
    tok = _tok(setup)
    data = build_lm_data(DatasetSpec(path=str(setup / "chats.jsonl"), eval_fraction=0.25, packing=True,
                                     block_size=16), tok)
    assert data.train.shape[1] == 16 and bool(data.train_mask.all())
    assert data.response_only and (data.train_labels != IGNORE_INDEX).any()


def _config(root: Path, out: Path, **overrides) -> LLMKDConfig:
    raw = {"output_dir": str(out), "teacher": {"model": str(root / "teacher")},
           "student": {"kind": "from_config", "hidden_size": 16, "num_layers": 2},
           "data": {"path": str(root / "chats.jsonl"), "eval_fraction": 0.25, "max_length": 48},
           "cache": {"k": 8, "batch_size": 8}, "train": TRAIN, "eval": EVAL, "plot": False,
           "save_students": False}
    raw.update(overrides)
    return validate(LLMKDConfig, raw, source="test")


def test_every_regime_per_method_on_chat_data(setup, tmp_path):
    methods = [
        {"name": "labels only", "role": "baseline", "objective": [{"name": "cross_entropy", "weight": 1.0}]},
        {"name": "rkl online", "teacher": "online", "objective": [{"name": "reverse_kl", "weight": 1.0}]},
        {"name": "taid", "objective": [{"name": "taid", "weight": 1.0}], "taid": {"t_start": 0.4, "mode": "linear"}},
        {"name": "gkd", "objective": [{"name": "generalized_jsd", "weight": 1.0, "params": {"beta": 0.5}}],
         "on_policy": {"lmbda": 1.0, "max_new_tokens": 3}},
        {"name": "hint", "objective": [{"name": "forward_kl", "weight": 1.0},
                                       {"name": "hidden_mse", "weight": 0.5, "params": {"layers": "uniform"}}]},
    ]
    config = _config(setup, tmp_path / "run", methods=methods)
    results = LLMKD().run(config, tmp_path / "run")
    rows = {r["name"]: r for r in results["models"]}
    assert set(rows) == {"teacher", *(f"student / {m['name']}" for m in methods)}
    for m in methods:
        metrics = rows[f"student / {m['name']}"]["metrics"]
        assert all(v == v for v in metrics.values() if isinstance(v, float))  # finite or absent, never NaN
    assert results["data"]["train_loss_tokens"] < results["data"]["train_tokens"]
    assert "source_layers" not in results["student_init"]  # a from_config student is not a cut
    assert (tmp_path / "run" / "teacher_cache").is_dir()  # the taid / labels-only methods read the cache


def test_online_only_methods_build_no_cache(setup, tmp_path):
    methods = [{"name": "kd online", "teacher": "online", "objective": [{"name": "forward_kl", "weight": 1.0}]}]
    LLMKD().run(_config(setup, tmp_path / "run", methods=methods), tmp_path / "run")
    assert not (tmp_path / "run" / "teacher_cache").exists()


def test_teacher_cache_refuses_on_policy():
    with pytest.raises(ConfigError, match="teacher: cache"):
        validate(LLMKDConfig, {"methods": [{"name": "g", "teacher": "cache", "on_policy": {"lmbda": 1.0},
                                            "objective": [{"name": "generalized_jsd", "weight": 1.0}]}]})


def _bad(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_data_fails_before_anything_is_written(setup, tmp_path):
    chat = [{"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}] * 4
    no_reply = [{"messages": [{"role": "user", "content": "w1 w2"}]}] * 4
    cases = [
        ({"path": str(_bad(tmp_path, "chat", chat)), "format": "chat", "messages_field": "conversation",
          "eval_fraction": 0.25}, DataError, "conversation"),
        ({"path": str(_bad(tmp_path, "noreply", no_reply)), "eval_fraction": 0.25}, DataError,
         "no assistant turn"),
        ({"path": str(tmp_path / "chat.jsonl")}, ConfigError, "held-out"),
    ]
    for data, error, match in cases:
        out = tmp_path / "never"
        with pytest.raises(error, match=match):
            LLMKD().run(_config(setup, out, data=data), out)
        assert not out.exists()


def test_tokenizer_without_chat_template_fails_before_writing(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = tmp_path / "plain-teacher"
    AutoModelForCausalLM.from_pretrained(setup / "teacher").save_pretrained(plain)
    tok = AutoTokenizer.from_pretrained(setup / "teacher")
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "never"
    config = _config(setup, out, teacher={"model": str(plain)})
    with pytest.raises(DataError, match="no chat template"):
        LLMKD().run(config, out)
    assert not out.exists()


def test_cache_of_chat_data_stores_only_the_assistant_positions_and_train_on_is_in_its_fingerprint(setup, tmp_path):
    """The run's teacher cache is built with the response-only mask: the signal is kept exactly at the
    logit positions whose next token is an assistant token, blanked elsewhere; a cache built for
    ``train_on: completion`` is refused for ``train_on: all`` (its fingerprint holds the mask)."""
    from kdforge.errors import CacheError
    from kdforge.teachers import TeacherCacheDataset

    cache = tmp_path / "cache"
    methods = [{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}]
    train = {**TRAIN, "max_steps": 1, "eval_every": 1}
    config = _config(setup, tmp_path / "run", methods=methods, train=train, cache={"k": 4, "dir": str(cache)})
    LLMKD().run(config, tmp_path / "run")
    data = build_lm_data(config.data, _tok(setup))
    ds = TeacherCacheDataset(cache)
    assert ds.cache.masked and len(ds) == data.train.shape[0]
    assistant = data.train_labels != IGNORE_INDEX  # the assistant tokens (padding and user turns: -100)
    assert ds.cache.manifest["dataset"]["loss_tokens"] == int(assistant[:, 1:].sum())
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(item["labels"], data.train_labels[i])  # the cache replays the response-only labels
        kept = torch.zeros_like(assistant[i])
        kept[:-1] = assistant[i, 1:]  # logit t predicts token t + 1
        blank = (item["teacher_ids"] == 0).all(-1)  # a real top-k has k distinct ids
        assert (item["teacher_logprobs"][blank, 0] == 0).all()
        assert torch.equal(~blank, kept), i  # a signal exactly where the loss reads one

    all_tokens = {**config.data.model_dump(exclude_unset=True), "train_on": "all"}
    again = _config(setup, tmp_path / "run2", methods=methods, train=train, cache={"k": 4, "dir": str(cache)},
                    data=all_tokens)
    with pytest.raises(CacheError, match="differs"):
        LLMKD().run(again, tmp_path / "run2")


def test_a_cached_ensemble_on_chat_data_keeps_the_response_only_cache(setup, tmp_path):
    """Every member cache of a cached ensemble is masked like the run's own cache: the main teacher's
    member cache is the run's cache, reused (not rebuilt without the mask), and the other teacher's
    stores the same assistant positions."""
    from kdforge.teachers import TeacherCacheDataset

    methods = [{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]},
               {"name": "ens", "teacher": "ensemble", "ensemble": {"members": ["teacher", "b"]},
                "objective": [{"name": "forward_kl", "weight": 1.0}]}]
    train = {**TRAIN, "max_steps": 1, "eval_every": 1}
    out = tmp_path / "run"
    config = _config(setup, out, methods=methods, train=train, cache={"k": 4},
                     teachers=[{"name": "b", "model": str(setup / "teacher")}])
    LLMKD().run(config, out)
    data = build_lm_data(config.data, _tok(setup))
    loss_tokens = int((data.train_labels != IGNORE_INDEX)[:, 1:].sum())
    for folder in ("teacher_cache", "teacher_cache-b"):
        cache = TeacherCacheDataset(out / folder).cache
        assert cache.masked and cache.manifest["dataset"]["loss_tokens"] == loss_tokens, folder
