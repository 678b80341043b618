"""DataSpec and load(): every source kind, the eval-split rules, the .txt rule, presets, offline Hub."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kdforge.data import load_documents
from kdforge.data.sources import PRESETS, DataSpec, load, parse_spec, split_txt
from kdforge.errors import ConfigError, DataError

CHATS = [
    {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
    for i in range(10)
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- file kinds
def test_jsonl_chat_file_loads_as_a_train_split(tmp_path):
    dd = load({"path": str(_jsonl(tmp_path / "chats.jsonl", CHATS))})
    assert list(dd) == ["train"]
    assert len(dd["train"]) == 10
    assert dd["train"][3]["messages"][1] == {"role": "assistant", "content": "answer 3"}


def test_csv_prompt_completion_file_keeps_its_columns(tmp_path):
    rows = [{"prompt": f"2+{i}=", "completion": str(2 + i)} for i in range(5)]
    dd = load(DataSpec(path=str(_csv(tmp_path / "pc.csv", rows))))
    assert dd["train"].column_names == ["prompt", "completion"]
    assert dd["train"]["completion"] == ["2", "3", "4", "5", "6"]


def test_parquet_file_and_a_glob_of_files_load(tmp_path):
    from datasets import Dataset

    for part in range(2):
        Dataset.from_dict({"text": [f"part {part} row {i}" for i in range(3)]}).to_parquet(
            str(tmp_path / f"shard-{part}.parquet"))
    assert len(load({"path": str(tmp_path / "shard-0.parquet")})["train"]) == 3
    assert load({"path": str(tmp_path / "shard-*.parquet")})["train"]["text"][3] == "part 1 row 0"


def test_save_to_disk_folder_gives_its_named_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["a", "b", "c"]}),
                 "validation": Dataset.from_dict({"text": ["v"]})}).save_to_disk(str(tmp_path / "saved"))
    dd = load({"path": str(tmp_path / "saved"), "eval_split": "validation"})
    assert dd["train"]["text"] == ["a", "b", "c"] and dd["eval"]["text"] == ["v"]
    Dataset.from_dict({"text": ["only"]}).save_to_disk(str(tmp_path / "single"))
    assert load({"path": str(tmp_path / "single")})["train"]["text"] == ["only"]


def test_folder_of_files_splits_by_file_name_like_datasets(tmp_path):
    _jsonl(tmp_path / "train.jsonl", CHATS[:6])
    _jsonl(tmp_path / "validation.jsonl", CHATS[6:])
    dd = load({"path": str(tmp_path), "eval_split": "validation"})
    assert (len(dd["train"]), len(dd["eval"])) == (6, 4)


# ----------------------------------------------------------------------------- the .txt rule
WRAPPED = "It is a truth\nuniversally acknowledged.\n\n  \nSecond\nparagraph here.\n"


def test_a_txt_file_is_one_document_named_by_its_stem_with_wrapped_lines_rejoined(tmp_path):
    (tmp_path / "emma.txt").write_text(WRAPPED, encoding="utf-8")
    (tmp_path / "persuasion.txt").write_text("Sir Walter\nElliot.", encoding="utf-8")
    rows = load({"path": str(tmp_path)})["train"]
    assert rows["document"] == ["emma", "persuasion"]
    assert rows["text"] == ["It is a truth universally acknowledged.\n\nSecond paragraph here.", "Sir Walter Elliot."]


def test_txt_unit_paragraph_and_line_and_unwrap_false(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(WRAPPED, encoding="utf-8")
    assert load({"path": str(path), "txt_unit": "paragraph"})["train"]["text"] == [
        "It is a truth universally acknowledged.", "Second paragraph here."]
    assert load({"path": str(path), "txt_unit": "line"})["train"]["text"] == [
        "It is a truth", "universally acknowledged.", "Second", "paragraph here."]
    assert load({"path": str(path), "unwrap": False})["train"]["text"] == [WRAPPED]


def test_split_txt_drops_empty_units():
    assert split_txt("\n \n", unit="document") == []
    assert split_txt("a\n\n\n\nb", unit="paragraph") == ["a", "b"]


def test_load_documents_reads_a_folder_of_txt_through_the_layer(tmp_path):
    (tmp_path / "b.txt").write_text("two\nlines", encoding="utf-8")
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    assert load_documents(str(tmp_path)) == {"a": "one", "b": "two\nlines"}  # raw: make_lm_splits unwraps
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("clash", encoding="utf-8")
    with pytest.raises(DataError, match="both named 'a'"):
        load_documents(str(tmp_path / "**" / "*.txt"))


# ----------------------------------------------------------------------------- eval splits
def test_eval_fraction_is_deterministic_in_the_seed_and_partitions_the_rows(tmp_path):
    path = str(_jsonl(tmp_path / "c.jsonl", CHATS))
    a = load({"path": path, "eval_fraction": 0.3, "seed": 1})
    b = load({"path": path, "eval_fraction": 0.3, "seed": 1})
    c = load({"path": path, "eval_fraction": 0.3, "seed": 2})
    key = [m[0]["content"] for m in a["eval"]["messages"]]
    assert key == [m[0]["content"] for m in b["eval"]["messages"]]
    assert key != [m[0]["content"] for m in c["eval"]["messages"]]
    train = [m[0]["content"] for m in a["train"]["messages"]]
    assert len(key) == 3 and sorted(train + key) == sorted(f"question {i}" for i in range(10))


def test_eval_files_are_held_out_and_removed_from_training(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"book {name}", encoding="utf-8")
    dd = load({"path": str(tmp_path), "eval_files": "c.txt"})  # relative to the data folder
    assert dd["train"]["document"] == ["a", "b"] and dd["eval"]["document"] == ["c"]
    with pytest.raises(DataError, match="none is left to train on"):
        load({"path": str(tmp_path), "eval_files": ["*.txt"]})


def _fake_austen(cache: Path) -> None:
    from kdforge.assets.austen import BOOKS, MANIFEST, target_dir

    folder = target_dir(cache)
    folder.mkdir(parents=True)
    for book in BOOKS:
        (folder / f"{book}.txt").write_text(f"The text of\n{book}.", encoding="utf-8")
    (folder / MANIFEST).write_text("{}", encoding="utf-8")


def test_austen_preset_is_one_document_per_book_and_holds_out_a_book(kdforge_cache):
    _fake_austen(kdforge_cache)
    dd = load({"path": "austen", "eval_files": "persuasion.txt"})
    assert "persuasion" not in dd["train"]["document"] and len(dd["train"]) == 5
    assert dd["eval"]["text"] == ["The text of persuasion."]
    assert set(PRESETS) >= {"austen", "rotten-tomatoes"}


# ----------------------------------------------------------------------------- bad specs
def test_spec_rejects_unknown_keys_and_formats_with_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'eval_fraction'"):
        parse_spec({"path": "x.jsonl", "eval_fractoin": 0.1})
    with pytest.raises(ConfigError, match="did you mean 'chat'"):
        parse_spec({"path": "x.jsonl", "format": "chatt"})
    with pytest.raises(ConfigError, match="at most one of"):
        parse_spec({"path": "x.jsonl", "eval_split": "test", "eval_fraction": 0.1})
    with pytest.raises(ConfigError, match="eval_fraction"):
        parse_spec({"path": "x.jsonl", "eval_fraction": 1.5})


def test_bad_sources_raise_data_errors_that_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load({"path": str(tmp_path / "missing.jsonl")})
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    _jsonl(tmp_path / "b.jsonl", CHATS)
    with pytest.raises(DataError, match="mix types"):
        load({"path": str(tmp_path)})
    with pytest.raises(DataError, match="no split 'test'"):
        load({"path": str(tmp_path / "b.jsonl"), "eval_split": "test"})
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        load({"path": str(tmp_path / "bad.jsonl")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files|holds no"):
        load({"path": str(tmp_path / "empty")})


# ----------------------------------------------------------------------------- the Hub, offline
def _no_download(monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("load_dataset must not be called for an unreachable Hub")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_hub_id_with_offline_flag_fails_at_once_naming_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_download(monkeypatch)
    with pytest.raises(DataError, match="HF_HUB_OFFLINE=1") as err:
        load({"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"})
    assert "local file, folder or save_to_disk" in str(err.value)


def test_hub_id_with_connection_refused_fails_fast(monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    _no_download(monkeypatch)  # the probe answers before any download (and its retries) starts
    with pytest.raises(DataError, match="unreachable"):
        load({"path": "some-org/some-dataset"})
