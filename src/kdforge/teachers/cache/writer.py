"""Build a teacher cache: run the teacher once over a corpus and store its top-k per position.

Offline teacher inference as in MiniPLM (Gu et al., 2024) and FIRST (Zhang et al., 2024): the
teacher's sparse distribution is computed once and replayed for any number of students sharing
the tokenizer, at the cost of a disk read per step.

Crash safety: each shard is written with :func:`kdforge.io.atomic_write` and the manifest is
rewritten atomically after it, so a kill at any instant leaves only complete shards listed.
Rerunning the same build writes only the missing shards; batches never cross shard boundaries,
so a resumed build writes the same bytes as an uninterrupted one.

Data-parallel builds (``data_parallel=True`` under ``accelerate launch``): each rank writes its
share of the shards plus its own progress record, rank 0 merges the manifest once; see
:mod:`kdforge.teachers.cache.parallel`. The output does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdforge
from kdforge.errors import CacheError, ConfigError, DiskFullError, ShapeError
from kdforge.io import atomic_write, sha256_file, write_json_atomic
from kdforge.losses.signal import SparseTeacher, sample_tail
from kdforge.teachers.cache.codec import (
    Encoding,
    RecordCompressor,
    counts_from_weights,
    frequency_table,
    get_encoding,
    id_dtype,
    record_dtype,
)
from kdforge.teachers.cache.codec import encode_records as _encode
from kdforge.teachers.cache.format import (
    FORMAT_NAME,
    INDEX_MAGIC,
    LOSS_MASK,
    MANIFEST,
    TAIL_POLICY,
    as_sequences,
    compat_diff,
    format_version_for,
    read_manifest,
    shard_name,
    shard_ranges,
)
from kdforge.teachers.cache.offsets import OFFSETS_FILE, encode_offsets, text_fingerprint
from kdforge.teachers.cache.parallel import (
    BuildGroup,
    assign_shards,
    join_launch_group,
    progress_files,
    progress_name,
)
from kdforge.teachers.online import OnlineTeacher, topk_logprobs
from kdforge.teachers.vocab import tokenizer_identity

log = logging.getLogger(__name__)


def encode_shard(
    encoding: Encoding,
    input_ids: np.ndarray,
    ids: np.ndarray,
    logprobs: np.ndarray,
    vocab_size: int,
    sample_ids: np.ndarray | None = None,
    sample_counts: np.ndarray | None = None,
) -> bytes:
    """Bytes of one shard file for ``[n, T]`` input ids and ``[n, T, k]`` top-k ids/log-probs
    (plus ``[n, T, m]`` sampled tail ids and counts when the cache has ``tail_samples``).

    Compressed encodings: ``n`` record frames, then (``id_remap``) the compressed rank -> id table
    as frame ``n``, then the uint64 frame offsets and the index magic.
    """
    table = None
    if encoding.compression is not None and encoding.id_remap:
        arrays = [input_ids, ids] + ([] if sample_ids is None else [sample_ids])
        table = frequency_table(*arrays)
        rank = np.zeros(vocab_size, dtype=np.int64)
        rank[table] = np.arange(len(table))
        input_ids, ids = rank[input_ids], rank[ids]
        if sample_ids is not None:
            sample_ids = rank[sample_ids]
    if sample_ids is not None and encoding.compression is not None:
        sample_ids, sample_counts = sort_samples(sample_ids, sample_counts)
    rec = _encode(encoding, input_ids, ids, logprobs, vocab_size, sample_ids, sample_counts)
    if encoding.compression is None:
        return rec.tobytes()
    comp = RecordCompressor(encoding, rec.dtype)
    frames = [comp.compress(r.tobytes()) for r in rec]
    if table is not None:
        frames.append(comp.compress_blob(table.astype(id_dtype(vocab_size)).tobytes()))
    offsets = np.zeros(len(frames) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(f) for f in frames])
    return b"".join(frames) + offsets.tobytes() + INDEX_MAGIC


def sort_samples(sample_ids: np.ndarray, sample_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drawn ids of each position sorted ascending (with their counts), unused slots (count 0)
    last repeating the last drawn id: the layout the compressed encodings delta-code."""
    used = sample_counts > 0
    order = np.argsort(np.where(used, sample_ids, np.iinfo(np.int64).max), axis=-1, kind="stable")
    ids = np.take_along_axis(sample_ids, order, -1)
    counts = np.take_along_axis(sample_counts, order, -1)
    used = counts > 0
    last = np.maximum.accumulate(np.where(used, ids, -1), axis=-1)
    return np.where(used, ids, np.maximum(last, 0)), counts


#: ``topk_fn(input_ids [B, T], first_row) -> SparseTeacher [B, T, k]``: the teacher signal of
#: rows ``first_row .. first_row + B`` of the corpus (a live model, a server, precomputed arrays).
#: With ``tail_samples = m`` it returns ``[B, T, k + m]`` with ``num_exact = k`` (see
#: :func:`kdforge.losses.signal.sample_tail`, seeded with :func:`row_seed`).
TopkFn = Callable[[torch.Tensor, int], SparseTeacher]


