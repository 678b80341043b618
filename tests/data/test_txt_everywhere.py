"""One ``.txt`` rule for the whole package: every reader that takes a ``.txt`` file (the data layer,
``kdforge eval``, the teacher cache's corpus, ``kdforge generate`` and ``kdforge sft``'s tables)
gives the same text, and eval and the cache cut it into the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdforge.data import load, load_documents, prepare_blocks
from kdforge.data.paragraphs import unwrap_paragraphs

RAW = ("It is a truth universally acknowledged, that a single man\nin possession of a good fortune, "
       "must be in want of a wife.\n\n\nHowever little known the feelings\n   or views of such a man may be\n\n"
       "on his first entering a neighbourhood.\n")
WANT = unwrap_paragraphs(RAW)


@pytest.fixture
def txt(tmp_path) -> Path:
    path = tmp_path / "pride.txt"
    path.write_text(RAW, encoding="utf-8")
    return path


def test_every_reader_gives_one_document_with_wrapped_lines_rejoined(txt):
    from kdforge.elicit.data import DataConfig, load_rows, read_table
    from kdforge.eval.lm import load_texts
    from kdforge.teachers.cache import read_texts

    assert "\n\n" in WANT and "single man in possession" in WANT  # paragraphs kept, lines joined
    got = {
        "data.load": load({"path": str(txt)})["train"]["text"],
        "data.load_documents": list(load_documents(str(txt), unwrap=True).values()),
        "eval.load_texts": load_texts(txt),
        "cache.read_texts": read_texts(txt),
        "generate.load_rows": [r["text"] for r in load_rows(DataConfig(path=str(txt)))],
        "sft.read_table": [r["text"] for r in read_table(txt)],
    }
    assert got == {name: [WANT] for name in got}


def test_txt_units_are_options_of_the_same_rule(txt):
    from kdforge.elicit.data import DataConfig, load_rows

    lines = [r["text"] for r in load_rows(DataConfig(path=str(txt), txt_unit="line"))]
    assert lines == [line.strip() for line in RAW.splitlines() if line.strip()]
    paras = load({"path": str(txt), "txt_unit": "paragraph"})["train"]["text"]
    assert paras == WANT.split("\n\n")


def test_eval_and_the_cache_tokenise_a_txt_file_alike(txt, tokenizer):
    from kdforge.eval.lm import data_batches
    from kdforge.teachers.cache.config import CorpusSpec, corpus_spec
    from kdforge.teachers.cache.corpus import pack_tokens, read_texts

    blocks = torch.cat([b["input_ids"] for b in data_batches({"path": str(txt)}, tokenizer, block_size=8)])
    cache_blocks, _ = prepare_blocks(corpus_spec(CorpusSpec(path=str(txt), seq_len=8)), tokenizer)
    assert torch.equal(blocks, cache_blocks)
    assert torch.equal(cache_blocks, pack_tokens(read_texts(txt), tokenizer, 8))
