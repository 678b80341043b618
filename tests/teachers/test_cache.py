"""Teacher cache: round trip, encodings, resume, integrity and fingerprint checks, replay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdforge.errors import CacheError, ConfigError, DataError, ShapeError
from kdforge.teachers import (
    ENCODINGS,
    OnlineTeacher,
    TeacherCacheDataset,
    build_teacher_cache,
    collate_teacher_cache,
    open_teacher_cache,
)
from kdforge.teachers.cache import batch_sparse_teacher
from kdforge.teachers.cache.codec import get_encoding

from .conftest import tiny_llama

K = 8


@pytest.fixture(scope="module")
def teacher():
    return OnlineTeacher(tiny_llama())


def _build(teacher, sequences, path, **kw):
    kw.setdefault("k", K)
    kw.setdefault("shard_size", 6)
    kw.setdefault("batch_size", 3)
    return build_teacher_cache(teacher, sequences, path, **kw)


def _all(path):
    ds = TeacherCacheDataset(path)
    return collate_teacher_cache([ds[i] for i in range(len(ds))])


def test_lossless_encoding_round_trips_exactly(teacher, sequences, tmp_path):
    batch = _all(_build(teacher, sequences, tmp_path / "c", encoding="raw-fp32"))
    ref = teacher.topk(sequences, k=K)
    assert torch.equal(batch["teacher_ids"], ref.ids)
    assert torch.equal(batch["teacher_logprobs"], ref.logprobs)
    assert torch.equal(batch["input_ids"], sequences)


@pytest.mark.parametrize("encoding", ["raw-fp16", "compact-u8", "compact-u8-zstd", "compact-u8-zlib", "raw-fp16-zstd"])
def test_lossy_encodings_round_trip_within_quantisation_tolerance(teacher, sequences, tmp_path, encoding):
    enc = get_encoding(encoding)
    batch = _all(_build(teacher, sequences, tmp_path / "c", encoding=encoding))
    ref = teacher.topk(sequences, k=K)
    assert torch.equal(batch["teacher_ids"], ref.ids)
    above_floor = ref.logprobs > enc.logprob_min
    err = (batch["teacher_logprobs"] - ref.logprobs)[above_floor].abs().max().item()
    # uint8: half a grid step from rounding + at most half a step from the tail rescaling
    tol = abs(enc.logprob_min) / 255 if enc.logprob_dtype == "uint8" else 2e-3 * 20
    assert err <= tol
    if enc.stores_tail:  # the tail mass is reproduced on its 16-bit grid
        got_tail = 1 - batch["teacher_logprobs"].double().exp().sum(-1)
        want_tail = (1 - ref.logprobs.double().exp().sum(-1)).clamp_min(0)
        assert (got_tail - want_tail).abs().max().item() <= 1 / 65535 + 1e-6


def test_bytes_per_token_of_each_encoding_follow_the_record_layout(teacher, sequences, tmp_path):
    sizes = {}
    for name in ENCODINGS.names():
        cache = open_teacher_cache(_build(teacher, sequences, tmp_path / name, encoding=name))
        sizes[name] = cache.bytes_per_token
    # uint16 ids (2 B) for the input and each of k ids; 4/2/1 B per log-prob; 2 B tail
    assert sizes["raw-fp32"] == 2 + K * (2 + 4)
    assert sizes["raw-fp16"] == 2 + K * (2 + 2)
    assert sizes["compact-u8"] == 2 + K * (2 + 1) + 2
    assert sizes["raw-fp16-zstd"] <= sizes["raw-fp16"] + 1  # incompressible random signal: ~no gain


@pytest.mark.parametrize("encoding", ["compact-u8-zstd", "compact-u8-zlib"])
def test_entropy_coding_shrinks_a_redundant_signal(teacher, tmp_path, encoding):
    repetitive = torch.full((12, 16), 7, dtype=torch.long)  # same top-k lists at most positions
    raw = open_teacher_cache(_build(teacher, repetitive, tmp_path / "raw", encoding="compact-u8"))
    packed = open_teacher_cache(_build(teacher, repetitive, tmp_path / "z", encoding=encoding))
    assert packed.bytes_per_token < 0.5 * raw.bytes_per_token
    assert torch.equal(packed.sparse(3).ids, raw.sparse(3).ids)


def test_interrupted_build_resumes_to_identical_bytes(teacher, sequences, tmp_path):
    full = _build(teacher, sequences, tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_after_two(index, entry):
        if index == 1:
            raise Stop

    with pytest.raises(Stop):
        _build(teacher, sequences, tmp_path / "part", on_shard=stop_after_two)
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    (tmp_path / "part" / ".shard-00002.kdc.junk.tmp").write_bytes(b"torn write")  # a crash leftover
    with pytest.raises(CacheError, match="unfinished"):
        TeacherCacheDataset(tmp_path / "part")

    written = []
    _build(teacher, sequences, tmp_path / "part", on_shard=lambda i, e: written.append(i))
    assert written == [2, 3]  # only the missing shards were computed
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "part").iterdir())
    for name in names:
        assert (full / name).read_bytes() == (tmp_path / "part" / name).read_bytes(), name


def test_rerunning_a_complete_build_does_nothing(teacher, sequences, tmp_path):
    path = _build(teacher, sequences, tmp_path / "c")
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    written = []
    _build(teacher, sequences, path, on_shard=lambda i, e: written.append(i))
    assert written == [] and before == {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


def test_build_into_folder_of_another_cache_needs_overwrite(teacher, sequences, tmp_path):
    path = _build(teacher, sequences, tmp_path / "c")
    with pytest.raises(CacheError, match="differs in: k"):
        _build(teacher, sequences, path, k=4)
    _build(teacher, sequences, path, k=4, overwrite=True)
    assert open_teacher_cache(path).k == 4


@pytest.mark.parametrize("encoding", ["compact-u8", "compact-u8-zstd"])
def test_corrupted_shard_raises_cache_error_naming_the_shard(teacher, sequences, tmp_path, encoding):
    path = _build(teacher, sequences, tmp_path / "c", encoding=encoding)
    shard = path / "shard-00001.kdc"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00001\.kdc is corrupted.*\n.*rebuild"):
        TeacherCacheDataset(path)


def test_truncated_shard_is_caught_even_without_checksums(teacher, sequences, tmp_path):
    path = _build(teacher, sequences, tmp_path / "c")
    shard = path / "shard-00002.kdc"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"shard-00002\.kdc is truncated"):
        TeacherCacheDataset(path, verify=False)


def test_rebuild_repairs_only_the_damaged_shard(teacher, sequences, tmp_path):
    path = _build(teacher, sequences, tmp_path / "c")
    good = (path / "shard-00002.kdc").read_bytes()
    (path / "shard-00002.kdc").write_bytes(good[:-5])
    rewritten = []
    _build(teacher, sequences, path, on_shard=lambda i, e: rewritten.append(i))
    assert rewritten == [2] and (path / "shard-00002.kdc").read_bytes() == good  # intact shard 3 is kept
    TeacherCacheDataset(path)


def test_wrong_teacher_tokenizer_or_data_raise_cache_error(teacher, sequences, tokenizer, tmp_path):
    path = _build(teacher, sequences, tmp_path / "c", tokenizer=tokenizer)
    TeacherCacheDataset(path, sequences, teacher=teacher, tokenizer=tokenizer)  # all match
    with pytest.raises(CacheError, match="another teacher"):
        TeacherCacheDataset(path, teacher=OnlineTeacher(tiny_llama(seed=3)))
    from .conftest import train_tiny_tokenizer

    with pytest.raises(CacheError, match="another tokenizer"):
        TeacherCacheDataset(path, tokenizer=train_tiny_tokenizer(extra=" Pemberley"))
    other = sequences.clone()
    other[3, 5] = (other[3, 5] + 1) % 256
    with pytest.raises(CacheError, match="other token sequences"):
        TeacherCacheDataset(path, other)


def test_manifest_records_identity_and_statistics(teacher, sequences, tokenizer, tmp_path):
    m = open_teacher_cache(_build(teacher, sequences, tmp_path / "c", tokenizer=tokenizer)).manifest
    assert m["complete"] and m["k"] == K and m["vocab_size"] == 256 and m["id_dtype"] == "uint16"
    assert m["teacher"]["weights_sha256"] == teacher.weights_hash()
    assert m["tokenizer"]["size"] == len(tokenizer)
    assert m["dataset"]["num_tokens"] == 20 * 16 and len(m["shards"]) == 4
    assert [s["rows"] for s in m["shards"]] == [[0, 6], [6, 12], [12, 18], [18, 20]]
    want_mass = teacher.topk(sequences, k=K).logprobs.double().exp().sum(-1).mean().item()
    assert m["stats"]["topk_mass_mean"] == pytest.approx(want_mass, rel=1e-6)


def test_dataset_items_are_aligned_with_logit_positions(teacher, sequences, tmp_path):
    ds = TeacherCacheDataset(_build(teacher, sequences, tmp_path / "c", encoding="raw-fp32"))
    item = ds[7]
    assert set(item) == {"input_ids", "attention_mask", "labels", "teacher_ids", "teacher_logprobs"}
    assert item["teacher_ids"].shape == (16, K) and item["teacher_ids"].dtype == torch.int64
    assert torch.equal(item["labels"], sequences[7]) and item["attention_mask"].all()
    # position t = teacher distribution after reading tokens <= t: a prefix-only forward agrees
    t = 9
    prefix_logits = teacher.logits(sequences[7:8, : t + 1])[0, -1].float().log_softmax(-1)
    assert item["teacher_ids"][t, 0].item() == prefix_logits.argmax().item()
    torch.testing.assert_close(item["teacher_logprobs"][t], prefix_logits[item["teacher_ids"][t]], atol=1e-4, rtol=0)


def test_dataloader_batches_become_a_sparse_teacher(teacher, sequences, tmp_path):
    ds = TeacherCacheDataset(_build(teacher, sequences, tmp_path / "c"))
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_teacher_cache)))
    sparse = batch_sparse_teacher(batch, ds.vocab_size)
    assert sparse.ids.shape == (4, 16, K) and sparse.vocab_size == 256
    assert batch["input_ids"].shape == (4, 16)


def test_dataset_works_in_dataloader_worker_processes(teacher, sequences, tmp_path):
    ds = TeacherCacheDataset(_build(teacher, sequences, tmp_path / "c"))
    loader = DataLoader(ds, batch_size=5, num_workers=1, collate_fn=collate_teacher_cache)
    got = torch.cat([b["input_ids"] for b in loader])
    assert torch.equal(got, sequences)


def test_hf_dataset_and_lists_are_accepted_as_sequences(teacher, sequences, tmp_path):
    from datasets import Dataset

    hf = Dataset.from_dict({"input_ids": sequences.tolist()})
    a = open_teacher_cache(_build(teacher, hf, tmp_path / "hf")).manifest["dataset"]["fingerprint"]
    b = open_teacher_cache(_build(teacher, sequences.tolist(), tmp_path / "list")).manifest["dataset"]["fingerprint"]
    assert a == b


def test_ragged_sequences_and_unknown_encoding_are_refused(teacher, tmp_path):
    with pytest.raises(DataError, match="fixed-length"):
        _build(teacher, [[1, 2, 3], [4, 5]], tmp_path / "c")
    with pytest.raises(ConfigError, match="compact-u8"):
        _build(teacher, torch.zeros(2, 4, dtype=torch.long), tmp_path / "d", encoding="gzip-9")


def test_missing_cache_raises_cache_error(tmp_path):
    with pytest.raises(CacheError, match="cache-teacher"):
        TeacherCacheDataset(tmp_path / "none")


def test_large_vocab_uses_uint32_ids(tmp_path):
    teacher = OnlineTeacher(tiny_llama(vocab_size=70_000, hidden=16))
    seqs = torch.randint(0, 70_000, (2, 4))
    cache = open_teacher_cache(_build(teacher, seqs, tmp_path / "c", k=4, encoding="compact-u8"))
    assert cache.manifest["id_dtype"] == "uint32"
    assert torch.equal(cache.sparse(1).ids, teacher.topk(seqs[1:2], k=4).ids[0])


def test_read_texts_handles_txt_folder_and_jsonl(tmp_path):
    from kdforge.teachers.cache import read_texts

    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text("Second\nbook.")
    (tmp_path / "books" / "a.txt").write_text("First line\nwrapped.\n\nNew paragraph.")
    assert read_texts(tmp_path / "books") == ["First line wrapped.\n\nNew paragraph.", "Second book."]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_texts(tmp_path / "c.jsonl") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"body": "one"}\n')
    with pytest.raises(DataError, match="text_field"):
        read_texts(tmp_path / "bad.jsonl")


def test_write_teacher_cache_from_precomputed_topk_source(teacher, sequences, tmp_path):
    from kdforge.teachers.cache import write_teacher_cache

    ref = teacher.topk(sequences, k=K)
    seen = []

    def served(input_ids, first_row):
        seen.append(first_row)
        return ref[first_row : first_row + input_ids.shape[0]]

    info = {"id": "served-teacher", "weights_sha256": "rev-abc"}
    path = write_teacher_cache(served, sequences, tmp_path / "c", vocab_size=256, k=K, teacher_info=info,
                               encoding="raw-fp32", shard_size=6, batch_size=4)
    assert seen == [0, 4, 6, 10, 12, 16, 18]  # batches restart at every shard boundary
    assert torch.equal(_all(path)["teacher_logprobs"], ref.logprobs)
    bad = lambda input_ids, first_row: ref[first_row : first_row + input_ids.shape[0], :, :2]  # noqa: E731
    with pytest.raises(ShapeError, match="expected"):
        write_teacher_cache(bad, sequences, tmp_path / "d", vocab_size=256, k=K, teacher_info=info)


@pytest.mark.parametrize("shuffle", [False, True])
def test_record_compressor_transforms_are_exact_inverses(shuffle):
    from dataclasses import replace

    from kdforge.teachers.cache.codec import RecordCompressor, encode_records

    enc = replace(get_encoding("compact-u8-zlib"), shuffle=shuffle)
    g = np.random.default_rng(0)
    lp = np.sort(np.log(g.dirichlet(np.ones(50), size=(3, 7)))[..., :6], axis=-1)  # not monotone-safe
    ids = g.integers(0, 1000, size=(3, 7, 6))
    rec = encode_records(enc, g.integers(0, 1000, size=(3, 7)), ids, lp, 1000)
    comp = RecordCompressor(enc, rec.dtype)
    for r in rec:
        assert comp.decompress(comp.compress(r.tobytes())) == r.tobytes()


@pytest.mark.parametrize("encoding", ["compact-u8-zstd", "compact-u8-zlib"])
def test_corrupted_frame_read_without_checksums_raises_cache_error(teacher, sequences, tmp_path, encoding):
    path = _build(teacher, sequences, tmp_path / "c", encoding=encoding)
    shard = path / "shard-00000.kdc"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x55  # inside the first sequence's frame
    shard.write_bytes(bytes(data))
    ds = TeacherCacheDataset(path, verify=False)
    with pytest.raises(CacheError, match=r"shard-00000\.kdc, sequence 0"):
        ds[0]


def test_concurrent_build_of_the_same_folder_is_refused_and_stale_lock_taken_over(teacher, sequences, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "c"
    out.mkdir()
    lock = out / ".build.lock"
    lock.write_text(f"{socket.gethostname()}:{os.getpid()}")  # a live builder (this process)
    with pytest.raises(CacheError, match="another build"):
        _build(teacher, sequences, out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()}:{dead.pid}")  # its builder died
    _build(teacher, sequences, out)
    assert not lock.exists() and TeacherCacheDataset(out).cache.manifest["complete"]


def test_build_runs_one_forward_per_batch_and_no_probe(teacher, sequences, tmp_path):
    """The vocabulary width comes from the LM head's shape: the build's forwards are its batches'."""
    model = teacher.model if hasattr(teacher, "model") else teacher
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = _build(teacher, sequences[:6], tmp_path / "c", k=4, batch_size=4)
    finally:
        handle.remove()
    assert len(calls) == 2  # 6 rows in batches of 4
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 256
