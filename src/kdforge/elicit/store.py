"""Crash-safe, resumable storage of generated records: an append-only journal sealed into shards.

Layout of an output folder::

    OUT/
      shards/shard-00000.jsonl   # sealed shards: complete, written atomically, never modified
      shards/shard-00001.jsonl   #   (or .parquet with format="parquet")
      journal.partial.jsonl      # append-only journal of records finished since the last seal
      manifest.json              # shard list, record counts, sha256 (informational, atomic)
      .lock                      # held while a job writes here (one writer per folder)

Why this design: a generation job can die at any moment (OOM, preemption, Ctrl-C, a lost
SSH session). Every finished record is appended to the journal as one JSON line and flushed
(and fsync'ed per batch), so a crash loses at most the requests in flight. On the next open the
journal is *recovered line by line*: complete lines are kept, a torn last line (the write the
crash interrupted) is dropped. Sealing writes a shard through :func:`kdforge.io.atomic_write`
(temp file + rename) and only then empties the journal; a crash between the two leaves records
in both places, which recovery de-duplicates by id. Readers only ever read sealed shards plus a
recovered journal, so a half-written file is never taken for a complete one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from kdforge.errors import CacheError, ConfigError, DataError
from kdforge.io import atomic_write, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

JOURNAL = "journal.partial.jsonl"
SHARD_DIR = "shards"
MANIFEST = "manifest.json"


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)


def recover_journal(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Read a journal line by line; return (complete records, number of bad lines dropped).

    A line counts only if it ends with a newline and parses as a JSON object with an ``id``.
    The last line of a crashed job may be torn (no newline, truncated JSON): it is dropped.
    """
    records: list[dict[str, Any]] = []
    bad = 0
    if not path.exists():
        return records, bad
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    # the piece after the last newline is either empty or a torn write
    if lines and lines[-1].strip():
        bad += 1
        log.warning("journal %s: dropping a torn last line (%d bytes)", path, len(lines[-1]))
    for n, raw in enumerate(lines[:-1], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad += 1
            log.warning("journal %s: dropping unreadable line %d", path, n)
            continue
        if not isinstance(rec, dict) or "id" not in rec:
            bad += 1
            log.warning("journal %s: dropping line %d without an 'id'", path, n)
            continue
        records.append(rec)
    return records, bad


class ShardedStore:
    """Append-only, resumable record store (see module docstring for the layout).

    Args:
        root: output folder (created if needed).
        shard_size: records per sealed shard.
        fmt: ``"jsonl"`` (default) or ``"parquet"`` for sealed shards (needs ``pyarrow``).
        fsync: fsync the journal after every :meth:`append` call (a batch of records).

    Use as a context manager: entering takes the folder's lock and recovers the journal,
    leaving seals whatever is left in the journal and releases the lock.
    """

    def __init__(self, root: str | os.PathLike, *, shard_size: int = 1000,
                 fmt: Literal["jsonl", "parquet"] = "jsonl", fsync: bool = True) -> None:
        if shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {shard_size}", "use e.g. 1000")
        if fmt not in ("jsonl", "parquet"):
            raise ConfigError(f"unknown output format {fmt!r}", "use 'jsonl' or 'parquet'")
        self.root = Path(root)
        self.shard_size = shard_size
        self.fmt = fmt
        self.fsync = fsync
        self._journal_fh: Any = None
        self._journal_records: list[dict[str, Any]] = []
        self._done: set[str] = set()
        self._fingerprints: dict[str, str] = {}
        self._lock_fh: Any = None
        self.recovered = 0
        self.dropped_lines = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> ShardedStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def journal_path(self) -> Path:
        return self.root / JOURNAL

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARD_DIR

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_dir.mkdir(exist_ok=True)
        self._acquire_lock()
        for rec in self._iter_shards():
            self._remember(rec)
        records, self.dropped_lines = recover_journal(self.journal_path)
        fresh = []
        for rec in records:
            if rec["id"] not in self._done:
                self._remember(rec)
                fresh.append(rec)
        self.recovered = len(fresh)
        if records or self.dropped_lines:
            log.info("recovered %d finished record(s) from %s (%d duplicate, %d torn/bad line(s))",
                     len(fresh), self.journal_path, len(records) - len(fresh), self.dropped_lines)
        # rewrite the journal clean (no torn tail, no duplicates) before appending to it
        self._journal_records = []
        self._rewrite_journal(fresh)
        self._journal_records = fresh
        self._journal_fh = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115
        while len(self._journal_records) >= self.shard_size:
            self._seal(self.shard_size)

    def close(self) -> None:
        if self._journal_fh is not None:
            self.seal()
            self._journal_fh.close()
            self._journal_fh = None
            with contextlib.suppress(FileNotFoundError):
                if self.journal_path.stat().st_size == 0:
                    self.journal_path.unlink()
        self._release_lock()

    # ---- writing ---------------------------------------------------------------------------
    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append finished records to the journal (skipping ids already stored); returns how
        many were new. Seals a shard whenever ``shard_size`` records have accumulated."""
        if self._journal_fh is None:
            raise CacheError("the store is not open", "use `with ShardedStore(path) as store:`")
        new = 0
        for rec in records:
            rid = rec.get("id")
            if rid is None:
                raise DataError("a record has no 'id'", "every generated record needs its request id")
            if rid in self._done:
                continue
            self._journal_fh.write(_json_line(rec) + "\n")
            self._journal_records.append(rec)
            self._remember(rec)
            new += 1
        self._journal_fh.flush()
        if self.fsync and new:
            os.fsync(self._journal_fh.fileno())
        while len(self._journal_records) >= self.shard_size:
            self._seal(self.shard_size)
        return new

    def seal(self) -> None:
        """Seal everything in the journal into shards now (the last shard may be short)."""
        while self._journal_records:
            self._seal(min(self.shard_size, len(self._journal_records)))

    def _seal(self, count: int) -> None:
        batch, rest = self._journal_records[:count], self._journal_records[count:]
        path = self.shard_dir / f"shard-{self._next_shard_index():05d}.{self.fmt}"
        if self.fmt == "jsonl":
            with atomic_write(path, "w") as fh:
                for rec in batch:
                    fh.write(_json_line(rec) + "\n")
        else:
            _write_parquet(path, batch)
        # the shard is durable; now drop its records from the journal (crash here = duplicates
        # in journal and shard, which recovery removes by id)
        self._rewrite_journal(rest)
        self._journal_records = rest
        self._write_manifest()
        log.debug("sealed %s (%d records)", path.name, len(batch))

    def _rewrite_journal(self, records: list[dict[str, Any]]) -> None:
        if self._journal_fh is not None:
            self._journal_fh.close()
        with atomic_write(self.journal_path, "w") as fh:
            for rec in records:
                fh.write(_json_line(rec) + "\n")
        if self._journal_fh is not None:
            self._journal_fh = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115

    def _next_shard_index(self) -> int:
        idx = [int(p.name.split("-")[1].split(".")[0]) for p in self._shard_paths()]
        return max(idx, default=-1) + 1

    def _write_manifest(self) -> None:
        shards = [{"file": p.name, "records": _count_records(p), "sha256": sha256_file(p)}
                  for p in self._shard_paths()]
        write_json_atomic(self.root / MANIFEST, {
            "format": self.fmt, "shards": shards,
            "records": sum(s["records"] for s in shards),
        })

    def _remember(self, rec: dict[str, Any]) -> None:
        self._done.add(rec["id"])
        if rec.get("fingerprint") is not None:
            self._fingerprints[rec["id"]] = rec["fingerprint"]

    # ---- reading ---------------------------------------------------------------------------
    def fingerprint(self, rid: str) -> str | None:
        """The stored request fingerprint of a finished id (``None`` if unknown)."""
        return self._fingerprints.get(rid)

    def done_ids(self) -> set[str]:
        """Ids of every finished record (sealed or journaled)."""
        return set(self._done)

    def __len__(self) -> int:
        return len(self._done)

    def _shard_paths(self) -> list[Path]:
        if not self.shard_dir.exists():
            return []
        return sorted(p for p in self.shard_dir.iterdir()
                      if p.name.startswith("shard-") and p.suffix in (".jsonl", ".parquet"))

    def _iter_shards(self) -> Iterator[dict[str, Any]]:
        for p in self._shard_paths():
            yield from _read_shard(p)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self._iter_shards()
        yield from list(self._journal_records)

    def _acquire_lock(self) -> None:
        self._lock_fh = open(self.root / ".lock", "a+")  # noqa: SIM115
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory lock, single writer assumed
            return
        try:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_fh.close()
            self._lock_fh = None
            raise CacheError(
                f"another kdforge job is writing to {self.root}",
                "wait for it to finish, or give this job another output_dir",
            ) from None

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing the file releases the flock
            self._lock_fh = None


def read_records(root: str | os.PathLike) -> list[dict[str, Any]]:
    """All finished records of an output folder, sealed shards first, then the recovered
    journal (read-only: nothing is rewritten, no lock taken). Duplicate ids are dropped."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"no generation output at {root}", "run `kdforge generate` first")
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    shard_dir = root / SHARD_DIR
    paths = sorted(p for p in shard_dir.iterdir() if p.name.startswith("shard-")) if shard_dir.exists() else []
    journal, _ = recover_journal(root / JOURNAL)
    for rec in [r for p in paths for r in _read_shard(p)] + journal:
        if rec["id"] not in seen:
            seen.add(rec["id"])
            out.append(rec)
    return out


def _count_records(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _read_shard(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for row in pq.read_table(path).to_pylist():
            yield {k: (json.loads(v) if k in row.get("_json_columns", []) else v)
                   for k, v in row.items() if k != "_json_columns"}
        return
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise CacheError(
                    f"sealed shard {path} is corrupt at line {n}",
                    "sealed shards are written atomically, so this file was changed by hand or "
                    "by a failing disk; delete it and rerun to regenerate its records",
                ) from None


def _write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    """Parquet shard; nested values (chat messages, dicts) are stored as JSON strings and
    listed in a ``_json_columns`` column so reading restores them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("format 'parquet' needs pyarrow", "pip install pyarrow, or use format: jsonl") from None
    keys: list[str] = []
    for rec in records:
        keys.extend(k for k in rec if k not in keys)
    nested = sorted({k for rec in records for k, v in rec.items() if isinstance(v, dict | list)})
    rows = []
    for rec in records:
        row = {k: (json.dumps(rec.get(k), ensure_ascii=False) if k in nested else rec.get(k)) for k in keys}
        row["_json_columns"] = nested
        rows.append(row)
    table = pa.Table.from_pylist(rows)
    with atomic_write(path, "wb") as fh:
        pq.write_table(table, fh)
