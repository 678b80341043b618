"""Vocabulary checks: padded same-tokenizer logits are sliced, different tokenizers refused."""

from __future__ import annotations

import logging

import pytest
import torch

from kdforge.errors import ShapeError, VocabMismatchError
from kdforge.teachers import check_vocab, slice_logits, tokenizer_fingerprint, tokenizer_size

from .conftest import train_tiny_tokenizer


def test_fingerprint_is_stable_and_distinguishes_tokenizers(tokenizer):
    again = train_tiny_tokenizer()
    other = train_tiny_tokenizer(extra=" Mr. Darcy of Pemberley, Elizabeth Bennet.")
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(again)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(other)


def test_fingerprint_changes_when_a_token_is_added(tokenizer):
    extended = train_tiny_tokenizer()
    extended.add_tokens(["<|im_start|>"])
    assert tokenizer_fingerprint(extended) != tokenizer_fingerprint(tokenizer)


def test_padded_embeddings_with_same_tokenizer_are_sliced_with_notice(tokenizer, caplog):
    size = tokenizer_size(tokenizer)
    with caplog.at_level(logging.INFO, logger="kdforge.teachers.vocab"):
        align = check_vocab(size + 56, size + 120, teacher_tokenizer=tokenizer, student_tokenizer=tokenizer)
    assert align.shared_size == size and align.needs_slicing
    assert "slicing" in caplog.text
    s, t = align.apply(torch.randn(2, 3, size + 120), torch.randn(2, 3, size + 56))
    assert s.shape[-1] == t.shape[-1] == size


def test_equal_sizes_without_tokenizers_pass_unchanged():
    align = check_vocab(128, 128)
    assert align.shared_size == 128 and not align.needs_slicing


def test_different_sizes_without_tokenizers_raise():
    with pytest.raises(VocabMismatchError, match="tokenizer"):
        check_vocab(128, 160)


def test_different_tokenizers_raise_cross_tokenizer_error(tokenizer):
    other = train_tiny_tokenizer(extra=" Mr. Darcy of Pemberley, Elizabeth Bennet.")
    with pytest.raises(VocabMismatchError, match="cross-tokenizer"):
        check_vocab(256, 256, teacher_tokenizer=tokenizer, student_tokenizer=other)


def test_tokenizer_extended_with_extra_tokens_shares_its_prefix(tokenizer):
    extended = train_tiny_tokenizer()
    extended.add_tokens(["<|im_start|>", "<|im_end|>"])
    base = tokenizer_size(tokenizer)
    align = check_vocab(256, 256, teacher_tokenizer=extended, student_tokenizer=tokenizer)
    assert align.shared_size == base


def test_tokenizer_larger_than_logits_is_refused(tokenizer):
    size = tokenizer_size(tokenizer)
    with pytest.raises(VocabMismatchError, match="resize"):
        check_vocab(size - 1, size + 10, teacher_tokenizer=tokenizer)


def test_slice_logits_refuses_too_narrow_logits():
    with pytest.raises(ShapeError, match="fewer"):
        slice_logits(torch.zeros(2, 10), 12)


def test_tokenizer_identity_is_fingerprint_and_size_in_one_read(tokenizer):
    from kdforge.teachers.vocab import tokenizer_identity

    assert tokenizer_identity(tokenizer) == (tokenizer_fingerprint(tokenizer), tokenizer_size(tokenizer))
