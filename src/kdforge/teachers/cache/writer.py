"""Build a teacher cache: run the teacher once over a corpus and store its top-k per position.

Offline teacher inference as in MiniPLM (Gu et al., 2024) and FIRST (Zhang et al., 2024): the
teacher's sparse distribution is computed once and replayed for any number of students sharing
the tokenizer, at the cost of a disk read per step.

Crash safety: each shard is written with :func:`kdforge.io.atomic_write` and the manifest is
rewritten atomically after it, so a kill at any instant leaves only complete shards listed.
Rerunning the same build resumes at the first missing shard; batches never cross shard
boundaries, so a resumed build writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdforge
from kdforge.errors import CacheError, ConfigError, DiskFullError, ShapeError
from kdforge.io import atomic_write, sha256_file, write_json_atomic
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.cache.codec import (
    Encoding,
    RecordCompressor,
    frequency_table,
    get_encoding,
    id_dtype,
    record_dtype,
)
from kdforge.teachers.cache.codec import encode_records as _encode
from kdforge.teachers.cache.format import (
    COMPAT_KEYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_MAGIC,
    MANIFEST,
    TAIL_POLICY,
    as_sequences,
    read_manifest,
    shard_name,
    shard_ranges,
)
from kdforge.teachers.online import OnlineTeacher
from kdforge.teachers.vocab import tokenizer_fingerprint, tokenizer_size

log = logging.getLogger(__name__)


def encode_shard(
    encoding: Encoding, input_ids: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, vocab_size: int
) -> bytes:
    """Bytes of one shard file for ``[n, T]`` input ids and ``[n, T, k]`` top-k ids/log-probs.

    Compressed encodings: ``n`` record frames, then (``id_remap``) the compressed rank -> id table
    as frame ``n``, then the uint64 frame offsets and the index magic.
    """
    table = None
    if encoding.compression is not None and encoding.id_remap:
        table = frequency_table(input_ids, ids)
        rank = np.zeros(vocab_size, dtype=np.int64)
        rank[table] = np.arange(len(table))
        input_ids, ids = rank[input_ids], rank[ids]
    rec = _encode(encoding, input_ids, ids, logprobs, vocab_size)
    if encoding.compression is None:
        return rec.tobytes()
    comp = RecordCompressor(encoding, rec.dtype)
    frames = [comp.compress(r.tobytes()) for r in rec]
    if table is not None:
        frames.append(comp.compress_blob(table.astype(id_dtype(vocab_size)).tobytes()))
    offsets = np.zeros(len(frames) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(f) for f in frames])
    return b"".join(frames) + offsets.tobytes() + INDEX_MAGIC


#: ``topk_fn(input_ids [B, T], first_row) -> SparseTeacher [B, T, k]``: the teacher signal of
#: rows ``first_row .. first_row + B`` of the corpus (a live model, a server, precomputed arrays)
TopkFn = Callable[[torch.Tensor, int], SparseTeacher]


def build_teacher_cache(
    teacher: OnlineTeacher | nn.Module,
    sequences: Any,
    out_dir: str | Path,
    *,
    k: int = 16,
    encoding: str | Encoding = "compact-u8-zstd",
    batch_size: int = 8,
    shard_size: int = 256,
    tokenizer: Any = None,
    teacher_id: str | None = None,
    weights_hash: str | None = None,
    overwrite: bool = False,
    on_shard: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Run ``teacher`` once over ``sequences`` and write a top-k cache to ``out_dir``.

    Args:
        teacher: :class:`OnlineTeacher` or a causal-LM module (wrapped, frozen).
        sequences: fixed-length token ids ``[N, T]``: LongTensor/ndarray, ``datasets.Dataset``
            with ``input_ids``, or a list of equal-length lists.
        out_dir: cache folder (created; resumed if it holds a compatible unfinished build).
        k: entries kept per position (measured defaults: docs/teacher-cache.md).
        encoding: a name from :data:`~kdforge.teachers.cache.codec.ENCODINGS`.
        batch_size: sequences per teacher forward (batches never cross shards).
        shard_size: sequences per shard file (the resume granularity).
        tokenizer: the teacher's tokenizer; its fingerprint is recorded so the cache cannot be
            replayed under another tokenizer.
        teacher_id: name recorded in the manifest (default: the teacher's name).
        weights_hash: skip hashing the weights by passing a precomputed identifier.
        overwrite: replace an existing cache built with other settings instead of failing.
        on_shard: called as ``on_shard(index, shard_entry)`` after each shard is committed.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CacheError: ``out_dir`` holds a cache of another teacher/tokenizer/corpus/settings and
            ``overwrite`` is False.
    """
    if not isinstance(teacher, OnlineTeacher):
        teacher = OnlineTeacher(teacher)
    seqs = as_sequences(sequences)
    with torch.no_grad():
        probe = teacher.logits(torch.as_tensor(seqs.rows(0, 1)[:, : min(2, seqs.seq_len)]))
    vocab_size = int(probe.shape[-1])
    kk = min(k, vocab_size)
    return write_teacher_cache(
        lambda input_ids, first_row: teacher.topk(input_ids, torch.ones_like(input_ids), k=kk),
        seqs,
        out_dir,
        vocab_size=vocab_size,
        k=kk,
        teacher_info={
            "id": teacher_id or teacher.name,
            "weights_sha256": weights_hash or teacher.weights_hash(),
            "dtype": str(teacher.dtype).replace("torch.", ""),
        },
        encoding=encoding,
        batch_size=batch_size,
        shard_size=shard_size,
        tokenizer=tokenizer,
        overwrite=overwrite,
        on_shard=on_shard,
    )