def row_seed(sample_seed: int, row: int) -> tuple[int, int]:
    """Seed of the tail draws of corpus row ``row``: depends on the row, not on batch or rank."""
    return (int(sample_seed), int(row))


def sampled_topk_fn(logits_fn: Callable[[torch.Tensor], torch.Tensor], k: int, tail_samples: int,
                    sample_seed: int = 0) -> TopkFn:
    """A :data:`TopkFn` drawing ``tail_samples`` tail tokens per position from full logits.

    ``logits_fn(input_ids [B, T]) -> [B, T, V]`` (a live teacher, or precomputed logits looked
    up by row); row ``r`` is seeded with :func:`row_seed` ``(sample_seed, r)``.
    """

    def fn(input_ids: torch.Tensor, first_row: int) -> SparseTeacher:
        logits = logits_fn(input_ids)
        seeds = [row_seed(sample_seed, first_row + i) for i in range(input_ids.shape[0])]
        return sample_tail(logits, k, tail_samples, seeds)[0]

    return fn


def build_teacher_cache(
    teacher: OnlineTeacher | nn.Module,
    sequences: Any,
    out_dir: str | Path,
    *,
    k: int = 16,
    tail_samples: int = 0,
    sample_seed: int = 0,
    encoding: str | Encoding = "compact-u8-zstd",
    batch_size: int = 8,
    shard_size: int = 256,
    tokenizer: Any = None,
    teacher_id: str | None = None,
    weights_hash: str | None = None,
    overwrite: bool = False,
    on_shard: Callable[[int, dict[str, Any]], None] | None = None,
    data_parallel: bool | BuildGroup = False,
    loss_mask: Any = None,
    token_offsets: tuple[Any, Any] | None = None,
    texts: Sequence[str] | None = None,
    feature_layers: Sequence[int] | None = None,
    feature_dtype: str = "int8",
) -> Path:
    """Run ``teacher`` once over ``sequences`` and write a top-k cache to ``out_dir``.

    Args:
        teacher: :class:`OnlineTeacher` or a causal-LM module (wrapped, frozen).
        sequences: fixed-length token ids ``[N, T]``: LongTensor/ndarray, ``datasets.Dataset``
            with ``input_ids``, or a list of equal-length lists.
        out_dir: cache folder (created; resumed if it holds a compatible unfinished build).
        k: exact top-k entries kept per position (measured defaults: docs/teacher-cache.md); 0 is
            allowed with ``tail_samples`` (pure sampling from the teacher).
        tail_samples: ``m > 0`` also stores ``m`` draws (with replacement, duplicates merged into
            counts) from the teacher's distribution outside the top-k, so the replayed signal is an
            unbiased estimate of the full distribution (see
            :func:`kdforge.losses.signal.sample_tail`; valid for forward KL only).
        sample_seed: seed of the draws; row ``r`` uses ``(sample_seed, r)``, so the bytes do not
            depend on batch size, process count or resumption.
        encoding: a name from :data:`~kdforge.teachers.cache.codec.ENCODINGS`.
        batch_size: sequences per teacher forward (batches never cross shards).
        shard_size: sequences per shard file (the resume granularity).
        tokenizer: the teacher's tokenizer; its fingerprint is recorded so the cache cannot be
            replayed under another tokenizer.
        teacher_id: name recorded in the manifest (default: the teacher's name).
        weights_hash: skip hashing the weights by passing a precomputed identifier.
        overwrite: replace an existing cache built with other settings instead of failing.
        on_shard: called as ``on_shard(index, shard_entry)`` after each shard is committed.
        data_parallel: True: call this on *every* process of an ``accelerate launch`` /
            ``torchrun`` launch; the unfinished shards are split round-robin over the ranks, each
            writes its own, rank 0 merges the manifest once (the result is the same bytes as a
            one-process build). False (default): this process builds alone (under a launch, call
            it on one rank only, e.g. inside ``accelerator.main_process_first()``). A
            :class:`~kdforge.teachers.cache.parallel.BuildGroup` gives the group explicitly.
        loss_mask: optional bool ``[N, T]``, True where the token is trained (``labels != -100``
            of response-only chat / prompt-completion data, :func:`kdforge.data.prepare_blocks`).
            It is stored with the cache (``loss_mask.npy``, 1 bit per token) and replayed as
            ``labels``; the teacher signal at logit position ``t`` is kept only where token
            ``t + 1`` is trained, and *blanked* elsewhere (a constant entry that the compressed
            encodings store in a few bits: measured in docs/teacher-cache.md). None (default):
            every token is trained, and the cache is byte-identical to one built without the
            argument.
        token_offsets: optional ``(offsets [N, T, 2], lengths [N])``: the character span of each
            teacher token in ``texts[i]`` and the number of real tokens per row (the rest is
            padding); stored compactly (:mod:`kdforge.teachers.cache.offsets`) so that a student
            with *another* tokenizer can be aligned to the cache
            (:class:`~kdforge.teachers.cache.CrossTokenizerCacheDataset`). Needs ``texts``.
            :func:`~kdforge.teachers.cache.build_cross_tokenizer_cache` tokenizes texts for you.
        texts: the texts the rows were tokenized from (only their SHA-256 is stored).
        feature_layers: also store the teacher's hidden states of these layers (indices into
            ``hidden_states``: 0 = embeddings, ``L`` = last block), per shard, compressed by
            ``feature_dtype`` (``"int8"``: per-row scaled, ``"bf16"``, ``"fp32"``: exact;
            :mod:`kdforge.teachers.cache.features`), for feature terms (``hidden_mse``, ...) with
            a cached teacher. Not with ``tail_samples``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CacheError: ``out_dir`` holds a cache of another teacher/tokenizer/corpus/settings and
            ``overwrite`` is False.
    """
    teacher = teacher if isinstance(teacher, OnlineTeacher) else OnlineTeacher(teacher)
    seqs = as_sequences(sequences)
    vocab_size = _teacher_vocab_size(teacher, seqs)
    topk_fn, kk, features = _live_topk_fn(teacher, vocab_size, k, tail_samples, sample_seed, feature_layers,
                                          feature_dtype)
    return write_teacher_cache(
        topk_fn, seqs, out_dir, vocab_size=vocab_size, k=kk, tail_samples=tail_samples, sample_seed=sample_seed,
        teacher_info=_teacher_info(teacher, teacher_id, weights_hash), encoding=encoding, batch_size=batch_size,
        shard_size=shard_size, tokenizer=tokenizer, overwrite=overwrite, on_shard=on_shard,
        data_parallel=data_parallel, loss_mask=loss_mask, token_offsets=token_offsets, texts=texts,
        features=features,
    )


