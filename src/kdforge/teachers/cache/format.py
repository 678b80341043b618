"""On-disk layout of a teacher cache (format version 1).

A cache is a folder::

    manifest.json        # everything needed to read and validate the cache (below)
    shard-00000.kdc      # records of sequences [0, shard_size)
    shard-00001.kdc      # ...

Shard files:

* uncompressed encodings: ``n`` fixed-size records back to back (``np.memmap`` with the record
  dtype, zero-copy random access);
* compressed encodings: ``n`` compressed records back to back, then ``n + 1`` little-endian
  uint64 byte offsets, then the 8-byte magic ``KDCIDX01``.

``manifest.json`` keys: ``format``, ``format_version``, ``complete``, ``teacher`` (``id``,
``weights_sha256``, ``dtype``), ``tokenizer`` (``fingerprint``, ``size``, or null),
``vocab_size``, ``k``, ``tail_samples`` (``m`` sampled tail draws per position, 0 = none; absent
in caches written before it existed, read as 0) and ``sample_seed``, ``encoding`` (codec
parameters), ``id_dtype``, ``tail_policy``,
``dataset`` (``fingerprint`` = SHA-256 of the token ids, ``num_sequences``, ``seq_len``,
``num_tokens``; a masked cache adds ``loss_mask_sha256`` of ``loss_mask.npy`` and ``loss_tokens``,
the number of logit positions whose next token is trained), ``shard_size``, ``record_bytes``, ``shards`` (per shard: ``file``, ``rows``
``[start, end)``, ``bytes``, ``sha256``, ``topk_mass_sum``, ``max_quant_error``; with hidden
states also ``features``: ``file``, ``bytes``, ``sha256``, ``max_error``), ``stats``. Optional:
``features`` (``layers``, ``dtype``, ``hidden_size``, ``num_layers``: hidden states stored per
shard, :mod:`kdforge.teachers.cache.features`) and ``dataset.token_offsets`` (the teacher's token
character offsets, :mod:`kdforge.teachers.cache.offsets`). Neither changes the shards, so neither
raises the format version: an older kdforge reads such a cache as a plain top-k cache.

The manifest is rewritten atomically after every shard, so it always describes exactly the
shards that are complete on disk: an interrupted build writes only the missing shards. A
data-parallel build (:mod:`kdforge.teachers.cache.parallel`) also leaves ``.progress-rank<R>.json``
files (the shards each rank finished) until rank 0 merges them into the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.errors import CacheError, DataError

FORMAT_NAME = "kdforge-teacher-cache"
#: newest format this kdforge writes; 2 = version 1 + sampled tail slots (``tail_samples > 0``);
#: 3 = a loss mask (``loss_mask.npy``: response-only positions; the signal elsewhere is blanked).
#: A cache without samples or mask is still written as version 1, so older kdforge reads it; a
#: masked cache is version 3 so that older kdforge refuses it instead of training on blanks.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
#: the loss mask of a masked cache: ``np.packbits`` of the bool ``[N, T]`` token mask along ``T``
LOSS_MASK = "loss_mask.npy"
INDEX_MAGIC = b"KDCIDX01"
TAIL_POLICY = (
    "top-k log-probs are normalised over the full vocabulary at T=1; the tail mass "
    "1 - sum_k p_k is stored per position (compact encodings, 16-bit) or derivable exactly from "
    "the log-probs (raw encodings). Losses choose how to use it (sparse_policy)."
)
#: manifest keys that must match for a build to resume into an existing folder
COMPAT_KEYS = ("format_version", "teacher", "tokenizer", "vocab_size", "k", "encoding", "dataset", "shard_size",
               "tail_samples", "sample_seed", "features")
#: values of keys that manifests written before they existed lack
KEY_DEFAULTS = {"tail_samples": 0, "sample_seed": 0, "features": None}


def format_version_for(tail_samples: int, masked: bool = False) -> int:
    """Version a new cache is written with: 3 with a loss mask, 2 with samples, else 1 (readable
    by older kdforge)."""
    return 3 if masked else 2 if tail_samples else 1


def manifest_value(manifest: dict[str, Any], key: str) -> Any:
    """``manifest[key]``, or the default of keys added after version 1 (old manifests lack them)."""
    return manifest.get(key, KEY_DEFAULTS.get(key))


def compat_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The :data:`COMPAT_KEYS` whose values differ between two manifests (defaults applied)."""
    return [key for key in COMPAT_KEYS if manifest_value(old, key) != manifest_value(new, key)]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.kdc"


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json``; CacheError if missing or unreadable."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"no teacher cache at {cache_dir} ({MANIFEST} is missing)",
            "build it with `kdforge cache-teacher CONFIG.yaml` or build_teacher_cache(...)",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(
            f"{path} is unreadable: {exc}", "delete the cache folder and rebuild it"
        ) from None
    if manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path} is not a kdforge teacher cache manifest", "point to a cache folder")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CacheError(
            f"{path} has format version {manifest.get('format_version')}, this kdforge reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}",
            "rebuild the cache with this kdforge version",
        )
    return manifest


