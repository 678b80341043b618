"""Sampled-tail teacher cache: unbiased estimate, encoding round trip, determinism, resume, old caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from kdforge.errors import CacheError, ConfigError
from kdforge.losses.signal import sample_tail
from kdforge.teachers import OnlineTeacher, TeacherCacheDataset, build_teacher_cache
from kdforge.teachers.cache import (
    ENCODINGS,
    batch_sparse_teacher,
    collate_teacher_cache,
    open_teacher_cache,
    write_teacher_cache,
)

from .conftest import run_ranks, tiny_llama, train_tiny_tokenizer

INFO = {"id": "t", "weights_sha256": "w"}


class Stop(Exception):
    """Raised by an ``on_shard`` hook to simulate a build killed after a committed shard."""


def _logits(n: int = 6, t: int = 5, v: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, v, generator=g, dtype=torch.float64) * 2.0


@pytest.mark.parametrize("k", [0, 3])
def test_sampled_estimate_is_unbiased_mean_over_seeds_converges_to_p(k):
    logits = _logits(1, 1, 30)
    p = torch.softmax(logits[0, 0], -1)
    n, m = 3000, 4
    draws = torch.zeros(n, 30, dtype=torch.float64)
    for s in range(n):
        sig, _ = sample_tail(logits, k, m, [s])
        draws[s].scatter_add_(0, sig.ids[0, 0], sig.logprobs[0, 0].double().exp())
    mean = draws.mean(0)
    # exact variance of one estimate: tail id j has p_hat_j = r * c_j / m, c_j ~ Binomial(m, p_j / r);
    # the exact top-k entries have none. Every id must lie within 5 standard errors of p.
    top = p.topk(k).indices if k else torch.zeros(0, dtype=torch.long)
    r = 1.0 - float(p[top].sum())
    pi = p / r
    se = (r * (pi * (1 - pi) / m).sqrt() / n**0.5).index_fill(0, top, 0.0)
    assert bool(((mean - p).abs() <= 5 * se + 1e-6).all()), (mean - p).abs().max()  # 1e-6: float32 log-probs
    assert torch.allclose(mean.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_sampled_weights_sum_to_one_counts_to_m_and_draws_avoid_the_top_k():
    k, m = 4, 8
    sig, counts = sample_tail(_logits(), k, m, [(1, r) for r in range(6)])
    assert sig.num_exact == k and sig.k == k + m and sig.sampled
    assert torch.allclose(sig.logprobs.double().exp().sum(-1), torch.ones(6, 5, dtype=torch.float64), atol=1e-6)
    assert bool((counts.sum(-1) == m).all())
    for ids, c in zip(sig.ids.reshape(-1, k + m), counts.reshape(-1, m)):
        drawn = ids[k:][c > 0].tolist()
        assert len(set(drawn)) == len(drawn)  # duplicates merged into counts
        assert not set(drawn) & set(ids[:k].tolist())  # drawn from the tail only
    # the exact part is the top-k of the full distribution
    ref = torch.log_softmax(_logits(), -1).topk(k, dim=-1)
    assert torch.equal(sig.ids[..., :k], ref.indices)


def test_sampling_depends_only_on_the_row_seed_not_the_batch():
    logits = _logits()
    full, _ = sample_tail(logits, 3, 8, [(0, r) for r in range(6)])
    part, _ = sample_tail(logits[2:4], 3, 8, [(0, 2), (0, 3)])
    assert torch.equal(full.ids[2:4], part.ids) and torch.equal(full.logprobs[2:4], part.logprobs)
    other, _ = sample_tail(logits, 3, 8, [(1, r) for r in range(6)])
    assert not torch.equal(full.ids, other.ids)


def test_bad_sampling_arguments_are_refused():
    with pytest.raises(ConfigError, match="tail_samples"):
        sample_tail(_logits(), 3, 0, [0] * 6)
    with pytest.raises(ConfigError, match="k="):
        sample_tail(_logits(v=5), 5, 4, [0] * 6)


def _topk_fn(logits, k, m, seed=0):
    def fn(input_ids, first_row):
        rows = range(first_row, first_row + input_ids.shape[0])
        return sample_tail(logits[first_row: first_row + input_ids.shape[0]], k, m, [(seed, r) for r in rows])[0]
    return fn


@pytest.mark.parametrize("encoding", sorted(e.name for e in ENCODINGS.entries()))
@pytest.mark.parametrize("k", [0, 3])
def test_round_trip_through_every_encoding_keeps_ids_counts_and_unit_sum(encoding, k, tmp_path):
    logits, m = _logits(), 6
    seqs = torch.randint(0, 40, (6, 5), generator=torch.Generator().manual_seed(2))
    write_teacher_cache(_topk_fn(logits, k, m), seqs, tmp_path, vocab_size=40, k=k, tail_samples=m,
                        teacher_info=INFO, encoding=encoding, batch_size=4, shard_size=4)
    cache = open_teacher_cache(tmp_path)
    assert cache.manifest["format_version"] == 2 and cache.tail_samples == m and cache.entries == k + m
    ref, _ = sample_tail(logits, k, m, [(0, r) for r in range(6)])
    for row in range(6):
        got = cache.sparse(row)
        assert got.num_exact == k and torch.equal(got.ids[:, :k], ref.ids[row, :, :k])
        w = got.logprobs.double().exp()
        assert torch.allclose(w.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-5)
        # the same estimate as the sampler's (entry order within the drawn slots may differ):
        # every id's weight, up to the encoding's quantisation (uint8 log-prob codes: 4%)
        dense_got = torch.zeros(5, 40, dtype=torch.float64).scatter_add(1, got.ids, w)
        dense_ref = torch.zeros(5, 40, dtype=torch.float64).scatter_add(1, ref.ids[row], ref.logprobs[row].double().exp())
        assert torch.allclose(dense_got, dense_ref, atol=0.05 if "u8" in encoding else 2e-3)
        # and the draw counts exactly: weight / tail * m is an integer equal to the sampler's count
        tail = w[:, k:].sum(-1, keepdim=True)
        c_got = torch.zeros(5, 40, dtype=torch.float64).scatter_add(1, got.ids[:, k:], w[:, k:] * m / tail)
        r_ref = ref.logprobs[row, :, k:].double().exp()
        c_ref = torch.zeros(5, 40, dtype=torch.float64).scatter_add(
            1, ref.ids[row, :, k:], r_ref * m / r_ref.sum(-1, keepdim=True))
        assert torch.allclose(c_got, c_ref, atol=1e-4) and torch.allclose(c_got, c_got.round(), atol=1e-4)


def test_dataset_items_and_batches_carry_num_exact(tmp_path):
    seqs = torch.randint(0, 40, (6, 5), generator=torch.Generator().manual_seed(2))
    write_teacher_cache(_topk_fn(_logits(), 3, 5), seqs, tmp_path, vocab_size=40, k=3, tail_samples=5,
                        teacher_info=INFO, batch_size=4, shard_size=4)
    ds = TeacherCacheDataset(tmp_path, sequences=seqs)
    batch = collate_teacher_cache([ds[0], ds[1]])
    assert batch["teacher_ids"].shape == (2, 5, 8) and ds.num_exact == 3 and ds.k == 3
    sig = batch_sparse_teacher(batch, ds.vocab_size)
    assert sig.sampled and sig.num_exact == 3 and sig.flatten().num_exact == 3 and sig[0].num_exact == 3


def test_weights_that_are_not_m_draws_are_refused(tmp_path):
    seqs = torch.zeros(2, 5, dtype=torch.long)

    def bad(input_ids, first_row):
        sig, _ = sample_tail(_logits(2), 3, 4, [0, 1])
        lp = sig.logprobs.clone()
        lp[..., 3] += 0.3  # no longer a multiple of tail / m
        return type(sig)(sig.ids, lp, sig.vocab_size, 3)

    with pytest.raises(CacheError, match="draws"):
        write_teacher_cache(bad, seqs, tmp_path, vocab_size=40, k=3, tail_samples=4, teacher_info=INFO)


@pytest.fixture(scope="module")
def teacher():
    return OnlineTeacher(tiny_llama())


def _build(teacher, sequences, path, **kw):
    return build_teacher_cache(teacher, sequences, path, k=4, tail_samples=8, sample_seed=3, shard_size=3,
                               batch_size=2, **kw)


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_data_parallel_build_with_samples_writes_the_same_bytes_as_one_process(teacher, sequences, tmp_path):
    reference = _files(_build(teacher, sequences, tmp_path / "ref"))
    errors = run_ranks(2, lambda g: _build(teacher, sequences, tmp_path / "par", data_parallel=g))
    assert all(e is None for e in errors.values()), errors
    assert _files(tmp_path / "par") == reference
    # and the batch size does not change the draws either
    other = build_teacher_cache(teacher, sequences, tmp_path / "b5", k=4, tail_samples=8, sample_seed=3,
                                shard_size=3, batch_size=3)
    assert _files(other) == reference


def test_killed_build_with_samples_resumes_to_the_same_bytes(teacher, sequences, tmp_path):
    reference = _files(_build(teacher, sequences, tmp_path / "ref"))
    out = tmp_path / "cut"

    def die_at_third(index: int, entry: dict) -> None:
        if index == 2:
            raise Stop(index)

    with pytest.raises(Stop):
        _build(teacher, sequences, out, on_shard=die_at_third)
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 3
    redone: list[int] = []
    _build(teacher, sequences, out, on_shard=lambda i, e: redone.append(i))
    assert redone == [3, 4, 5, 6] and _files(out) == reference


def test_rebuild_with_other_tail_samples_or_seed_is_refused(teacher, sequences, tmp_path):
    _build(teacher, sequences, tmp_path)
    with pytest.raises(CacheError, match="tail_samples"):
        build_teacher_cache(teacher, sequences, tmp_path, k=4, tail_samples=4, sample_seed=3, shard_size=3)
    with pytest.raises(CacheError, match="sample_seed"):
        build_teacher_cache(teacher, sequences, tmp_path, k=4, tail_samples=8, sample_seed=4, shard_size=3)


def test_cache_written_before_tail_samples_existed_still_loads_and_resumes(teacher, sequences, tmp_path):
    out = build_teacher_cache(teacher, sequences, tmp_path, k=4, shard_size=7)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1  # no samples: still the version older kdforge reads
    for key in ("tail_samples", "sample_seed"):  # as written by kdforge before this option
        manifest.pop(key)
    (out / "manifest.json").write_text(json.dumps(manifest))
    ds = TeacherCacheDataset(out)
    item = ds[0]
    assert item["teacher_ids"].shape == (16, 4) and "teacher_num_exact" not in item and ds.num_exact is None
    assert ds.cache.sparse(0).num_exact is None
    # a rerun of the same (sample-free) build accepts the old manifest as complete and writes nothing
    written: list[int] = []
    build_teacher_cache(teacher, sequences, out, k=4, shard_size=7, on_shard=lambda i, e: written.append(i))
    assert written == []


def test_config_and_cli_build_a_sampled_cache(tmp_path, capsys):
    from kdforge.cli.main import main
    from kdforge.config import validate
    from kdforge.teachers.cache.config import CacheTeacherConfig

    with pytest.raises(ConfigError, match="tail_samples"):
        validate(CacheTeacherConfig, {"teacher": {"name_or_path": "x"}, "corpus": {"path": "y"}, "output_dir": "z",
                                      "k": 0})
    teacher_dir = tmp_path / "teacher"
    tiny_llama().save_pretrained(teacher_dir)
    train_tiny_tokenizer().save_pretrained(teacher_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["It is a truth universally acknowledged, that a single man."] * 30))
    config = {"teacher": {"name_or_path": str(teacher_dir)}, "corpus": {"path": str(corpus), "seq_len": 16,
              "max_sequences": 6}, "output_dir": str(tmp_path / "cache"), "k": 4, "batch_size": 4, "shard_size": 3}
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["cache-teacher", str(path), "--tail-samples", "8"]) == 0
    assert "+ 8 tail draws" in capsys.readouterr().out
    ds = TeacherCacheDataset(tmp_path / "cache")
    assert ds.cache.tail_samples == 8 and ds[0]["teacher_ids"].shape == (16, 12)
    assert main(["cache-teacher", str(tmp_path / "cache"), "--inspect"]) == 0
    assert "8 tail draws per position" in capsys.readouterr().out
    w = np.exp(ds.cache.read(0)[2].astype(np.float64)).sum(-1)
    assert np.allclose(w, 1.0, atol=1e-5)
