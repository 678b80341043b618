"""``kdforge cache-teacher`` on chat and prompt/completion data: the cache keeps the response-only
loss mask (its positions are exactly the assistant / completion tokens), blanks the signal
elsewhere, and plain text through ``data:`` gives the same bytes as the older ``corpus:`` block."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from tests.data._cmd import (
    CHATS,
    PAIRS,
    assistant_token_count,
    completion_token_count,
    private_datasets_cache,  # noqa: F401  (autouse: datasets cache in tmp)
    write_chat_jsonl,
    write_models,
    write_pc_csv,
)
from tests.data.conftest import make_tokenizer

from kdforge.cli.main import main
from kdforge.constants import IGNORE_INDEX
from kdforge.teachers.cache import TeacherCacheDataset, build_teacher_cache, open_teacher_cache
from kdforge.teachers.cache.writer import BLANK_LOGPROB, signal_positions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-data")
    models = write_models(root, names=(("teacher", 0, 32),))
    return root, models["teacher"], write_chat_jsonl(root / "chats.jsonl"), write_pc_csv(root / "qa.csv")


def _run(tmp_path, teacher, data: dict, **extra) -> int:
    cfg = {"teacher": {"name_or_path": str(teacher)}, "data": data, "output_dir": str(tmp_path / "cache"),
           "k": 4, "encoding": "raw-fp32", "batch_size": 2, "shard_size": 2, **extra}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return main(["cache-teacher", str(tmp_path / "c.yaml")])


def test_chat_cache_positions_are_the_assistant_tokens(setup, tmp_path):
    root, teacher, chats, _ = setup
    assert _run(tmp_path, teacher, {"path": str(chats), "block_size": 160}) == 0
    tok = make_tokenizer()
    cache = open_teacher_cache(tmp_path / "cache")
    m = cache.manifest
    assert m["format_version"] == 3 and cache.masked
    hand = assistant_token_count(tok)
    assert m["dataset"]["loss_tokens"] == hand  # one padded row per chat: every assistant token is predicted
    ds = TeacherCacheDataset(tmp_path / "cache")
    assert len(ds) == len(CHATS)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    trained = 0
    for i, chat in enumerate(CHATS):
        item = ds[i]
        labels = item["labels"]
        real = labels != IGNORE_INDEX
        trained += int(real.sum())
        # the trained tokens decode to the assistant turns, in order
        want = "".join(msg["content"] + "<|im_end|>\n" for msg in chat if msg["role"] == "assistant")
        assert tok.decode(labels[real].tolist()) == want
        keep = torch.from_numpy(signal_positions(real.numpy()[None]))[0]
        # kept positions hold the teacher's exact top-k; the others are blank
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=item["input_ids"][None]).logits[0].float(), -1)
        top = lp.topk(4, dim=-1)
        assert torch.equal(item["teacher_ids"][keep], top.indices[keep])
        torch.testing.assert_close(item["teacher_logprobs"][keep], top.values[keep], atol=1e-5, rtol=0)
        assert (item["teacher_ids"][~keep] == 0).all()
        assert (item["teacher_logprobs"][~keep][:, 0] == 0).all()
        assert (item["teacher_logprobs"][~keep][:, 1:] == BLANK_LOGPROB).all()
    assert trained == hand


def test_inspect_reports_the_loss_mask(setup, tmp_path, capsys):
    root, teacher, chats, _ = setup
    assert _run(tmp_path, teacher, {"path": str(chats), "block_size": 160}) == 0
    assert "per trained position" in capsys.readouterr().out
    assert main(["cache-teacher", str(tmp_path / "cache"), "--inspect"]) == 0
    hand = assistant_token_count(make_tokenizer())
    assert f"loss mask   {hand} of {len(CHATS) * 160} positions trained" in capsys.readouterr().out


def test_prompt_completion_csv_cache_trains_only_completions(setup, tmp_path):
    root, teacher, _, qa = setup
    data = {"path": str(qa), "prompt_field": "question", "completion_field": "answer", "block_size": 48}
    assert _run(tmp_path, teacher, data) == 0
    ds = TeacherCacheDataset(tmp_path / "cache")
    tok = make_tokenizer()
    assert ds.cache.manifest["dataset"]["loss_tokens"] == completion_token_count(tok)
    for i, (_, completion) in enumerate(PAIRS):
        labels = ds[i]["labels"]
        assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == completion + tok.eos_token


def test_packed_chat_cache_mask_survives_packing(setup, tmp_path):
    root, teacher, chats, _ = setup
    assert _run(tmp_path, teacher, {"path": str(chats), "packing": True, "block_size": 16}) == 0
    from kdforge.data import prepare_blocks

    ids, labels = prepare_blocks({"path": str(chats), "packing": True, "block_size": 16}, make_tokenizer())
    ds = TeacherCacheDataset(tmp_path / "cache")
    assert len(ds) == ids.shape[0]
    for i in range(len(ds)):
        assert torch.equal(ds[i]["labels"], labels[i])
    assert ds.cache.manifest["dataset"]["loss_tokens"] == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_text_through_data_is_the_same_cache_as_the_corpus_block(setup, tmp_path):
    root, teacher, _, _ = setup
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello there, how are you\ntoday?\n\nI am fine, thank you very much.\n")
    (docs / "b.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old_cfg = {"teacher": {"name_or_path": str(teacher)}, "output_dir": str(tmp_path / "old" / "cache"), "k": 4,
               "corpus": {"path": str(docs), "seq_len": 8}}
    (tmp_path / "old" / "c.yaml").write_text(yaml.safe_dump(old_cfg))
    assert main(["cache-teacher", str(tmp_path / "old" / "c.yaml")]) == 0
    assert _run(tmp_path / "new", teacher, {"path": str(docs / "*.txt"), "packing": True, "block_size": 8},
                encoding="compact-u8-zstd", batch_size=8, shard_size=256) == 0
    old = json.loads((tmp_path / "old" / "cache" / "manifest.json").read_text())
    new = json.loads((tmp_path / "new" / "cache" / "manifest.json").read_text())
    assert old["format_version"] == new["format_version"] == 1  # plain text: no mask, the old format
    assert old["dataset"] == new["dataset"]
    assert [s["sha256"] for s in old["shards"]] == [s["sha256"] for s in new["shards"]]


def test_blanking_untrained_positions_shrinks_a_compressed_cache(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdforge.data import prepare_blocks

    root, teacher, chats, _ = setup
    ids, labels = prepare_blocks({"path": str(chats), "block_size": 160}, make_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(teacher)
    sizes = {}
    for name, mask in (("full", None), ("masked", labels != IGNORE_INDEX)):
        out = build_teacher_cache(model, ids, tmp_path / name, k=4, teacher_id="t", weights_hash="w", loss_mask=mask)
        sizes[name] = sum(s["bytes"] for s in open_teacher_cache(out).manifest["shards"])
    assert sizes["masked"] < sizes["full"]


def test_a_different_mask_is_a_different_cache(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdforge.errors import CacheError

    root, teacher, _, _ = setup
    model = AutoModelForCausalLM.from_pretrained(teacher)
    ids = torch.arange(24).reshape(3, 8) % 50 + 5
    mask = np.ones((3, 8), dtype=bool)
    mask[:, :4] = False
    build_teacher_cache(model, ids, tmp_path / "c", k=4, teacher_id="t", weights_hash="w", loss_mask=mask)
    with pytest.raises(CacheError, match="differs in: dataset"):
        build_teacher_cache(model, ids, tmp_path / "c", k=4, teacher_id="t", weights_hash="w", loss_mask=~mask)
    (tmp_path / "c" / "loss_mask.npy").write_bytes(b"junk")
    with pytest.raises(CacheError, match="loss_mask.npy is corrupted"):
        open_teacher_cache(tmp_path / "c")


@pytest.mark.parametrize("case", ["missing_field", "no_assistant", "no_template", "missing_file", "hub_offline"])
def test_cache_teacher_bad_data_is_a_clear_error_and_writes_nothing(setup, tmp_path, monkeypatch, capsys, case):
    root, teacher, chats, qa = setup
    extra: dict = {}
    if case == "missing_field":
        data, want = {"path": str(qa), "format": "prompt_completion"}, "prompt_field"
    elif case == "no_assistant":
        (tmp_path / "u.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
        data, want = {"path": str(tmp_path / "u.jsonl")}, "no assistant turn"
    elif case == "no_template":
        tok = make_tokenizer(chat_template=None)
        tok.save_pretrained(tmp_path / "plain")
        data, want, extra = {"path": str(chats)}, "no chat template", {"tokenizer": str(tmp_path / "plain")}
    elif case == "missing_file":
        data, want = {"path": str(tmp_path / "nope.jsonl")}, "does not exist"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        data, want = {"path": "someone/some-dataset"}, "HF_HUB_OFFLINE"
    assert _run(tmp_path, teacher, {**data, "block_size": 32}, **extra) == 2
    err = capsys.readouterr().err
    assert want in err and "Fix:" in err
    assert not (tmp_path / "cache").exists()


def test_a_student_trains_from_a_masked_chat_cache_on_the_assistant_positions_only(setup, tmp_path):
    from tests.data._cmd import tiny_llama

    from kdforge.data import prepare_blocks
    from kdforge.teachers.cache import collate_teacher_cache
    from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig

    root, teacher, chats, _ = setup
    from transformers import AutoModelForCausalLM

    ids, labels = prepare_blocks({"path": str(chats), "block_size": 160}, make_tokenizer())
    cache = build_teacher_cache(AutoModelForCausalLM.from_pretrained(teacher), ids, tmp_path / "c", k=8,
                                loss_mask=labels != IGNORE_INDEX)
    data = TeacherCacheDataset(cache, ids)
    batch = collate_teacher_cache([data[i] for i in range(len(data))])
    task = CausalLMTask()
    assert int(task.count(batch)) == assistant_token_count(make_tokenizer())  # the KD/CE positions
    student = tiny_llama(len(make_tokenizer()), seed=1, hidden=32)
    d = Distiller(student, None, task=task, objective=[LossTerm("forward_kl", 1.0)],
                  config=TrainConfig(max_steps=15, batch_size=4, lr=3e-3, output_dir=str(tmp_path / "run"),
                                     progress=False),
                  train_data=data, collate_fn=collate_teacher_cache, eval_data=data)
    before = d.evaluate()["eval/kl_to_teacher"]
    d.train()
    assert d.evaluate()["eval/kl_to_teacher"] < 0.8 * before


def test_cache_teacher_cli_stores_hidden_states_of_the_chosen_layers(setup, tmp_path):
    """YAML ``feature_layers`` / ``feature_dtype`` reach the builder: the cache replays the layers."""
    root, teacher, _, _ = setup
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    cfg = {"teacher": {"name_or_path": str(teacher)}, "output_dir": str(tmp_path / "cache"), "k": 4,
           "corpus": {"path": str(docs), "seq_len": 8}, "feature_layers": [0, 1], "feature_dtype": "bf16"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["cache-teacher", str(tmp_path / "c.yaml")]) == 0
    ds = TeacherCacheDataset(tmp_path / "cache")
    item = ds[0]
    assert ds.cache.manifest["features"]["dtype"] == "bf16"
    assert item["teacher_hidden_states"].shape[:2] == (2, 8) and item["teacher_feature_layers"].tolist() == [0, 1]
