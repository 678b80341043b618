"""Text packing, document splits, LM dataset and collator."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kdforge.data.text import (
    IGNORE_INDEX,
    LMBlockDataset,
    blocks_to_dataset,
    lm_collate,
    make_lm_splits,
    pack_tokens,
    select_blocks,
    unwrap_paragraphs,
)
from kdforge.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tokenizer():
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _text(start: int, n: int) -> str:
    return " ".join(f"w{(start + i) % 50}" for i in range(n))


def test_pack_tokens_concatenates_documents_with_eos_and_drops_the_tail(tokenizer):
    blocks = pack_tokens(["w1 w2 w3", "w4 w5"], tokenizer, seq_len=3)
    # stream: w1 w2 w3 <eos> w4 w5 <eos>  -> 7 tokens, 2 full blocks, 1 dropped
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[3, 4, 5], [0, 6, 7]]  # w_i has id i + 2


def test_pack_tokens_respects_max_blocks_and_rejects_too_little_text(tokenizer):
    assert pack_tokens(_text(0, 100), tokenizer, seq_len=10, max_blocks=3).shape == (3, 10)
    with pytest.raises(DataError, match="fewer than one block"):
        pack_tokens("w1 w2", tokenizer, seq_len=16)
    with pytest.raises(ConfigError):
        pack_tokens("w1 w2", tokenizer, seq_len=1)


def test_unwrap_paragraphs_joins_wrapped_lines_and_keeps_paragraph_breaks():
    text = "CHAPTER 1\n\n\nIt is a truth\nuniversally acknowledged.\n\n  \nNext  para\n"
    assert unwrap_paragraphs(text) == "CHAPTER 1\n\nIt is a truth universally acknowledged.\n\nNext para"


def test_select_blocks_is_deterministic_and_seed_dependent():
    blocks = torch.arange(40).view(20, 2)
    a = select_blocks(blocks, 5, seed=3)
    assert torch.equal(a, select_blocks(blocks, 5, seed=3))
    assert not torch.equal(a, select_blocks(blocks, 5, seed=4))
    assert len({tuple(r) for r in a.tolist()}) == 5  # no row drawn twice
    with pytest.raises(DataError, match="only 20"):
        select_blocks(blocks, 21)


def test_make_lm_splits_holds_out_a_different_document(tokenizer):
    docs = {"a": _text(0, 400), "b": _text(7, 300), "c": _text(13, 200)}
    splits = make_lm_splits(docs, tokenizer, 16, train_docs=["a", "b"], eval_docs=["c"],
                            max_train_blocks=10, max_eval_blocks=4)
    assert splits.train.shape == (10, 16) and splits.eval.shape == (4, 16)
    eval_only = pack_tokens(docs["c"], tokenizer, 16)
    eval_rows = {tuple(r) for r in eval_only.tolist()}
    assert all(tuple(r) in eval_rows for r in splits.eval.tolist())
    assert splits.summary()["train_tokens"] == 160


def test_make_lm_splits_rejects_overlap_and_unknown_documents(tokenizer):
    docs = {"a": _text(0, 100), "b": _text(0, 100)}
    with pytest.raises(ConfigError, match="both"):
        make_lm_splits(docs, tokenizer, 8, train_docs=["a"], eval_docs=["a"])
    with pytest.raises(ConfigError, match="unknown document"):
        make_lm_splits(docs, tokenizer, 8, train_docs=["a"], eval_docs=["zzz"])


def test_dataset_yields_hf_lm_keys_with_labels_equal_to_inputs():
    blocks = torch.arange(12).view(3, 4)
    extras = {"teacher_ids": torch.zeros(3, 4, 2, dtype=torch.long)}
    item = LMBlockDataset(blocks, extras)[1]
    assert item["input_ids"].tolist() == [4, 5, 6, 7]
    assert item["labels"].tolist() == [4, 5, 6, 7]
    assert item["attention_mask"].tolist() == [1, 1, 1, 1]
    assert item["teacher_ids"].shape == (4, 2)
    with pytest.raises(DataError, match="rows"):
        LMBlockDataset(blocks, {"x": torch.zeros(2, 4)})


def test_collate_pads_inputs_masks_and_sets_ignore_index_on_padded_labels():
    batch = lm_collate(
        [{"input_ids": torch.tensor([5, 6, 7]), "teacher_logprobs": torch.zeros(3, 2)},
         {"input_ids": torch.tensor([8]), "teacher_logprobs": torch.zeros(1, 2)}],
        pad_token_id=1,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["teacher_logprobs"].shape == (2, 3, 2)


def test_blocks_to_dataset_gives_an_hf_dataset_of_input_ids():
    ds = blocks_to_dataset(torch.arange(6).view(2, 3))
    assert ds["input_ids"] == [[0, 1, 2], [3, 4, 5]]
