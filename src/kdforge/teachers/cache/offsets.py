"""The teacher's token character offsets stored with a cache (for cross-tokenizer KD).

A cache replays the teacher's top-k at *its* token positions. A student with another tokenizer
needs to know which characters each teacher token covers to align the two tokenizations
(:func:`kdforge.teachers.alignment.align_offsets`). A cache built with offsets stores, per
sequence ``i``:

* ``offsets[i]`` int ``[T, 2]``: character ``(start, end)`` of each teacher token in the text the
  teacher read (special tokens and padding zero-width), and
* ``lengths[i]``: the number of real teacher tokens (the rest of the fixed-length row is padding);

plus, in the manifest, the SHA-256 of the texts (``text_fingerprint``), so that the student is
trained on exactly the texts the teacher read.

File ``token_offsets.bin`` (written once, atomically, before the shards; its SHA-256 is in the
manifest's ``dataset.token_offsets`` and checked on open, like ``loss_mask.npy``): zlib of an
``.npy`` int32 array ``[N, T + 1, 2]`` whose row ``i`` is ``(length, 0)`` then the *delta* form of
the offsets, ``(start_j - end_{j-1}, end_j - start_j)`` with ``end_{-1} = 0`` (gaps and token
lengths: small, mostly repeated numbers, so zlib stores them in ~1 byte per token instead of 8).
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Sequence

import numpy as np

from kdforge.errors import CacheError, ShapeError

__all__ = ["OFFSETS_FILE", "decode_offsets", "encode_offsets", "text_fingerprint"]

OFFSETS_FILE = "token_offsets.bin"


def text_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 of ``N`` and every text (UTF-8, each prefixed by its byte length)."""
    h = hashlib.sha256(f"{len(texts)}\n".encode())
    for text in texts:
        raw = text.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def encode_offsets(offsets: np.ndarray, lengths: np.ndarray) -> bytes:
    """Bytes of ``token_offsets.bin`` for int offsets ``[N, T, 2]`` and lengths ``[N]``.

    Raises:
        ShapeError: shapes disagree, a length exceeds ``T``, or an offset is negative.
    """
    off = np.asarray(offsets, dtype=np.int64)
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if off.ndim != 3 or off.shape[-1] != 2 or len(lens) != len(off):
        raise ShapeError(f"token offsets must be [N, T, 2] with N lengths, got {off.shape} and {lens.shape}",
                         "pass the teacher tokenizer's offset_mapping padded to the sequences' length")
    if lens.size and (lens.min() < 0 or lens.max() > off.shape[1]) or (off.size and off.min() < 0):
        raise ShapeError("token offsets must be >= 0 and lengths within [0, T]", "check the teacher's tokenization")
    prev_end = np.concatenate([np.zeros_like(off[:, :1, 1]), off[:, :-1, 1]], axis=1)
    delta = np.stack([off[..., 0] - prev_end, off[..., 1] - off[..., 0]], axis=-1)
    head = np.stack([lens, np.zeros_like(lens)], axis=-1)[:, None]
    buf = io.BytesIO()
    np.save(buf, np.concatenate([head, delta], axis=1).astype("<i4"), allow_pickle=False)
    return zlib.compress(buf.getvalue(), 9)


def decode_offsets(blob: bytes, where: str = "token_offsets.bin") -> tuple[np.ndarray, np.ndarray]:
    """``(offsets int64 [N, T, 2], lengths int64 [N])`` from :func:`encode_offsets`'s bytes."""
    try:
        arr = np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False).astype(np.int64)
    except (zlib.error, ValueError, OSError) as exc:
        raise CacheError(f"{where} is unreadable ({exc})", "rebuild the cache") from None
    lengths, delta = arr[:, 0, 0], arr[:, 1:]
    ends = np.cumsum(delta[..., 0] + delta[..., 1], axis=1)
    return np.stack([ends - delta[..., 1], ends], axis=-1), lengths
