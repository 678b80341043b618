"""Data-parallel cache builds, in one process: ranks are threads sharing a ``threading.Barrier``.

This checks the protocol (shard assignment, per-rank progress records, the single manifest
merge, resume of a killed build with another number of ranks) in milliseconds; the same code
under a real 2-process ``accelerate launch`` is tested in ``tests/distributed/test_cache_parallel.py``.
"""

from __future__ import annotations

import json
import threading

import pytest

from kdforge.errors import CacheError
from kdforge.teachers import OnlineTeacher, TeacherCacheDataset, build_teacher_cache
from kdforge.teachers.cache.parallel import BuildGroup, assign_shards

from .conftest import run_ranks, tiny_llama

SHARD = 3  # 20 sequences -> 7 shards, the last one holds 2 rows


class Stop(Exception):
    """Raised by an ``on_shard`` hook to simulate a rank dying after committing a shard."""


@pytest.fixture(scope="module")
def teacher():
    return OnlineTeacher(tiny_llama())


def _build(teacher, sequences, path, **kw):
    return build_teacher_cache(teacher, sequences, path, k=6, shard_size=SHARD, batch_size=2, **kw)


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def reference(teacher, sequences, tmp_path):
    return _files(_build(teacher, sequences, tmp_path / "ref"))


def test_shards_are_split_round_robin_over_the_unfinished_ones():
    assert assign_shards(range(7), 0, 2) == [0, 2, 4, 6] and assign_shards(range(7), 1, 2) == [1, 3, 5]
    assert assign_shards([1, 4, 5], 0, 2) == [1, 5] and assign_shards([1, 4, 5], 2, 3) == [5]
    assert assign_shards([3], 1, 2) == []  # more ranks than work: the rank only joins the barriers


def test_invalid_group_is_refused():
    with pytest.raises(CacheError, match="rank 2 of 2"):
        BuildGroup(2, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_parallel_build_writes_the_same_files_as_one_process(teacher, sequences, tmp_path, reference, world):
    out = tmp_path / "par"
    written: dict[int, list[int]] = {}

    def build(group: BuildGroup) -> None:
        _build(teacher, sequences, out, data_parallel=group,
               on_shard=lambda i, e: written.setdefault(group.rank, []).append(i))

    assert run_ranks(world, build) == {r: None for r in range(world)}
    assert _files(out) == reference  # same shard bytes, same manifest bytes, no progress records left
    assert written == {r: list(range(r, 7, world)) for r in range(world)}
    TeacherCacheDataset(out, sequences)


@pytest.mark.parametrize("resume_world", [1, 2, 3])
def test_killed_parallel_build_resumes_with_any_world_size_without_recomputing(
        teacher, sequences, tmp_path, reference, resume_world):
    out = tmp_path / "par"

    def die_after_first(group: BuildGroup) -> None:
        def hook(index: int, entry: dict) -> None:
            raise Stop(index)

        _build(teacher, sequences, out, data_parallel=group, on_shard=hook)

    errors = run_ranks(2, die_after_first)
    assert all(isinstance(e, Stop) for e in errors.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards"] == []  # only rank 0's plan was published
    records = sorted(p.name for p in out.glob(".progress-rank*.json"))
    assert records == [".progress-rank00000.json", ".progress-rank00001.json"]
    with pytest.raises(CacheError, match="unfinished"):
        TeacherCacheDataset(out)

    recomputed: list[int] = []
    lock = threading.Lock()

    def record(i: int, e: dict) -> None:
        with lock:
            recomputed.append(i)

    errors = run_ranks(resume_world, lambda g: _build(teacher, sequences, out, data_parallel=g, on_shard=record))
    assert all(e is None for e in errors.values()), errors
    assert sorted(recomputed) == [2, 3, 4, 5, 6]  # shards 0 and 1 (one per killed rank) were kept
    assert _files(out) == reference


def test_shard_written_but_not_recorded_is_rebuilt_and_stale_records_ignored(teacher, sequences, tmp_path, reference):
    out = tmp_path / "par"
    errors = run_ranks(2, lambda g: _build(teacher, sequences, out, data_parallel=g,
                                            on_shard=lambda i, e: (_ for _ in ()).throw(Stop(i))))
    assert all(isinstance(e, Stop) for e in errors.values())
    # rank 1 died after writing shard 3 but before its progress record was rewritten
    (out / "shard-00003.kdc").write_bytes(b"written by a rank killed before recording it")
    # and a record that points at a damaged file
    record = json.loads((out / ".progress-rank00001.json").read_text())
    (out / record["shards"][0]["file"]).write_bytes(b"torn")
    rebuilt: list[int] = []
    _build(teacher, sequences, out, on_shard=lambda i, e: rebuilt.append(i))  # resumed by one process
    assert rebuilt == [1, 2, 3, 4, 5, 6]
    assert _files(out) == reference


def test_rank_with_other_settings_than_rank_0_is_refused(teacher, sequences, tmp_path):
    out = tmp_path / "par"

    def build(group: BuildGroup) -> None:
        seqs = sequences if group.rank == 0 else sequences.flip(0)
        _build(teacher, seqs, out, data_parallel=group)

    errors = run_ranks(2, build)
    assert isinstance(errors[1], CacheError) and "differs in: dataset" in str(errors[1])


def test_parallel_rerun_of_a_complete_cache_changes_nothing(teacher, sequences, tmp_path):
    out = _build(teacher, sequences, tmp_path / "c")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    written: list[int] = []
    errors = run_ranks(2, lambda g: _build(teacher, sequences, out, data_parallel=g,
                                            on_shard=lambda i, e: written.append(i)))
    assert all(e is None for e in errors.values()) and written == []
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