def _teacher_vocab_size(teacher: OnlineTeacher, seqs: Any) -> int:
    """Width of the teacher's logits: from the LM head's shape, else from a 2-token probe forward."""
    vocab_size = teacher.logits_width()  # from the LM head's shape: no probe forward (~0.1 CPU s here)
    if vocab_size is None:
        with torch.no_grad():
            probe = teacher.logits(torch.as_tensor(seqs.rows(0, 1)[:, : min(2, seqs.seq_len)]))
        vocab_size = int(probe.shape[-1])
    return vocab_size


def _live_topk_fn(teacher: OnlineTeacher, vocab_size: int, k: int, tail_samples: int, sample_seed: int,
                  feature_layers: Sequence[int] | None, feature_dtype: str
                  ) -> tuple[TopkFn, int, dict[str, Any] | None]:
    """The :data:`TopkFn` of a live teacher, the ``k`` it keeps and the manifest's ``features`` entry."""
    kk = min(k, vocab_size)
    features = None
    if feature_layers is not None:
        topk_fn, features = _features_topk_fn(teacher, kk, feature_layers, feature_dtype, tail_samples)
    elif tail_samples:
        kk = min(k, vocab_size - 1)  # leave a tail to sample from
        topk_fn = sampled_topk_fn(lambda ids: teacher.logits(ids, torch.ones_like(ids)), kk, tail_samples,
                                  sample_seed)
    else:
        def topk_fn(input_ids: torch.Tensor, first_row: int) -> SparseTeacher:
            return teacher.topk(input_ids, torch.ones_like(input_ids), k=kk)
    return topk_fn, kk, features


def _teacher_info(teacher: OnlineTeacher, teacher_id: str | None, weights_hash: str | None) -> dict[str, Any]:
    """The manifest's ``teacher`` entry: id, weights hash (computed unless given) and dtype."""
    return {
        "id": teacher_id or teacher.name,
        "weights_sha256": weights_hash or teacher.weights_hash(),
        "dtype": str(teacher.dtype).replace("torch.", ""),
    }