# ---- token sequences --------------------------------------------------------------------------

class TokenSequences:
    """Random-access view of fixed-length token sequences ``[N, T]``.

    Accepts a LongTensor / numpy array ``[N, T]``, a ``datasets.Dataset`` with an ``input_ids``
    column, a list of equal-length id lists, or any iterable of those rows (materialised).
    """

    def __init__(self, sequences: Any) -> None:
        self._hf = None
        if isinstance(sequences, torch.Tensor):
            arr = sequences.detach().cpu().numpy()
        elif isinstance(sequences, np.ndarray):
            arr = sequences
        elif _is_hf_dataset(sequences):
            if "input_ids" not in sequences.column_names:
                raise DataError(
                    f"the dataset has columns {sequences.column_names}, no 'input_ids'",
                    "tokenize and pack it first (kdforge.teachers.cache.pack_tokens)",
                )
            self._hf = sequences.with_format("numpy", columns=["input_ids"])
            arr = None
        else:
            rows = [list(r["input_ids"]) if isinstance(r, dict) else list(r) for r in sequences]
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise DataError(
                    f"sequences have different lengths {sorted(lengths)[:5]}; the cache needs fixed-length blocks",
                    "pack the corpus into blocks of seq_len tokens (kdforge.teachers.cache.pack_tokens)",
                )
            arr = np.asarray(rows, dtype=np.int64)
        if arr is not None:
            if arr.ndim != 2:
                raise DataError(
                    f"sequences must be [num_sequences, seq_len], got shape {arr.shape}",
                    "pack the corpus into fixed-length blocks",
                )
            self._arr = arr
            self.num_sequences, self.seq_len = int(arr.shape[0]), int(arr.shape[1])
        else:
            self._arr = None
            self.num_sequences = len(self._hf)
            first = np.asarray(self._hf[0]["input_ids"]) if self.num_sequences else np.zeros(0)
            self.seq_len = int(first.shape[0])
        if self.num_sequences == 0 or self.seq_len == 0:
            raise DataError("the corpus holds no tokens", "check the corpus path and the tokenizer")

    def __len__(self) -> int:
        return self.num_sequences

    def rows(self, start: int, end: int) -> np.ndarray:
        """int64 ``[end - start, T]``."""
        if self._arr is not None:
            out = np.asarray(self._arr[start:end], dtype=np.int64)
        else:
            batch = self._hf[start:end]["input_ids"]
            try:
                out = np.asarray(batch, dtype=np.int64)
            except ValueError:
                out = np.zeros((0,))
            if out.ndim != 2 or out.shape[1] != self.seq_len:
                raise DataError(
                    f"rows {start}..{end} do not all have {self.seq_len} tokens",
                    "pack the corpus into fixed-length blocks",
                )
        if out.size and out.min() < 0:
            raise DataError("token ids must be >= 0", "check the tokenized corpus")
        return out

    def fingerprint(self, chunk: int = 4096) -> str:
        """SHA-256 of ``N``, ``T`` and every token id as little-endian int64."""
        h = hashlib.sha256(f"{self.num_sequences}x{self.seq_len}\n".encode())
        for start in range(0, self.num_sequences, chunk):
            h.update(np.ascontiguousarray(self.rows(start, start + chunk), dtype="<i8").tobytes())
        return h.hexdigest()


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "column_names")


def as_sequences(sequences: Any) -> TokenSequences:
    return sequences if isinstance(sequences, TokenSequences) else TokenSequences(sequences)


def shard_ranges(num_sequences: int, shard_size: int) -> Sequence[tuple[int, int]]:
    return [(s, min(s + shard_size, num_sequences)) for s in range(0, num_sequences, shard_size)]
