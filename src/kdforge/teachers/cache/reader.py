"""Read a teacher cache: memory-mapped, random access per sequence, validated on open.

Opening checks the manifest (complete build, known format), every shard's size (always: a
truncated shard is caught even when ``verify=False``) and by default every shard's SHA-256.
Reads memory-map the shard files; uncompressed encodings are zero-copy record views, compressed
ones decode one sequence from its frame.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.errors import CacheError
from kdforge.io import sha256_file
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.cache.codec import Encoding, RecordCompressor, decode_record, record_dtype
from kdforge.teachers.cache.format import (
    INDEX_MAGIC,
    LOSS_MASK,
    MANIFEST,
    as_sequences,
    manifest_value,
    read_manifest,
)
from kdforge.teachers.cache.offsets import decode_offsets

log = logging.getLogger(__name__)


def _rebuild_fix(cache_dir: Path) -> str:
    return (
        f"rebuild it: rerun `kdforge cache-teacher` with the same config (damaged shards are "
        f"detected and rewritten), or delete {cache_dir} and build again"
    )


class TeacherCache:
    """A finished teacher cache opened for reading.

    Args:
        cache_dir: folder with ``manifest.json`` and shards.
        verify: check every shard's SHA-256 on open (default). Sizes are always checked.

    Attributes:
        manifest: the parsed manifest (teacher, tokenizer, dataset fingerprints, stats...).
    """

    def __init__(self, cache_dir: str | Path, *, verify: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        m = self.manifest
        if not m.get("complete"):
            done = len(m.get("shards", []))
            raise CacheError(
                f"the teacher cache at {self.cache_dir} is unfinished ({done} shards written)",
                "rerun the same `kdforge cache-teacher` command: it resumes where it stopped",
            )
        self.encoding = Encoding(**m["encoding"])
        self.seq_len = int(m["dataset"]["seq_len"])
        self.k = int(m["k"])
        self.tail_samples = int(manifest_value(m, "tail_samples"))
        self.vocab_size = int(m["vocab_size"])
        self.dtype = record_dtype(self.encoding, self.seq_len, self.k, self.vocab_size, self.tail_samples)
        if self.dtype.itemsize != m["record_bytes"]:
            raise CacheError(
                f"{self.cache_dir / MANIFEST} says records have {m['record_bytes']} bytes, expected {self.dtype.itemsize}",
                _rebuild_fix(self.cache_dir),
            )
        self._shards = m["shards"]
        self._starts = [s["rows"][0] for s in self._shards]
        for shard in self._shards:
            self._check_shard(shard, verify)
        self._maps: dict[int, Any] = {}
        self._compressor: RecordCompressor | None = None
        self._mask = self._read_loss_mask()
        self._offsets = self._read_token_offsets()

    def _read_loss_mask(self) -> np.ndarray | None:
        """The bool ``[N, T]`` loss mask of a masked cache (checked against its SHA-256), else None."""
        want = self.manifest["dataset"].get("loss_mask_sha256")
        if want is None:
            return None
        path = self.cache_dir / LOSS_MASK
        if not path.is_file():
            raise CacheError(f"the teacher cache at {self.cache_dir} is masked but {LOSS_MASK} is missing",
                             _rebuild_fix(self.cache_dir))
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != want:
            raise CacheError(f"{path} is corrupted (SHA-256 does not match the manifest)", _rebuild_fix(self.cache_dir))
        packed = np.load(io.BytesIO(blob), allow_pickle=False)
        return np.unpackbits(packed, axis=1, count=self.seq_len).astype(bool)

    def _read_token_offsets(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(offsets [N, T, 2], lengths [N])`` of a cache built with token offsets (checked
        against their SHA-256), else None."""
        entry = self.manifest["dataset"].get("token_offsets")
        if entry is None:
            return None
        path = self.cache_dir / entry["file"]
        if not path.is_file():
            raise CacheError(f"the teacher cache at {self.cache_dir} has token offsets but {entry['file']} is missing",
                             _rebuild_fix(self.cache_dir))
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise CacheError(f"{path} is corrupted (SHA-256 does not match the manifest)", _rebuild_fix(self.cache_dir))
        offsets, lengths = decode_offsets(blob, str(path))
        if offsets.shape[:2] != (len(self), self.seq_len):
            raise CacheError(f"{path} holds offsets {offsets.shape}, the cache {len(self)} x {self.seq_len} tokens",
                             _rebuild_fix(self.cache_dir))
        return offsets, lengths

    @property
    def feature_layers(self) -> list[int] | None:
        """The ``hidden_states`` layers whose teacher hidden states the cache stores (None: none)."""
        f = self.manifest.get("features")
        return None if f is None else [int(x) for x in f["layers"]]

    def features(self, index: int) -> np.ndarray:
        """float32 ``[F, T, H]``: the teacher's hidden states of :attr:`feature_layers` for
        sequence ``index`` (decoded from bf16 / int8 / fp32; error bound in ``stats.features_max_error``).

        Raises:
            CacheError: the cache stores no hidden states.
        """
        from kdforge.teachers.cache.features import decode_features

        f = self.manifest.get("features")
        if f is None:
            raise CacheError(f"the teacher cache at {self.cache_dir} stores no hidden states",
                             "rebuild it with feature_layers=[...] (cache config: feature_layers), or train the "
                             "feature terms with the live teacher")
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)})")
        s = bisect.bisect_right(self._starts, index) - 1
        key = ("features", s)
        raw = self._maps.get(key)
        if raw is None:
            raw = self._maps[key] = np.memmap(self.cache_dir / self._shards[s]["features"]["file"], dtype=np.uint8,
                                               mode="r")
        rows = self._shards[s]["rows"]
        return decode_features(raw, f["dtype"], rows[1] - rows[0], len(f["layers"]), self.seq_len,
                               int(f["hidden_size"]), row=index - rows[0])

    @property
    def has_token_offsets(self) -> bool:
        """Whether the cache stores the teacher's token character offsets (cross-tokenizer use)."""
        return self._offsets is not None

    @property
    def text_fingerprint(self) -> str | None:
        """SHA-256 of the texts a cache with token offsets was tokenized from (else None)."""
        entry = self.manifest["dataset"].get("token_offsets")
        return None if entry is None else entry["text_fingerprint"]

    def token_offsets(self, index: int) -> tuple[np.ndarray, int]:
        """``(offsets int64 [T, 2], length)`` of sequence ``index``: each teacher token's character
        span in its text, and how many tokens are real (the rest is padding).

        Raises:
            CacheError: the cache was built without token offsets.
        """
        if self._offsets is None:
            raise CacheError(
                f"the teacher cache at {self.cache_dir} stores no token offsets, so it cannot be aligned to a "
                "student with another tokenizer",
                "rebuild it from the texts with kdforge.teachers.cache.build_cross_tokenizer_cache (or "
                "build_teacher_cache(..., token_offsets=, texts=)); the recipe cross_tokenizer_kd with "
                "teacher_source: cache does this for you",
            )
        offsets, lengths = self._offsets
        return offsets[index], int(lengths[index])

    @property
    def masked(self) -> bool:
        """Whether the cache stores a loss mask (response-only data)."""
        return self._mask is not None

    def loss_mask(self, index: int) -> np.ndarray | None:
        """Bool ``[T]``: which tokens of sequence ``index`` are trained (None: all of them). The
        signal at logit position ``t`` is meaningful only where token ``t + 1`` is trained."""
        return None if self._mask is None else self._mask[index]

    @property
    def num_exact(self) -> int | None:
        """``k`` when the cache carries sampled tail entries (a sampled signal), else None."""
        return self.k if self.tail_samples else None

    @property
    def entries(self) -> int:
        """Entries per position a read returns: ``k`` exact + ``tail_samples`` sampled."""
        return self.k + self.tail_samples

    # -- validation ----------------------------------------------------------------------------
    def _check_shard(self, shard: dict[str, Any], verify: bool) -> None:
        path = self.cache_dir / shard["file"]
        if not path.is_file():
            raise CacheError(f"cache shard {shard['file']} is missing from {self.cache_dir}", _rebuild_fix(self.cache_dir))
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise CacheError(
                f"cache shard {shard['file']} is truncated or damaged: {size} bytes on disk, "
                f"{shard['bytes']} in the manifest",
                _rebuild_fix(self.cache_dir),
            )
        if verify and sha256_file(path) != shard["sha256"]:
            raise CacheError(
                f"cache shard {shard['file']} is corrupted (SHA-256 does not match the manifest)",
                _rebuild_fix(self.cache_dir),
            )
        feats = shard.get("features")
        if feats is not None:
            fpath = self.cache_dir / feats["file"]
            if not fpath.is_file() or fpath.stat().st_size != feats["bytes"]:
                raise CacheError(f"cache features file {feats['file']} is missing or truncated in {self.cache_dir}",
                                 _rebuild_fix(self.cache_dir))
            if verify and sha256_file(fpath) != feats["sha256"]:
                raise CacheError(f"cache features file {feats['file']} is corrupted (SHA-256 does not match the "
                                 "manifest)", _rebuild_fix(self.cache_dir))

    def check_compatible(
        self, *, teacher: Any = None, tokenizer: Any = None, sequences: Any = None
    ) -> None:
        """Raise CacheError if the cache was built by another teacher, tokenizer or corpus.

        Args:
            teacher: an :class:`~kdforge.teachers.online.OnlineTeacher`, a module, or a weights
                SHA-256 string.
            tokenizer: a tokenizer or a fingerprint string.
            sequences: the token sequences the caller will train on.
        """
        m = self.manifest
        if teacher is not None:
            from kdforge.teachers.online import OnlineTeacher, model_weights_hash

            if isinstance(teacher, str):
                got = teacher
            elif isinstance(teacher, OnlineTeacher):
                got = teacher.weights_hash()
            else:
                got = model_weights_hash(teacher)
            if got != m["teacher"]["weights_sha256"]:
                raise CacheError(
                    f"the cache at {self.cache_dir} was built by another teacher "
                    f"({m['teacher']['id']}, weights {m['teacher']['weights_sha256'][:12]}…; this teacher: {got[:12]}…)",
                    "rebuild the cache with this teacher (kdforge cache-teacher), or use the teacher it was built with",
                )
        if tokenizer is not None:
            from kdforge.teachers.vocab import tokenizer_fingerprint

            got = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
            want = (m.get("tokenizer") or {}).get("fingerprint")
            if want is None:
                log.warning("the cache at %s records no tokenizer; cannot check it", self.cache_dir)
            elif got != want:
                raise CacheError(
                    f"the cache at {self.cache_dir} was built with another tokenizer "
                    f"(fingerprint {want[:12]}…, given {got[:12]}…); its token ids mean other strings",
                    "rebuild the cache with the student's tokenizer family, or use cross-tokenizer distillation",
                )
        if sequences is not None:
            got = as_sequences(sequences).fingerprint()
            if got != m["dataset"]["fingerprint"]:
                raise CacheError(
                    f"the cache at {self.cache_dir} was built over other token sequences "
                    f"(dataset fingerprint {m['dataset']['fingerprint'][:12]}…, given {got[:12]}…)",
                    "rebuild the cache over this corpus (same tokenizer, seq_len and order), or train on the cached corpus",
                )

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["dataset"]["num_sequences"])

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own maps
        state = self.__dict__.copy()
        state["_maps"] = {}
        state["_compressor"] = None
        return state

    def _shard_map(self, index: int) -> Any:
        mm = self._maps.get(index)
        if mm is None:
            shard = self._shards[index]
            path = self.cache_dir / shard["file"]
            n = shard["rows"][1] - shard["rows"][0]
            if self.encoding.compression is None:
                mm = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))
            else:
                raw = np.memmap(path, dtype=np.uint8, mode="r")
                n_frames = n + (1 if self.encoding.id_remap else 0)
                tail = len(INDEX_MAGIC) + 8 * (n_frames + 1)
                if bytes(raw[-len(INDEX_MAGIC):]) != INDEX_MAGIC:
                    raise CacheError(f"cache shard {shard['file']} has no record index", _rebuild_fix(self.cache_dir))
                offsets = np.frombuffer(bytes(raw[-tail : -len(INDEX_MAGIC)]), dtype="<u8")
                table = None
                if self.encoding.id_remap:
                    idt = self.dtype["ids"].base
                    blob = self._codec().decompress_blob(
                        raw[int(offsets[n]) : int(offsets[n + 1])], self.vocab_size * idt.itemsize
                    )
                    table = np.frombuffer(blob, dtype=idt).astype(np.int64)
                mm = (raw, offsets, table)
            self._maps[index] = mm
        return mm

    def record(self, index: int) -> np.ndarray:
        """Raw record (numpy structured scalar) of sequence ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)})")
        s = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[s]
        mm = self._shard_map(s)
        if self.encoding.compression is None:
            return mm[local]
        raw, offsets, table = mm
        try:
            data = self._codec().decompress(raw[int(offsets[local]) : int(offsets[local + 1])])
        except CacheError as exc:
            raise CacheError(
                f"cache shard {self._shards[s]['file']}, sequence {index}: {exc.problem}",
                _rebuild_fix(self.cache_dir),
            ) from None
        rec = np.frombuffer(data, dtype=self.dtype).copy()
        if table is not None:
            fields = [f for f in ("input_ids", "ids", "sids") if f in (self.dtype.names or ())]
            if any(rec[f].size and int(rec[f].max()) >= len(table) for f in fields):
                raise CacheError(
                    f"cache shard {self._shards[s]['file']}, sequence {index}: id rank outside the shard's table",
                    _rebuild_fix(self.cache_dir),
                )
            for f in fields:
                rec[f] = table[rec[f]]
        return rec[0]

    def _codec(self) -> RecordCompressor:
        if self._compressor is None:
            self._compressor = RecordCompressor(self.encoding, self.dtype)
        return self._compressor

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids int64 [T], ids int64 [T, e], logprobs float32 [T, e])`` of sequence
        ``index``, ``e = k + tail_samples`` (:attr:`entries`; sampled entries carry log weights)."""
        return decode_record(self.encoding, self.record(index))

    def sparse(self, index: int) -> SparseTeacher:
        """The cached teacher signal of one sequence as a :class:`SparseTeacher` ``[T, e]``
        (``num_exact = k`` when the cache has sampled tail entries)."""
        _, ids, lp = self.read(index)
        return SparseTeacher(torch.from_numpy(ids), torch.from_numpy(lp), self.vocab_size, self.num_exact)

    @property
    def bytes_per_token(self) -> float:
        return sum(s["bytes"] for s in self._shards) / self.manifest["dataset"]["num_tokens"]


def open_teacher_cache(cache_dir: str | Path, *, verify: bool = True) -> TeacherCache:
    """Open a finished cache for reading (see :class:`TeacherCache`)."""
    return TeacherCache(cache_dir, verify=verify)