def _features_topk_fn(teacher: OnlineTeacher, k: int, layers: Sequence[int], dtype: str, tail_samples: int
                      ) -> tuple[TopkFn, dict[str, Any]]:
    """A :data:`TopkFn` that also returns the hidden states ``[B, F, T, H]`` of ``layers`` (one
    forward), and the manifest's ``features`` entry."""
    from kdforge.features.taps import FeatureRequest, num_layers
    from kdforge.teachers.cache.features import check_feature_dtype
    from kdforge.teachers.forward import run_model_features

    check_feature_dtype(dtype)
    if tail_samples:
        raise ConfigError("feature_layers cannot be combined with tail_samples", "build one of them per cache")
    total = num_layers(teacher.model)
    layers = [int(x) for x in layers]
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) > total:
        raise ConfigError(f"feature_layers must be distinct indices in [0, {total}] (0 = embeddings), got {layers}",
                          f"choose hidden-state layers of this {total}-block teacher, e.g. [{total // 2}, {total}]")
    info: dict[str, Any] = {"layers": layers, "dtype": dtype, "num_layers": total}

    def fn(input_ids: torch.Tensor, first_row: int) -> tuple[SparseTeacher, torch.Tensor]:
        with torch.no_grad():
            logits, feats = run_model_features(teacher.model, FeatureRequest(hidden_states=True),
                                               input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            if teacher.vocab_size is not None:
                logits = logits[..., : teacher.vocab_size]
            hidden = torch.stack([feats.hidden_states[i] for i in layers], dim=1).float().cpu()
        info.setdefault("hidden_size", int(hidden.shape[-1]))
        return topk_logprobs(logits, k).to(input_ids.device), hidden

    with torch.no_grad():  # the width goes into the manifest before the first shard
        fn(torch.zeros(1, 1, dtype=torch.long), 0)
    return fn, info


def write_teacher_cache(
    topk_fn: TopkFn,
    sequences: Any,
    out_dir: str | Path,
    *,
    vocab_size: int,
    k: int,
    teacher_info: dict[str, Any],
    tail_samples: int = 0,
    sample_seed: int = 0,
    encoding: str | Encoding = "compact-u8-zstd",
    batch_size: int = 8,
    shard_size: int = 256,
    tokenizer: Any = None,
    overwrite: bool = False,
    on_shard: Callable[[int, dict[str, Any]], None] | None = None,
    data_parallel: bool | BuildGroup = False,
    loss_mask: Any = None,
    token_offsets: tuple[Any, Any] | None = None,
    texts: Sequence[str] | None = None,
    features: dict[str, Any] | None = None,
) -> Path:
    """Write a cache from any top-k source (see :data:`TopkFn`); :func:`build_teacher_cache`
    is this with a live model. ``teacher_info`` needs ``id`` and ``weights_sha256`` (any stable
    identifier of the teacher, e.g. a served model's name and revision). ``data_parallel``: see
    :func:`build_teacher_cache` (each rank's ``topk_fn`` is called only on its own shards).
    ``tail_samples = m > 0``: ``topk_fn`` returns ``k + m`` entries with ``num_exact = k``
    (:func:`sampled_topk_fn`); ``sample_seed`` is recorded in the manifest. ``loss_mask``: see
    :func:`build_teacher_cache`. ``token_offsets`` / ``texts``: see :func:`build_teacher_cache`. ``features``
    (``layers``, ``dtype``, ``hidden_size``, ``num_layers``): ``topk_fn`` returns
    ``(SparseTeacher, hidden [B, F, T, H])`` and each shard gets a features file."""
    _check_write_args(k, batch_size, shard_size, tail_samples, teacher_info)
    enc = get_encoding(encoding)
    out = Path(out_dir)
    seqs = as_sequences(sequences)
    log.info("fingerprinting %d sequences of %d tokens", len(seqs), seqs.seq_len)
    data_fp = seqs.fingerprint()
    mask = as_loss_mask(loss_mask, len(seqs), seqs.seq_len)
    header = _cache_header(enc, seqs, data_fp, mask, tokenizer, teacher_info, vocab_size=vocab_size, k=k,
                           tail_samples=tail_samples, sample_seed=sample_seed, shard_size=shard_size,
                           features=features)
    offsets_blob = _offsets_entry(header, token_offsets, texts, len(seqs), seqs.seq_len)
    mask_blob = _loss_mask_entry(header, mask)
    out.mkdir(parents=True, exist_ok=True)
    group = _resolve_group(data_parallel)
    ranges = shard_ranges(len(seqs), shard_size)
    with contextlib.ExitStack() as stack:
        # phase 1: rank 0 locks the folder, keeps what a killed build finished, publishes the plan
        manifest = _start_build(stack, out, group, header, overwrite, ranges, mask_blob, offsets_blob)
        if manifest["complete"]:
            log.info("teacher cache at %s is already complete; nothing to do", out)
            return out
        # phase 2: every rank writes its share of the unfinished shards
        mine = _my_shards(manifest, ranges, shard_size, group)
        progress: list[dict[str, Any]] = []
        for index in mine:
            start, end = ranges[index]
            t0 = time.perf_counter()
            entry, n_bytes = _write_shard(out, index, seqs, start, end, topk_fn, enc, k, vocab_size, batch_size,
                                          tail_samples, None if mask is None else mask[start:end], features)
            _commit_shard(out, manifest, entry, len(ranges), group, progress)
            _log_shard(index, len(ranges), (end - start) * seqs.seq_len, n_bytes, t0)
            if on_shard is not None:
                on_shard(index, entry)
        # phase 3: rank 0 merges the ranks' records into the manifest, once
        if group.world_size > 1:
            group.barrier()
            if group.rank == 0:
                _merge_progress(out, manifest, ranges)
            group.barrier()
        return out


def _check_write_args(k: int, batch_size: int, shard_size: int, tail_samples: int,
                      teacher_info: dict[str, Any]) -> None:
    """Reject sizes, a tail-sample count and a teacher record that no cache can be built with."""
    if k < (0 if tail_samples else 1) or batch_size < 1 or shard_size < 1:
        raise ConfigError(
            f"k, batch_size and shard_size must be >= 1 (got {k}, {batch_size}, {shard_size}; k may be 0 "
            "only with tail_samples)",
            "use positive values",
        )
    if not (isinstance(tail_samples, int) and 0 <= tail_samples <= 255):
        raise ConfigError(f"tail_samples must be an int in [0, 255], got {tail_samples!r}",
                          "use 0 (top-k only), 16 or 32")
    missing = {"id", "weights_sha256"} - set(teacher_info)
    if missing:
        raise ConfigError(f"teacher_info lacks {sorted(missing)}", "pass the teacher's id and a weights hash")


def _cache_header(enc: Encoding, seqs: Any, data_fp: str, mask: np.ndarray | None, tokenizer: Any,
                  teacher_info: dict[str, Any], *, vocab_size: int, k: int, tail_samples: int, sample_seed: int,
                  shard_size: int, features: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of a build that has written no shard yet (``complete: False``)."""
    tok = None
    if tokenizer is not None:
        fingerprint, size = tokenizer_identity(tokenizer)
        tok = {"fingerprint": fingerprint, "size": size}
    dtype = record_dtype(enc, seqs.seq_len, k, vocab_size, tail_samples)
    return {
        "format": FORMAT_NAME,
        "format_version": format_version_for(tail_samples, masked=mask is not None),
        "kdforge_version": kdforge.__version__,
        "complete": False,
        "teacher": dict(teacher_info),
        "tokenizer": tok,
        "vocab_size": vocab_size,
        "k": k,
        "tail_samples": tail_samples,
        "sample_seed": int(sample_seed),
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
        **({"features": dict(features)} if features else {}),
        "shards": [],
        "stats": {},
    }


def _loss_mask_entry(header: dict[str, Any], mask: np.ndarray | None) -> bytes | None:
    """Bytes of ``loss_mask.npy`` (None without a mask); records their SHA-256 and the trained-token count."""
    if mask is None:
        return None
    mask_blob = loss_mask_bytes(mask)
    header["dataset"]["loss_mask_sha256"] = hashlib.sha256(mask_blob).hexdigest()
    header["dataset"]["loss_tokens"] = int(mask[:, 1:].sum())
    return mask_blob


def _start_build(stack: contextlib.ExitStack, out: Path, group: BuildGroup, header: dict[str, Any], overwrite: bool,
                 ranges: Sequence[tuple[int, int]], mask_blob: bytes | None, offsets_blob: bytes | None
                 ) -> dict[str, Any]:
    """Phase 1: rank 0 takes the build lock (held by ``stack``), resumes or starts the manifest and writes
    the side files; every rank then reads the same manifest."""
    if group.rank == 0:
        stack.enter_context(build_lock(out))
        manifest = _resume_or_start(out, header, overwrite, ranges)
        if mask_blob is not None and not manifest["complete"]:
            with atomic_write(out / LOSS_MASK, "wb") as fh:
                fh.write(mask_blob)
        if offsets_blob is not None and not manifest["complete"]:
            with atomic_write(out / OFFSETS_FILE, "wb") as fh:
                fh.write(offsets_blob)
        if group.world_size > 1 and not manifest["complete"]:
            write_json_atomic(out / MANIFEST, manifest)
    group.barrier()
    if group.rank != 0:
        manifest = _joined_manifest(out, header, group.rank)
    return manifest


def _my_shards(manifest: dict[str, Any], ranges: Sequence[tuple[int, int]], shard_size: int,
               group: BuildGroup) -> list[int]:
    """Indices of the unfinished shards that this rank writes (round-robin over the ranks)."""
    done = {_shard_index(e, shard_size) for e in manifest["shards"]}
    pending = [i for i in range(len(ranges)) if i not in done]
    mine = assign_shards(pending, group.rank, group.world_size)
    if done:
        log.info("resuming teacher cache: %d of %d shards done", len(done), len(ranges))
    if group.world_size > 1:
        log.info("rank %d of %d writes %d of the %d unfinished shards", group.rank, group.world_size,
                 len(mine), len(pending))
    return mine


def _commit_shard(out: Path, manifest: dict[str, Any], entry: dict[str, Any], num_shards: int, group: BuildGroup,
                  progress: list[dict[str, Any]]) -> None:
    """Record a written shard: in the manifest (one process), else in this rank's progress file."""
    if group.world_size == 1:  # the manifest is the progress record
        manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["rows"][0])
        if len(manifest["shards"]) == num_shards:
            manifest["complete"] = True
            manifest["stats"] = _stats(manifest)
        write_json_atomic(out / MANIFEST, manifest)
    else:
        progress.append(entry)
        write_json_atomic(out / progress_name(group.rank), {"rank": group.rank, "shards": progress})


def _log_shard(index: int, num_shards: int, n_tok: int, n_bytes: int, t0: float) -> None:
    log.info(
        "shard %d/%d: %d tokens, %.1f B/token, %.0f tokens/s",
        index + 1,
        num_shards,
        n_tok,
        n_bytes / n_tok,
        n_tok / max(time.perf_counter() - t0, 1e-9),
    )


def _offsets_entry(header: dict[str, Any], token_offsets: tuple[Any, Any] | None, texts: Sequence[str] | None,
                   num_sequences: int, seq_len: int) -> bytes | None:
    """Bytes of ``token_offsets.bin`` (None without offsets); records their SHA-256, size and the
    texts' fingerprint in ``header["dataset"]["token_offsets"]`` (so a resume with other offsets or
    texts is refused like one over another corpus)."""
    if token_offsets is None:
        if texts is not None:
            raise ConfigError("texts were given without token_offsets", "pass both (or neither)")
        return None
    if texts is None or isinstance(texts, str) or len(texts) != num_sequences:
        raise ConfigError(f"token_offsets need the {num_sequences} texts the rows were tokenized from",
                          "pass texts=[...] (one string per cached sequence)")
    offsets, lengths = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x) for x in token_offsets)
    if offsets.shape[:2] != (num_sequences, seq_len):
        raise ShapeError(f"token offsets have shape {offsets.shape}, the sequences {(num_sequences, seq_len)}",
                         "pass one (start, end) per token of every cached row")
    blob = encode_offsets(offsets, lengths)
    header["dataset"]["token_offsets"] = {"file": OFFSETS_FILE, "sha256": hashlib.sha256(blob).hexdigest(),
                                          "bytes": len(blob), "text_fingerprint": text_fingerprint(texts)}
    return blob


