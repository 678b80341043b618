"""Rendering with response-only labels, packing and padding, and every bad input of the layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.data.conftest import CHATML_GENERATION, NON_INCREMENTAL, make_tokenizer

from kdforge.constants import IGNORE_INDEX
from kdforge.data import parse_spec, prepare
from kdforge.data.chat import (
    render_chat,
    render_prompt_completion,
    render_text,
    tokenize_dataset,
    truncate,
)
from kdforge.data.collate import make_collator, pack_sequences, pad_batch, pad_token_id
from kdforge.errors import ConfigError, DataError

END = "<|im_end|>\n"
MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello there, how are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four is the answer."},
]


def _trained_text(tok, rendered) -> str:
    return tok.decode([t for t, lab in zip(rendered.input_ids, rendered.labels) if lab != IGNORE_INDEX])


def _runs(labels: list[int]) -> int:
    """Number of contiguous runs of trained positions."""
    return sum(1 for i, v in enumerate(labels) if v != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))


# ----------------------------------------------------------------------------- response-only masks
def test_multi_turn_chat_trains_exactly_the_assistant_turns(tokenizer):
    out = render_chat(MULTI_TURN, tokenizer)
    assert _trained_text(tokenizer, out) == "I am fine, thank you." + END + "four is the answer." + END
    assert _runs(out.labels) == 2
    full = tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tokenizer.decode(out.input_ids) == full  # the whole conversation is the input
    assert all(lab in (t, IGNORE_INDEX) for t, lab in zip(out.input_ids, out.labels))


def test_generation_markers_and_prefix_rendering_give_the_same_mask(tokenizer):
    by_prefix = render_chat(MULTI_TURN, tokenizer)
    by_markers = render_chat(MULTI_TURN, tokenizer, chat_template=CHATML_GENERATION)
    assert by_markers == by_prefix


def test_slow_tokenizers_tokenise_span_by_span_with_the_same_mask(tokenizer):
    class Slow:  # the same tokenizer, seen as one without offsets
        is_fast = False

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    out = render_chat(MULTI_TURN, Slow())
    assert _trained_text(tokenizer, out) == "I am fine, thank you." + END + "four is the answer." + END


def test_train_on_all_labels_every_chat_token(tokenizer):
    out = render_chat(MULTI_TURN, tokenizer, train_on="all")
    assert out.labels == out.input_ids


def test_prompt_completion_trains_the_completion_and_eos_only(tokenizer):
    out = render_prompt_completion("what is two plus two? ", "four", tokenizer)
    prompt_len = len(tokenizer("what is two plus two? ", add_special_tokens=False)["input_ids"])
    assert out.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert _trained_text(tokenizer, out) == "four<|endoftext|>"
    assert out.input_ids[-1] == tokenizer.eos_token_id
    assert render_prompt_completion("a ", "b", tokenizer, train_on="all").labels == \
        render_prompt_completion("a ", "b", tokenizer, train_on="all").input_ids


def test_conversational_prompt_completion_renders_as_one_chat(tokenizer):
    prompt, completion = MULTI_TURN[:4], MULTI_TURN[4:]
    out = render_prompt_completion(prompt, completion, tokenizer)
    assert _trained_text(tokenizer, out) == "I am fine, thank you." + END + "four is the answer." + END


def test_text_is_tokens_plus_eos_all_trained(tokenizer):
    out = render_text("the quick brown fox", tokenizer)
    assert out.labels == out.input_ids and out.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_start_or_the_end_with_labels_aligned(tokenizer):
    out = render_chat(MULTI_TURN, tokenizer)
    right, left = truncate(out, 10, "right"), truncate(out, 10, "left")
    assert (right.input_ids, right.labels) == (out.input_ids[:10], out.labels[:10])
    assert (left.input_ids, left.labels) == (out.input_ids[-10:], out.labels[-10:])
    assert truncate(out, None) is out


# ----------------------------------------------------------------------------- datasets and prepare()
def _write_chats(path: Path, n: int = 8) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"tell me a story {i}"},
                          {"role": "assistant", "content": f"once upon a time {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prepare_renders_a_jsonl_chat_file_with_exact_loss_positions(tmp_path, tokenizer):
    dd = prepare({"path": str(_write_chats(tmp_path / "c.jsonl")), "eval_fraction": 0.25}, tokenizer)
    assert set(dd) == {"train", "eval"} and (len(dd["train"]), len(dd["eval"])) == (6, 2)
    for row in dd["train"]:
        assert set(row) == {"input_ids", "attention_mask", "labels"}
        trained = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX])
        assert trained.startswith("once upon a time ") and trained.endswith(END)
        assert _runs(row["labels"]) == 1


def test_prepare_packs_into_blocks_that_keep_every_label(tmp_path, tokenizer):
    path = str(_write_chats(tmp_path / "c.jsonl"))
    rows = prepare({"path": path}, tokenizer)["train"]
    packed = prepare({"path": path, "packing": True, "block_size": 16}, tokenizer)["train"]
    stream_ids = [t for r in rows["input_ids"] for t in r]
    stream_labels = [t for r in rows["labels"] for t in r]
    n = len(stream_ids) // 16
    assert len(packed) == n and all(len(r) == 16 for r in packed["input_ids"])
    assert [t for r in packed["input_ids"] for t in r] == stream_ids[: n * 16]
    assert [t for r in packed["labels"] for t in r] == stream_labels[: n * 16]


def test_csv_prompt_completion_and_txt_sources_render(tmp_path, tokenizer):
    (tmp_path / "pc.csv").write_text("prompt,completion\nwhat is two plus two? ,4\n", encoding="utf-8")
    row = prepare({"path": str(tmp_path / "pc.csv")}, tokenizer)["train"][0]
    assert tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]) \
        == "4<|endoftext|>"
    (tmp_path / "book.txt").write_text("It is a truth\nuniversally acknowledged", encoding="utf-8")
    row = prepare({"path": str(tmp_path / "book.txt")}, tokenizer)["train"][0]
    assert tokenizer.decode(row["input_ids"]) == "It is a truth universally acknowledged<|endoftext|>"


# ----------------------------------------------------------------------------- bad inputs
def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_missing_field_lists_the_fields_present_and_writes_nothing(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    before = _listing(tmp_path)
    with pytest.raises(DataError, match=r"cannot tell the data format.*\['answer', 'question'\]"):
        prepare({"path": str(path)}, tokenizer)
    with pytest.raises(DataError, match=r"(?s)needs field\(s\) \[.completion.\].*completion_field"):
        prepare({"path": str(path), "prompt_field": "question"}, tokenizer)
    with pytest.raises(DataError, match="data.completion_field"):
        prepare({"path": str(path), "format": "prompt_completion", "prompt_field": "question"}, tokenizer)
    assert _listing(tmp_path) == before
    ok = prepare({"path": str(path), "prompt_field": "question", "completion_field": "answer"}, tokenizer)
    assert len(ok["train"]) == 1


def test_chat_without_an_assistant_turn_names_the_row(tokenizer):
    ds = Dataset.from_dict({"messages": [MULTI_TURN, [{"role": "user", "content": "hi"}]]})
    with pytest.raises(DataError, match="train row 1: the conversation has no assistant turn"):
        tokenize_dataset(ds, tokenizer, {"path": "x"})
    assert len(tokenize_dataset(ds, tokenizer, {"path": "x", "train_on": "all"})) == 2


def test_tokenizer_without_chat_template_is_refused_before_rendering():
    bare = make_tokenizer(chat_template=None)
    ds = Dataset.from_dict({"messages": [MULTI_TURN]})
    with pytest.raises(DataError, match="has no chat template") as err:
        tokenize_dataset(ds, bare, {"path": "x"})
    assert "data.chat_template" in str(err.value)
    out = tokenize_dataset(ds, bare, {"path": "x", "chat_template": CHATML_GENERATION})
    assert _runs(out[0]["labels"]) == 2


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    with pytest.raises(DataError, match="renders earlier turns differently"):
        render_chat(MULTI_TURN, tokenizer, chat_template=NON_INCREMENTAL)


def test_empty_after_filtering_is_an_error(tokenizer):
    with pytest.raises(DataError, match="empty after rendering"):
        tokenize_dataset(Dataset.from_dict({"text": ["", "  "]}), tokenizer, {"path": "x"})
    ds = Dataset.from_dict({"messages": [MULTI_TURN]})
    with pytest.raises(DataError, match="max_length"):  # truncation cut every response
        tokenize_dataset(ds, tokenizer, {"path": "x", "max_length": 4})
    kept = tokenize_dataset(Dataset.from_dict({"text": ["", "the fox"]}), tokenizer, {"path": "x"})
    assert len(kept) == 1


def test_malformed_messages_and_packing_without_length(tmp_path, tokenizer):
    with pytest.raises(DataError, match="message 0 is not"):
        render_chat([{"content": "no role"}], tokenizer)
    with pytest.raises(ConfigError, match="block_size"):
        prepare({"path": str(_write_chats(tmp_path / "c.jsonl")), "packing": True}, tokenizer)
    with pytest.raises(DataError, match="fewer than one block"):
        prepare({"path": str(tmp_path / "c.jsonl"), "packing": True, "block_size": 100_000}, tokenizer)


# ----------------------------------------------------------------------------- packing and padding
examples = st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=12), min_size=1, max_size=8)


def _labels_for(ex: list[list[int]], data) -> list[list[int]]:
    return [[t if data.draw(st.booleans()) else IGNORE_INDEX for t in e] for e in ex]


@settings(max_examples=60, deadline=None)
@given(ex=examples, block=st.integers(2, 9), data=st.data())
def test_packing_loses_no_token_and_keeps_labels_aligned(ex, block, data):
    labels = _labels_for(ex, data)
    out = pack_sequences(ex, labels, block)
    flat_ids = [t for e in ex for t in e]
    flat_labels = [t for e in labels for t in e]
    n = len(flat_ids) // block
    assert len(out["input_ids"]) == n
    assert [t for r in out["input_ids"] for t in r] == flat_ids[: n * block]
    assert [t for r in out["labels"] for t in r] == flat_labels[: n * block]
    assert all(r == [1] * block for r in out["attention_mask"])


@settings(max_examples=40, deadline=None)
@given(ex=examples, block=st.integers(2, 9))
def test_mask_document_starts_masks_exactly_the_first_token_of_each_example(ex, block):
    out = pack_sequences(ex, None, block, mask_document_starts=True)
    starts, pos = set(), 0
    for e in ex:
        starts.add(pos)
        pos += len(e)
    flat = [t for r in out["labels"] for t in r]
    ids = [t for r in out["input_ids"] for t in r]
    assert [i for i, v in enumerate(flat) if v == IGNORE_INDEX] == sorted(s for s in starts if s < len(flat))
    assert all(v in (IGNORE_INDEX, t) for v, t in zip(flat, ids))


@settings(max_examples=60, deadline=None)
@given(ex=examples, multiple=st.sampled_from([None, 4, 8]), data=st.data())
def test_padding_is_on_the_right_and_loses_no_token(ex, multiple, data):
    labels = _labels_for(ex, data)
    batch = pad_batch([{"input_ids": e, "labels": lab} for e, lab in zip(ex, labels)],
                      pad_token_id=99, pad_to_multiple_of=multiple)
    width = batch["input_ids"].shape[1]
    assert width >= max(map(len, ex)) and (multiple is None or width % multiple == 0)
    for row, e, lab in zip(range(len(ex)), ex, labels):
        n = int(batch["attention_mask"][row].sum())
        assert n == len(e) and batch["attention_mask"][row, :n].all()  # ones first, then zeros
        assert batch["input_ids"][row, :n].tolist() == e and batch["labels"][row, :n].tolist() == lab
        assert (batch["input_ids"][row, n:] == 99).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_pad_token_falls_back_to_eos_and_collator_uses_it(tokenizer):
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id

    class NoPad:
        pad_token_id = None
        eos_token_id = 7

    assert pad_token_id(NoPad()) == 7
    NoPad.eos_token_id = None
    with pytest.raises(DataError, match="pad_token"):
        pad_token_id(NoPad())
    batch = make_collator(tokenizer)([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"][1].tolist() == [4, tokenizer.pad_token_id, tokenizer.pad_token_id]


def test_spec_strings_and_specs_are_accepted_alike():
    assert parse_spec("data.jsonl").path == "data.jsonl"
    spec = parse_spec({"path": "d.jsonl", "format": "chat"})
    assert parse_spec(spec) is spec
