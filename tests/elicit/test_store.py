"""Journal recovery, atomic shard sealing and locking of the generation store."""

from __future__ import annotations

import json

import pytest

from kdforge.elicit.store import JOURNAL, ShardedStore, read_records, recover_journal
from kdforge.errors import CacheError


def _recs(n, start=0):
    return [{"id": f"r{i}", "text": f"t{i}"} for i in range(start, start + n)]


def test_torn_last_journal_line_is_dropped_and_complete_lines_are_kept(tmp_path):
    j = tmp_path / JOURNAL
    j.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "c", "te')
    recs, bad = recover_journal(j)
    assert [r["id"] for r in recs] == ["a", "b"] and bad == 1


def test_reopening_after_a_crash_recovers_the_journal_and_seals_it(tmp_path):
    j = tmp_path / JOURNAL
    j.write_text("".join(json.dumps(r) + "\n" for r in _recs(3)) + '{"id": "r3", "text": "tor')
    with ShardedStore(tmp_path, shard_size=10) as st:
        assert st.done_ids() == {"r0", "r1", "r2"} and st.recovered == 3 and st.dropped_lines == 1
        st.append(_recs(2, start=3))
    assert not j.exists()
    assert [r["id"] for r in read_records(tmp_path)] == ["r0", "r1", "r2", "r3", "r4"]


def test_shards_are_sealed_every_shard_size_records_and_manifest_counts_them(tmp_path):
    with ShardedStore(tmp_path, shard_size=3) as st:
        st.append(_recs(7))
        assert len(list((tmp_path / "shards").glob("shard-*.jsonl"))) == 2  # 3 + 3 sealed, 1 journaled
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["records"] for s in man["shards"]] == [3, 3, 1] and man["records"] == 7


def test_records_in_both_a_shard_and_the_journal_are_not_duplicated(tmp_path):
    """A crash between sealing a shard and emptying the journal leaves both: ids dedupe."""
    with ShardedStore(tmp_path, shard_size=100) as st:
        st.append(_recs(3))
    (tmp_path / JOURNAL).write_text("".join(json.dumps(r) + "\n" for r in _recs(4)))
    assert len(read_records(tmp_path)) == 4
    with ShardedStore(tmp_path, shard_size=100) as st:
        assert st.recovered == 1
    assert sorted(r["id"] for r in read_records(tmp_path)) == ["r0", "r1", "r2", "r3"]


def test_appending_an_id_twice_keeps_the_first_record(tmp_path):
    with ShardedStore(tmp_path) as st:
        assert st.append([{"id": "a", "text": "first"}]) == 1
        assert st.append([{"id": "a", "text": "second"}]) == 0
    assert read_records(tmp_path) == [{"id": "a", "text": "first"}]


def test_a_second_writer_on_the_same_folder_is_refused(tmp_path):
    with ShardedStore(tmp_path), pytest.raises(CacheError, match="another kdforge job"):
        ShardedStore(tmp_path).open()


def test_parquet_shards_round_trip_nested_fields(tmp_path):
    recs = [{"id": "a", "prompt": [{"role": "user", "content": "hi"}], "meta": {"k": 1}, "n": 2}]
    with ShardedStore(tmp_path, fmt="parquet") as st:
        st.append(recs)
    assert list((tmp_path / "shards").glob("*.parquet"))
    assert read_records(tmp_path) == recs


def test_a_journal_cut_at_any_byte_recovers_exactly_the_complete_lines(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    recs = [{"id": f"r{i}", "text": "é" * (i % 5) + f"text {i}"} for i in range(12)]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]

    @settings(max_examples=150, deadline=None)
    @given(st.integers(min_value=0, max_value=len(data)))
    def check(cut):
        j = tmp_path / JOURNAL
        j.write_bytes(data[:cut])
        got, bad = recover_journal(j)
        complete = sum(e <= cut for e in ends)
        assert got == recs[:complete]
        assert bad == (0 if cut in ends or cut == 0 else 1)

    check()