def _resolve_group(data_parallel: bool | BuildGroup) -> BuildGroup:
    if isinstance(data_parallel, BuildGroup):
        return data_parallel
    return join_launch_group() if data_parallel else BuildGroup()


def _shard_index(entry: dict[str, Any], shard_size: int) -> int:
    return int(entry["rows"][0]) // shard_size


def _write_shard(
    out: Path,
    index: int,
    seqs: Any,
    start: int,
    end: int,
    topk_fn: TopkFn,
    enc: Encoding,
    k: int,
    vocab_size: int,
    batch_size: int,
    tail_samples: int = 0,
    mask: np.ndarray | None = None,
    features: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], int]:
    """Run ``topk_fn`` over rows ``[start, end)`` in batches, write the shard atomically, return
    its manifest entry and size. Batches never cross shards: the bytes depend on the rows only.
    ``mask`` (bool ``[n, T]`` token loss mask): positions whose next token is not trained are
    blanked (:func:`signal_positions`, :func:`blank_positions`)."""
    input_ids = seqs.rows(start, end)
    ids_parts, lp_parts, hidden_parts = [], [], []
    width = k + tail_samples
    for b in range(0, end - start, batch_size):
        batch = torch.as_tensor(input_ids[b : b + batch_size])
        sparse = topk_fn(batch, start + b)
        if features is not None:
            sparse, hidden = sparse
            want = (batch.shape[0], len(features["layers"]), seqs.seq_len, features["hidden_size"])
            if tuple(hidden.shape) != want:
                raise ShapeError(f"the teacher's hidden states for rows {start + b}.. have shape "
                                 f"{tuple(hidden.shape)}, expected {want}", "return [B, layers, T, H]")
            hidden_parts.append(hidden)
        if tuple(sparse.ids.shape) != (batch.shape[0], seqs.seq_len, width):
            raise ShapeError(
                f"the teacher signal for rows {start + b}.. has shape {tuple(sparse.ids.shape)}, "
                f"expected {(batch.shape[0], seqs.seq_len, width)}",
                f"return one list of k={k} top-k (+ tail_samples={tail_samples} sampled) entries per position",
            )
        if sparse.vocab_size != vocab_size:  # the width read off the LM head must be the logits'
            raise ShapeError(f"the teacher signal for rows {start + b}.. covers a vocabulary of {sparse.vocab_size}, "
                             f"the cache was set up for {vocab_size}",
                             "pass OnlineTeacher(model, vocab_size=...) matching the model's logits")
        if tail_samples and sparse.num_exact != k:
            raise ShapeError(
                f"the teacher signal for rows {start + b}.. has num_exact={sparse.num_exact}, expected k={k}",
                "build it with kdforge.losses.signal.sample_tail(logits, k, tail_samples, seeds)",
            )
        ids_parts.append(sparse.ids.cpu().numpy())
        lp_parts.append(sparse.logprobs.cpu().numpy())
    ids = np.concatenate(ids_parts)
    lps = np.concatenate(lp_parts)
    if ids.size and ids.max() >= vocab_size:
        raise CacheError(f"teacher produced id {ids.max()} >= vocab {vocab_size}", "report this bug")
    keep = None
    if mask is not None:
        keep = signal_positions(mask)
        ids, lps = blank_positions(ids, lps, keep)
    sample_ids = sample_counts = None
    if tail_samples:
        ids, sample_ids = ids[..., :k], ids[..., k:]
        lps, sample_counts = lps[..., :k], counts_from_weights(lps[..., k:], tail_samples)
    blob = encode_shard(enc, input_ids, ids, lps, vocab_size, sample_ids, sample_counts)
    feature_entry = None
    if features is not None:  # written before its shard: a listed shard always has its features
        from kdforge.teachers.cache.features import encode_features, feature_name

        fblob, ferr = encode_features(torch.cat(hidden_parts), features["dtype"])
        with atomic_write(out / feature_name(index), "wb") as fh:
            fh.write(fblob)
        feature_entry = {"file": feature_name(index), "bytes": len(fblob),
                         "sha256": hashlib.sha256(fblob).hexdigest(), "max_error": ferr}
    name = shard_name(index)
    with atomic_write(out / name, "wb") as fh:
        fh.write(blob)
    mass = np.exp(lps.astype(np.float64)).sum(-1)
    if keep is not None:
        mass = mass[keep] if keep.any() else np.ones(1)
        lps = lps[keep]
    entry = {
        "file": name,
        "rows": [start, end],
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "topk_mass_sum": float(mass.sum()),
        "topk_mass_min": float(mass.min()),
        "max_quant_error": _max_quant_error(enc, lps),
    }
    if feature_entry is not None:
        entry["features"] = feature_entry
    return entry, len(blob)


