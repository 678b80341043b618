"""Cross-tokenizer KD from a teacher cache: token offsets stored compactly and checked, the cached
signal equal to the live one (exactly with k = V and lossless log-probs; the top-k entries with a
smaller k), refusals that name the fix, old caches unchanged, and a few Distiller steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import CacheError
from kdforge.teachers import (
    CachedCrossTokenizerCollator,
    CachedCrossTokenizerTeacher,
    CrossTokenizerCacheDataset,
    CrossTokenizerTeacher,
    build_cross_tokenizer_cache,
    build_teacher_cache,
    encode_texts,
    open_teacher_cache,
)
from kdforge.teachers.cache.offsets import decode_offsets, encode_offsets
from kdforge.teachers.crosstok import encode_student
from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig

from .conftest import tiny_llama
from .test_cross_tokenizer import TEXTS, _bpe


@pytest.fixture(scope="module")
def tokenizers():
    student = _bpe(300, "Mr. Darcy of Pemberley and Elizabeth Bennet walked on.")
    teacher = _bpe(420, "A very different text shapes very different merges of the letters.")
    return student, teacher


@pytest.fixture(scope="module")
def teacher(tokenizers):
    return tiny_llama(vocab_size=len(tokenizers[1]), seed=1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9)), min_size=1, max_size=12),
                min_size=1, max_size=4))
def test_offsets_round_trip(rows):
    """Any non-negative (gap, length) layout, padded rows included, decodes to the same offsets."""
    width = max(len(r) for r in rows)
    offsets = np.zeros((len(rows), width, 2), np.int64)
    for i, row in enumerate(rows):
        end = 0
        for j, (gap, n) in enumerate(row):
            offsets[i, j] = (end + gap, end + gap + n)
            end += gap + n
    lengths = np.array([len(r) for r in rows])
    back, lens = decode_offsets(encode_offsets(offsets, lengths))
    assert np.array_equal(back, offsets) and np.array_equal(lens, lengths)


def _cached_batch(tmp_path, teacher, tokenizers, texts, *, k, encoding, max_length=None):
    student_tok, teacher_tok = tokenizers
    _, covered = encode_student(texts, student_tok, max_length=max_length)
    out = build_cross_tokenizer_cache(teacher, teacher_tok, covered, tmp_path / "xcache", k=k, encoding=encoding,
                                      batch_size=2, shard_size=3)
    ds = CrossTokenizerCacheDataset(out, covered, teacher_tokenizer=teacher_tok)
    return ds, CachedCrossTokenizerCollator(student_tok, max_length=max_length)([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("policy", ["merge", "skip"])
def test_cache_with_k_equal_vocab_gives_the_live_signal(tmp_path, teacher, tokenizers, policy):
    student_tok, teacher_tok = tokenizers
    ds, cached_batch = _cached_batch(tmp_path, teacher, tokenizers, TEXTS, k=len(teacher_tok), encoding="raw-fp32",
                                     max_length=24)
    live_batch = encode_texts(TEXTS, student_tok, teacher_tok, max_length=24)
    for key, value in live_batch.items():  # same tokenizations, same padding width
        assert torch.equal(cached_batch[key], value), key
    live_src = CrossTokenizerTeacher(teacher, teacher_tok, student_tok, span_policy=policy)
    cached_src = CachedCrossTokenizerTeacher(teacher_tok, student_tok, vocab_size=ds.vocab_size, span_policy=policy)
    live = live_src.signal(live_batch, CausalLMTask()).cross
    cached = cached_src.signal(cached_batch, CausalLMTask()).cross
    assert torch.equal(cached.mask, live.mask) and cached.mask.any()
    m = live.mask
    torch.testing.assert_close(cached.logits[m], torch.log_softmax(live.logits[m], -1), atol=2e-5, rtol=0)
    if policy == "merge":
        torch.testing.assert_close(cached.log_scale[m], live.log_scale[m], atol=2e-5, rtol=0)
        assert (live.student_merge >= 0).any()  # some spans were merged
    from kdforge.losses.uld import gold, uld

    z = torch.randn(*live_batch["input_ids"][:, 1:].shape, len(student_tok))
    for loss in (gold, uld):
        torch.testing.assert_close(loss(z, cached), loss(z, live), atol=1e-5, rtol=1e-5)


def test_cache_with_small_k_keeps_the_teachers_top_entries(tmp_path, teacher, tokenizers):
    student_tok, teacher_tok = tokenizers
    k = 8
    ds, cached_batch = _cached_batch(tmp_path, teacher, tokenizers, TEXTS, k=k, encoding="compact-u8-zstd")
    live_src = CrossTokenizerTeacher(teacher, teacher_tok, student_tok, span_policy="skip")
    cached_src = CachedCrossTokenizerTeacher(teacher_tok, student_tok, vocab_size=ds.vocab_size, span_policy="skip")
    live = live_src.signal(encode_texts(TEXTS, student_tok, teacher_tok), CausalLMTask()).cross
    cached = cached_src.signal(cached_batch, CausalLMTask()).cross
    m = live.mask
    lp_live = torch.log_softmax(live.logits[m], -1)
    top_lp, top_ids = lp_live.topk(k, -1)
    got = cached.logits[m].gather(-1, top_ids)
    assert (got - top_lp).abs().max() < 0.1  # uint8 log-prob grid
    tail = cached.logits[m].exp().sum(-1)
    torch.testing.assert_close(tail, torch.ones_like(tail), atol=2e-2, rtol=0)  # completed distributions


def test_cache_without_offsets_is_refused_naming_the_fix(tmp_path, teacher, tokenizers):
    _, teacher_tok = tokenizers
    ids = torch.tensor(teacher_tok(TEXTS[:2], truncation=True, max_length=10, padding="max_length")["input_ids"])
    out = build_teacher_cache(teacher, ids, tmp_path / "plain", k=4, encoding="raw-fp32")
    with pytest.raises(CacheError, match="(?s)no token offsets.*build_cross_tokenizer_cache"):
        CrossTokenizerCacheDataset(out, TEXTS[:2])
    m = json.loads((out / "manifest.json").read_text())  # old caches: unchanged format, no new keys
    assert m["format_version"] == 1 and "token_offsets" not in m["dataset"]
    assert not open_teacher_cache(out).has_token_offsets


def test_offsets_are_checked_like_the_shards(tmp_path, teacher, tokenizers):
    student_tok, teacher_tok = tokenizers
    ds, _ = _cached_batch(tmp_path, teacher, tokenizers, TEXTS, k=4, encoding="compact-u8-zstd")
    out = ds.cache.cache_dir
    m = json.loads((out / "manifest.json").read_text())
    stats = m["stats"]
    assert m["format_version"] == 1 and 0 < stats["offsets_bytes_per_token"] < 8  # int32 pairs would be 8
    with pytest.raises(CacheError, match="other texts"):
        CrossTokenizerCacheDataset(out, [*TEXTS[1:], TEXTS[0]])
    with pytest.raises(CacheError, match="other settings"):  # a resume over other texts is refused
        build_cross_tokenizer_cache(teacher, teacher_tok, [t.upper() for t in TEXTS], out, k=4, batch_size=2,
                                    shard_size=3)
    path = out / "token_offsets.bin"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match="corrupted"):
        open_teacher_cache(out)
    path.unlink()
    with pytest.raises(CacheError, match="missing"):
        open_teacher_cache(out)


def test_distiller_steps_from_the_cache_lower_the_gold_loss(tmp_path, teacher, tokenizers):
    from kdforge.losses.uld import gold

    student_tok, teacher_tok = tokenizers
    ds, batch = _cached_batch(tmp_path, teacher, tokenizers, TEXTS, k=32, encoding="compact-u8-zstd", max_length=48)
    source = CachedCrossTokenizerTeacher(teacher_tok, student_tok, vocab_size=ds.vocab_size)
    student = tiny_llama(vocab_size=len(student_tok), seed=2)

    def loss_now() -> float:
        with torch.no_grad():
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            return gold(logits, source.signal(batch, CausalLMTask()).cross).item()

    loss0 = loss_now()
    cfg = TrainConfig(max_steps=30, batch_size=4, lr=1e-2, progress=False, log_every=10, seed=0,
                      output_dir=str(tmp_path / "run"))
    Distiller(student, source, task=CausalLMTask(), objective=[LossTerm("gold", 1.0)], config=cfg, train_data=ds,
              collate_fn=CachedCrossTokenizerCollator(student_tok, max_length=48),
              vocab_policy="cross_tokenizer").train()
    assert loss_now() < 0.7 * loss0