def write_teacher_cache(
    topk_fn: TopkFn,
    sequences: Any,
    out_dir: str | Path,
    *,
    vocab_size: int,
    k: int,
    teacher_info: dict[str, Any],
    encoding: str | Encoding = "compact-u8-zstd",
    batch_size: int = 8,
    shard_size: int = 256,
    tokenizer: Any = None,
    overwrite: bool = False,
    on_shard: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Write a cache from any top-k source (see :data:`TopkFn`); :func:`build_teacher_cache`
    is this with a live model. ``teacher_info`` needs ``id`` and ``weights_sha256`` (any stable
    identifier of the teacher, e.g. a served model's name and revision)."""
    if k < 1 or batch_size < 1 or shard_size < 1:
        raise ConfigError(
            f"k, batch_size and shard_size must be >= 1 (got {k}, {batch_size}, {shard_size})",
            "use positive values",
        )
    missing = {"id", "weights_sha256"} - set(teacher_info)
    if missing:
        raise ConfigError(f"teacher_info lacks {sorted(missing)}", "pass the teacher's id and a weights hash")
    enc = get_encoding(encoding)
    out = Path(out_dir)
    seqs = as_sequences(sequences)
    log.info("fingerprinting %d sequences of %d tokens", len(seqs), seqs.seq_len)
    data_fp = seqs.fingerprint()
    tok = None
    if tokenizer is not None:
        tok = {"fingerprint": tokenizer_fingerprint(tokenizer), "size": tokenizer_size(tokenizer)}
    dtype = record_dtype(enc, seqs.seq_len, k, vocab_size)
    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kdforge_version": kdforge.__version__,
        "complete": False,
        "teacher": dict(teacher_info),
        "tokenizer": tok,
        "vocab_size": vocab_size,
        "k": k,
        "encoding": enc.to_dict(),
        "id_dtype": id_dtype(vocab_size).name,
        "tail_policy": TAIL_POLICY,
        "dataset": {
            "fingerprint": data_fp,
            "num_sequences": len(seqs),
            "seq_len": seqs.seq_len,
            "num_tokens": len(seqs) * seqs.seq_len,
        },
        "shard_size": shard_size,
        "record_bytes": dtype.itemsize,
        "shards": [],
        "stats": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    with build_lock(out):
        manifest = _resume_or_start(out, header, overwrite)
        if manifest["complete"]:
            log.info("teacher cache at %s is already complete; nothing to do", out)
            return out

        ranges = shard_ranges(len(seqs), shard_size)
        start_shard = len(manifest["shards"])
        if start_shard:
            log.info("resuming teacher cache at shard %d of %d", start_shard, len(ranges))
        for index in range(start_shard, len(ranges)):
            start, end = ranges[index]
            t0 = time.perf_counter()
            input_ids = seqs.rows(start, end)
            ids_parts, lp_parts = [], []
            for b in range(0, end - start, batch_size):
                batch = torch.as_tensor(input_ids[b : b + batch_size])
                sparse = topk_fn(batch, start + b)
                if tuple(sparse.ids.shape) != (batch.shape[0], seqs.seq_len, k):
                    raise ShapeError(
                        f"the teacher signal for rows {start + b}.. has shape {tuple(sparse.ids.shape)}, "
                        f"expected {(batch.shape[0], seqs.seq_len, k)}",
                        "return one top-k list of k entries per position",
                    )
                ids_parts.append(sparse.ids.cpu().numpy())
                lp_parts.append(sparse.logprobs.cpu().numpy())
            ids = np.concatenate(ids_parts)
            lps = np.concatenate(lp_parts)
            if ids.max() >= vocab_size:
                raise CacheError(f"teacher produced id {ids.max()} >= vocab {vocab_size}", "report this bug")
            blob = encode_shard(enc, input_ids, ids, lps, vocab_size)
            name = shard_name(index)
            with atomic_write(out / name, "wb") as fh:
                fh.write(blob)
            mass = np.exp(lps.astype(np.float64)).sum(-1)
            entry = {
                "file": name,
                "rows": [start, end],
                "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "topk_mass_sum": float(mass.sum()),
                "topk_mass_min": float(mass.min()),
                "max_quant_error": _max_quant_error(enc, lps),
            }
            manifest["shards"].append(entry)
            if index == len(ranges) - 1:
                manifest["complete"] = True
                manifest["stats"] = _stats(manifest)
            write_json_atomic(out / MANIFEST, manifest)
            n_tok = (end - start) * seqs.seq_len
            log.info(
                "shard %d/%d: %d tokens, %.1f B/token, %.0f tokens/s",
                index + 1,
                len(ranges),
                n_tok,
                len(blob) / n_tok,
                n_tok / max(time.perf_counter() - t0, 1e-9),
            )
            if on_shard is not None:
                on_shard(index, entry)
        return out


def _max_quant_error(enc: Encoding, lps: np.ndarray) -> float:
    """Largest |log p - decoded log p| over finite entries above the grid floor (before rescaling)."""
    from kdforge.teachers.cache.codec import dequantize_logprobs, quantize_logprobs

    finite = lps[np.isfinite(lps) & (lps >= (enc.logprob_min if enc.logprob_dtype == "uint8" else -np.inf))]
    if finite.size == 0:
        return 0.0
    if enc.logprob_dtype == "uint8":
        back = dequantize_logprobs(quantize_logprobs(finite, enc.logprob_min), enc.logprob_min)
    else:
        back = finite.astype(enc.logprob_dtype).astype(np.float32)
    return float(np.abs(back - finite).max())


def _stats(manifest: dict[str, Any]) -> dict[str, Any]:
    shards = manifest["shards"]
    tokens = manifest["dataset"]["num_tokens"]
    total = sum(s["bytes"] for s in shards)
    return {
        "total_bytes": total,
        "bytes_per_token": total / tokens,
        "topk_mass_mean": sum(s["topk_mass_sum"] for s in shards) / tokens,
        "topk_mass_min": min(s["topk_mass_min"] for s in shards),
        "max_quant_error": max(s["max_quant_error"] for s in shards),
    }


LOCK = ".build.lock"


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Exclusive lock on a cache folder for the duration of a build.

    The lock file holds ``host:pid``. A lock left by a dead process on this host is taken over;
    a live one (or one from another host) makes the second build fail fast instead of racing
    the first one's manifest (e.g. every rank of a multi-GPU launch calling the builder).
    """
    path = out / LOCK
    me = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = path.read_text().strip()
            except FileNotFoundError:
                continue
            host, _, pid = owner.rpartition(":")
            if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                log.warning("removing stale build lock of dead process %s in %s", owner, out)
                path.unlink(missing_ok=True)
                continue
            raise CacheError(
                f"another build of the teacher cache at {out} is running ({owner})",
                "wait for it to finish (build on one process only, e.g. rank 0, then let the others "
                f"read), or delete {path} if that process is gone",
            ) from None
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
        except OSError as exc:  # an empty lock left behind would block every later build
            path.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"disk full while writing the build lock {path}; the cache's finished shards are intact",
                    "free disk space (or build the cache on another disk) and run again; the build resumes",
                ) from exc
            raise
        break
    else:  # pragma: no cover - lost a race twice
        raise CacheError(f"could not lock {out} for building", "retry")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _resume_or_start(out: Path, header: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Return the manifest to continue from: a verified prefix of an existing build, or ``header``."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # temp files of an interrupted atomic write
        stale.unlink(missing_ok=True)
    if not (out / MANIFEST).exists():
        if any(out.glob("shard-*.kdc")) and not overwrite:
            raise CacheError(
                f"{out} holds shard files but no manifest",
                "delete the folder, or pass overwrite=True (--overwrite) to rebuild",
            )
        _remove_shards(out, keep=0)
        return header
    try:
        old = read_manifest(out)
    except CacheError:
        if not overwrite:
            raise
        old = None
    diff = [] if old is None else [key for key in COMPAT_KEYS if old.get(key) != header[key]]
    if old is None or diff:
        if not overwrite:
            raise CacheError(
                f"{out} holds a teacher cache built with other settings (differs in: {', '.join(diff)})",
                "choose another output folder, or pass overwrite=True (--overwrite) to rebuild it",
            )
        log.warning("overwriting the teacher cache at %s (differs in: %s)", out, ", ".join(diff) or "manifest")
        (out / MANIFEST).unlink()
        _remove_shards(out, keep=0)
        return header
    kept = []
    for entry in old["shards"]:
        path = out / entry["file"]
        if path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]:
            kept.append(entry)
        else:
            log.warning("shard %s is missing or damaged; rebuilding from there", entry["file"])
            break
    header["shards"] = kept
    header["complete"] = old.get("complete", False) and len(kept) == len(old["shards"])
    if header["complete"]:
        header["stats"] = old.get("stats", {})
    _remove_shards(out, keep=len(kept))
    return header


def _remove_shards(out: Path, keep: int) -> None:
    for path in out.glob("shard-*.kdc"):
        try:
            index = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if index >= keep:
            path.unlink()