def _joined_manifest(out: Path, header: dict[str, Any], rank: int) -> dict[str, Any]:
    """The manifest rank 0 published, checked against this rank's own settings and corpus."""
    manifest = read_manifest(out)
    diff = compat_diff(manifest, header)
    if diff:
        raise CacheError(
            f"rank {rank} builds the teacher cache at {out} with other settings than rank 0 "
            f"(differs in: {', '.join(diff)})",
            "launch every process with the same config, teacher and corpus",
        )
    return manifest


def _merge_progress(out: Path, manifest: dict[str, Any], ranges: Sequence[tuple[int, int]]) -> None:
    """Fold every rank's progress record into ``manifest``, write it once, delete the records."""
    entries = _progress_entries(out)
    shards = _valid_entries(out, [*manifest["shards"], *entries], ranges, manifest["shard_size"], hash_check=False)
    missing = sorted(set(range(len(ranges))) - {_shard_index(e, manifest["shard_size"]) for e in shards})
    manifest["shards"] = shards
    if missing:
        write_json_atomic(out / MANIFEST, manifest)
        raise CacheError(
            f"the ranks finished but shards {missing[:8]} of the teacher cache at {out} are not recorded",
            "rerun the same command: the build resumes and writes the missing shards",
        )
    manifest["complete"] = True
    manifest["stats"] = _stats(manifest)
    write_json_atomic(out / MANIFEST, manifest)
    for path in progress_files(out):
        path.unlink(missing_ok=True)


def _progress_entries(out: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for path in progress_files(out):
        try:
            entries.extend(json.loads(path.read_text(encoding="utf-8"))["shards"])
        except (OSError, ValueError, KeyError, TypeError) as exc:  # written atomically: should not happen
            log.warning("ignoring unreadable progress record %s (%s); its shards are rebuilt", path, exc)
    return entries


def _valid_entries(
    out: Path,
    entries: list[dict[str, Any]],
    ranges: Sequence[tuple[int, int]],
    shard_size: int,
    *,
    hash_check: bool = True,
) -> list[dict[str, Any]]:
    """Entries whose shard file is where, as large and (``hash_check``) as hashed as recorded,
    at most one per shard, sorted by shard."""
    kept: dict[int, dict[str, Any]] = {}
    for entry in entries:
        try:
            index = _shard_index(entry, shard_size)
            expected = index < len(ranges) and entry["rows"] == list(ranges[index]) and entry["file"] == shard_name(index)
        except (KeyError, TypeError, ValueError, IndexError):
            expected = False
        if not expected:
            log.warning("ignoring a malformed shard record in %s: %s", out, entry)
            continue
        if index in kept:
            continue
        path = out / entry["file"]
        files = [(path, entry)]
        if isinstance(entry.get("features"), dict):
            files.append((out / entry["features"]["file"], entry["features"]))
        if all(
            p.is_file() and p.stat().st_size == e["bytes"] and (not hash_check or sha256_file(p) == e["sha256"])
            for p, e in files
        ):
            kept[index] = entry
        else:
            log.warning("shard %s is missing or damaged; it will be rebuilt", entry["file"])
    return [kept[i] for i in sorted(kept)]


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
    loss_tokens = manifest["dataset"].get("loss_tokens")
    total = sum(s["bytes"] for s in shards)
    out = {
        "total_bytes": total,
        "bytes_per_token": total / tokens,
        "topk_mass_mean": sum(s["topk_mass_sum"] for s in shards) / max(loss_tokens or tokens, 1),
        "topk_mass_min": min(s["topk_mass_min"] for s in shards),
        "max_quant_error": max(s["max_quant_error"] for s in shards),
    }
    feats = [s["features"] for s in shards if "features" in s]
    if feats:  # hidden states: their own size and worst decoding error
        out["features_bytes_per_token"] = sum(f["bytes"] for f in feats) / tokens
        out["features_max_error"] = max(f["max_error"] for f in feats)
    offsets = manifest["dataset"].get("token_offsets")
    if offsets is not None:  # cross-tokenizer caches: what the offsets add
        out["offsets_bytes_per_token"] = offsets["bytes"] / tokens
    if loss_tokens is not None:  # a masked cache: mass stats are over the kept positions
        out["bytes_per_loss_token"] = total / max(loss_tokens, 1)
    return out


def as_loss_mask(loss_mask: Any, num_sequences: int, seq_len: int) -> np.ndarray | None:
    """A loss mask as a bool ``[N, T]`` array (None stays None); checks its shape.

    Raises:
        ShapeError: the mask is not ``[N, T]`` like the sequences.
    """
    if loss_mask is None:
        return None
    mask = np.asarray(loss_mask.detach().cpu() if isinstance(loss_mask, torch.Tensor) else loss_mask).astype(bool)
    if mask.shape != (num_sequences, seq_len):
        raise ShapeError(f"the loss mask has shape {mask.shape}, the sequences {(num_sequences, seq_len)}",
                         "pass one bool per token (labels != -100 of the same blocks)")
    return mask


def loss_mask_bytes(mask: np.ndarray) -> bytes:
    """The bytes of ``loss_mask.npy``: ``np.packbits(mask, axis=1)`` as an ``.npy`` file."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.packbits(mask, axis=1), allow_pickle=False)
    return buf.getvalue()


def signal_positions(mask: np.ndarray) -> np.ndarray:
    """Logit positions ``[n, T]`` whose signal a loss reads: ``t`` where token ``t + 1`` is
    trained (the signal at ``t`` predicts token ``t + 1``); the last position never is."""
    keep = np.zeros_like(mask, dtype=bool)
    keep[:, :-1] = mask[:, 1:]
    return keep


def blank_positions(ids: np.ndarray, lps: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace the signal at positions not in ``keep`` by one constant entry: ids ``0``, log-probs
    ``0, BLANK_LOGPROB, ...`` (and, for sampled slots, no draw). Constant rows cost a few bits
    after the compressed encodings' entropy coder; a loss never reads them (their next token is
    not trained)."""
    ids, lps = ids.copy(), lps.copy()
    drop = ~keep
    ids[drop] = 0
    blank = np.full(lps.shape[-1], BLANK_LOGPROB, dtype=lps.dtype)
    if blank.size:
        blank[0] = 0.0
    lps[drop] = blank
    return ids, lps


#: log-prob of the blank entries after the first: finite (no NaN in a loss that multiplies it by a
#: zero mask), and exp() of it is exactly 0 in float32
BLANK_LOGPROB = -1.0e4


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
                "wait for it to finish (under a multi-process launch call the builder on every rank "
                "with data_parallel=True, or on rank 0 only), or delete "
                f"{path} if that process is gone",
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


def _resume_or_start(
    out: Path, header: dict[str, Any], overwrite: bool, ranges: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    """Return the manifest to continue from: the verified shards of an existing build, or ``header``.

    The verified shards are those listed in the manifest or in a rank's progress record whose file
    is intact (size and SHA-256); any other shard file, temp file or progress record is deleted.
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # temp files of an interrupted atomic write
        stale.unlink(missing_ok=True)
    if not (out / MANIFEST).exists():
        if any(out.glob("shard-*.kdc")) and not overwrite:
            raise CacheError(
                f"{out} holds shard files but no manifest",
                "delete the folder, or pass overwrite=True (--overwrite) to rebuild",
            )
        _remove_shards(out, keep=set())
        return header
    try:
        old = read_manifest(out)
    except CacheError:
        if not overwrite:
            raise
        old = None
    diff = [] if old is None else compat_diff(old, header)
    if old is None or diff:
        if not overwrite:
            raise CacheError(
                f"{out} holds a teacher cache built with other settings (differs in: {', '.join(diff)})",
                "choose another output folder, or pass overwrite=True (--overwrite) to rebuild it",
            )
        log.warning("overwriting the teacher cache at %s (differs in: %s)", out, ", ".join(diff) or "manifest")
        (out / MANIFEST).unlink()
        _remove_shards(out, keep=set())
        return header
    records = _progress_entries(out)
    kept = _valid_entries(out, [*old["shards"], *records], ranges, header["shard_size"])
    header["shards"] = kept
    header["complete"] = bool(old.get("complete", False)) and len(kept) == len(old["shards"]) == len(ranges)
    if header["complete"]:
        header["stats"] = old.get("stats", {})
    _remove_shards(out, keep={_shard_index(e, header["shard_size"]) for e in kept})
    if records:  # a killed data-parallel build: record its finished shards before dropping the records
        write_json_atomic(out / MANIFEST, header)
        for path in progress_files(out):
            path.unlink(missing_ok=True)
    return header


def _remove_shards(out: Path, keep: set[int]) -> None:
    """Delete shard files whose index is not in ``keep``, and every progress record."""
    for path in [*out.glob("shard-*.kdc"), *out.glob("features-*.kdf")]:
        try:
            index = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if index not in keep:
            path.unlink()
    if not keep:
        for path in progress_files(out):
            path.unlink(missing_ok=True)
