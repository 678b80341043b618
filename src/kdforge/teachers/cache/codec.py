"""Encodings of the top-k teacher signal: id types, log-prob quantisation, entropy coding.

One *record* holds one sequence of ``T`` positions as a numpy structured array with the fields

=============  ===========  ====================================================================
field          shape        content
=============  ===========  ====================================================================
``input_ids``  ``[T]``      the token ids the teacher read (uint16 if vocab <= 65,536 else uint32)
``ids``        ``[T, k]``   top-k token ids per logit position, by decreasing probability
``logprobs``   ``[T, k]``   float32 / float16 log-probs, or uint8 codes (see below)
``tail``       ``[T]``      uint16 code of the tail mass ``1 - sum_k p_k`` (compact encodings)
``sids``       ``[T, m]``   sampled tail ids (only when the cache has ``tail_samples = m > 0``)
``scounts``    ``[T, m]``   uint8 draw counts of ``sids`` (0 = unused slot, id repeated)
=============  ===========  ====================================================================

Sampled tail (``tail_samples = m``): ``m`` draws from the teacher's renormalised tail per position
(:func:`kdforge.losses.signal.sample_tail`), stored as distinct ids + counts; the decoder turns
them into log weights ``log(r * c / m)`` with ``r`` the decoded tail mass, so the decoded
``k + m`` entries sum to 1 exactly and are an unbiased estimate of the teacher's distribution.
Compressed encodings store the drawn ids of a position sorted (by shard rank; unused slots
repeat the last id), delta-coded along ``m`` and split into byte planes before the coder sees
them: drawn tail tokens are rare, so their ranks are large and spread, and this layout cut their
bytes by ~15% (measured on SmolLM2, k=8 + 16 draws).

Log-prob quantisation (``compact-u8*``): ``code = round(255 * lp / lp_min)`` clipped to
``[0, 255]``, with ``lp_min = -20`` by default, i.e. a uniform grid in log space with step
``|lp_min| / 255 ~= 0.078`` nats: every top-k probability is kept within a relative error of
``exp(0.039) - 1 ~= 4%``; probabilities below ``e^-20 ~= 2e-9`` saturate (their mass is
negligible). The exact tail mass is stored on a 16-bit grid (step 1.5e-5) and the decoder
rescales the dequantised top-k probabilities so that ``sum_k p_k + tail = 1`` exactly: the
quantisation noise never leaks into the tail bucket that sparse KD losses use.

Entropy coding (``*-zstd``, ``*-zlib``): each record is compressed on its own (so a random
access reads and decodes one sequence). Before compression the uint8 log-prob codes are
delta-coded along k (``delta``): sorted by decreasing probability they rise monotonically, so the
differences are small numbers the coder packs into ~3 bits instead of ~6 (measured on SmolLM2:
-30% on the log-prob bytes). A byte-plane shuffle of multi-byte fields (``shuffle``) is
available but off: measured, it does not help raw token ids. Token ids are stored as their
frequency rank within the shard (``id_remap``; the rank -> id table is one extra frame per shard):
a handful of tokens (punctuation, "the", "and") fill most top-k lists, and small ranks compress far
better than scattered BPE ids (measured: -15% on the id bytes).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kdforge.errors import CacheError, ConfigError
from kdforge.registry import Registry

TAIL_SCALE = 65535.0


@dataclass(frozen=True)
class Encoding:
    """How a top-k record is stored.

    Attributes:
        name: registry name (``"compact-u8-zstd"``).
        logprob_dtype: ``"float32"`` (lossless), ``"float16"`` or ``"uint8"`` (quantised).
        compression: ``None``, ``"zstd"`` or ``"zlib"`` (per-record, lossless).
        level: compression level.
        logprob_min: lower end of the uint8 log-prob grid (nats).
        shuffle: byte-plane shuffle of multi-byte fields before compression.
        delta: delta-code uint8 log-prob codes along k before compression (mod 256, exact).
        id_remap: store token ids as their frequency rank within the shard (a per-shard table
            maps ranks back to ids), so frequent tokens get small numbers the coder packs tightly.
    """

    name: str
    logprob_dtype: str
    compression: str | None = None
    level: int = 3
    logprob_min: float = -20.0
    shuffle: bool = False
    delta: bool = False
    id_remap: bool = False

    @property
    def stores_tail(self) -> bool:
        return self.logprob_dtype == "uint8"

    @property
    def lossless(self) -> bool:
        return self.logprob_dtype == "float32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ENCODINGS: Registry[Encoding] = Registry("cache encoding")
for _enc, _desc in [
    (Encoding("raw-fp32", "float32"), "lossless: compact ids + float32 log-probs (8 B per top-k entry with uint16 ids)"),
    (Encoding("raw-fp16", "float16"), "compact ids + float16 log-probs (4 B per entry)"),
    (Encoding("compact-u8", "uint8"), "compact ids + uint8 log-prob codes + 16-bit tail mass (3 B per entry), memory-mappable"),
    (Encoding("compact-u8-zstd", "uint8", "zstd", 10, delta=True, id_remap=True), "compact-u8 then per-sequence zstd (default; needs the zstandard package)"),
    (Encoding("compact-u8-zlib", "uint8", "zlib", 6, delta=True, id_remap=True), "compact-u8 then per-sequence zlib (standard library only)"),
    (Encoding("raw-fp16-zstd", "float16", "zstd", 10), "raw-fp16 then per-sequence zstd"),
]:
    ENCODINGS.register(_enc.name, _desc)(_enc)


def get_encoding(name: str | Encoding) -> Encoding:
    """Look an encoding up by name (ConfigError listing the known ones if unknown)."""
    return name if isinstance(name, Encoding) else ENCODINGS.get(name)


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned type holding ids ``< vocab_size``: uint16 up to 65,536, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def record_dtype(encoding: Encoding, seq_len: int, k: int, vocab_size: int, tail_samples: int = 0) -> np.dtype:
    """Packed structured dtype of one record (one sequence); ``tail_samples`` adds ``sids``/``scounts``."""
    idt = id_dtype(vocab_size)
    lpt = {"float32": "<f4", "float16": "<f2", "uint8": "u1"}[encoding.logprob_dtype]
    fields: list[tuple[str, Any, tuple[int, ...]]] = [
        ("input_ids", idt, (seq_len,)),
        ("ids", idt, (seq_len, k)),
        ("logprobs", np.dtype(lpt), (seq_len, k)),
    ]
    if encoding.stores_tail:
        fields.append(("tail", np.dtype("<u2"), (seq_len,)))
    if tail_samples:
        fields.append(("sids", idt, (seq_len, tail_samples)))
        fields.append(("scounts", np.dtype("u1"), (seq_len, tail_samples)))
    return np.dtype(fields)


def counts_from_weights(log_weights: np.ndarray, m: int) -> np.ndarray:
    """Sampled-slot log weights ``log(r * c / m)`` ``[..., m]`` -> uint8 counts ``c``.

    ``r`` is recovered as the sum of the weights (the counts sum to ``m``, or to 0 when nothing was
    drawn). Raises CacheError when the weights are not multiples of ``r / m`` (not a sample of
    ``m`` draws).
    """
    w = np.exp(log_weights.astype(np.float64))
    total = w.sum(-1, keepdims=True)
    scaled = np.where(total > 0, w * m / np.where(total > 0, total, 1.0), 0.0)
    counts = np.rint(scaled)
    if np.abs(scaled - counts).max(initial=0.0) > 1e-3:
        raise CacheError(
            "sampled teacher entries are not m draws with replacement (weights are not multiples of tail/m)",
            "produce the signal with kdforge.losses.signal.sample_tail, or with weights r * count / m",
        )
    return counts.astype(np.uint8)


def quantize_logprobs(logprobs: np.ndarray, logprob_min: float) -> np.ndarray:
    """float log-probs (``<= 0``, ``-inf`` allowed) -> uint8 codes on ``[logprob_min, 0]``."""
    scaled = np.nan_to_num(logprobs.astype(np.float64), neginf=logprob_min) * (255.0 / logprob_min)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def dequantize_logprobs(codes: np.ndarray, logprob_min: float) -> np.ndarray:
    return codes.astype(np.float32) * np.float32(logprob_min / 255.0)


def encode_records(
    encoding: Encoding,
    input_ids: np.ndarray,
    ids: np.ndarray,
    logprobs: np.ndarray,
    vocab_size: int,
    sample_ids: np.ndarray | None = None,
    sample_counts: np.ndarray | None = None,
) -> np.ndarray:
    """Pack ``[n, T]`` input ids and ``[n, T, k]`` top-k ids/log-probs (plus, for a sampled tail,
    ``[n, T, m]`` sampled ids and counts) into ``[n]`` records."""
    n, seq_len, k = ids.shape
    m = 0 if sample_ids is None else sample_ids.shape[-1]
    rec = np.zeros(n, dtype=record_dtype(encoding, seq_len, k, vocab_size, m))
    rec["input_ids"] = input_ids
    rec["ids"] = ids
    lp = logprobs.astype(np.float32)
    if encoding.logprob_dtype == "uint8":
        rec["logprobs"] = quantize_logprobs(lp, encoding.logprob_min)
        tail = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(-1), 0.0, 1.0)
        rec["tail"] = np.rint(tail * TAIL_SCALE).astype(np.uint16)
    else:
        rec["logprobs"] = lp
    if m:
        rec["sids"] = sample_ids
        rec["scounts"] = sample_counts
    return rec


def frequency_table(*arrays: np.ndarray) -> np.ndarray:
    """Distinct values of ``arrays`` by decreasing count (ties by value): the rank -> id table."""
    values, counts = np.unique(np.concatenate([a.reshape(-1) for a in arrays]), return_counts=True)
    return values[np.lexsort((values, -counts))]


def decode_record(encoding: Encoding, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One record -> ``(input_ids int64 [T], ids int64 [T, k(+m)], logprobs float32 [T, k(+m)])``.

    For quantised encodings the top-k probabilities are rescaled so they sum to ``1 - tail``.
    A record with sampled tail slots (``sids``/``scounts``) decodes to ``k + m`` entries, the
    sampled ones with log weights ``log(tail * count / m)`` (``-inf`` for unused slots).
    """
    input_ids = rec["input_ids"].astype(np.int64)
    ids = rec["ids"].astype(np.int64)
    names = rec.dtype.names or ()
    if encoding.logprob_dtype == "uint8":
        lp = dequantize_logprobs(rec["logprobs"], encoding.logprob_min)
        tail = rec["tail"].astype(np.float64) / TAIL_SCALE
        if lp.shape[-1]:
            head = np.maximum(1.0 - tail.astype(np.float32), np.float32(1e-30))
            total = np.exp(lp).sum(-1)
            lp = lp + (np.log(head) - np.log(total))[..., None].astype(np.float32)
    else:
        lp = rec["logprobs"].astype(np.float32)
        tail = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(-1), 0.0, 1.0)
    if "sids" in names:
        counts = rec["scounts"].astype(np.float64)
        m = counts.shape[-1]
        with np.errstate(divide="ignore"):
            w = np.log(tail[..., None] * counts / m).astype(np.float32)
        ids = np.concatenate([ids, rec["sids"].astype(np.int64)], axis=-1)
        lp = np.concatenate([lp, w], axis=-1)
    return input_ids, ids, lp


# ---- per-record entropy coding --------------------------------------------------------------

def _field_planes(dtype: np.dtype) -> list[tuple[int, int, int]]:
    """(byte offset, item count, itemsize) of each field of a packed record dtype."""
    out = []
    for name in dtype.names or ():
        sub, offset = dtype.fields[name][:2]
        out.append((offset, int(np.prod(sub.shape)) if sub.shape else 1, sub.base.itemsize))
    return out


def shuffle_bytes(raw: bytes, dtype: np.dtype) -> bytes:
    """Byte-plane transpose of every multi-byte field (``[n, size] -> [size, n]``)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    parts = []
    for offset, count, size in _field_planes(dtype):
        block = buf[offset : offset + count * size]
        parts.append(block.reshape(count, size).T.tobytes() if size > 1 else block.tobytes())
    return b"".join(parts)


def unshuffle_bytes(data: bytes, dtype: np.dtype) -> bytes:
    buf = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(dtype.itemsize, dtype=np.uint8)
    pos = 0
    for offset, count, size in _field_planes(dtype):
        n = count * size
        block = buf[pos : pos + n]
        out[offset : offset + n] = block.reshape(size, count).T.reshape(-1) if size > 1 else block
        pos += n
    return out.tobytes()


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise ConfigError(
            "this cache encoding uses zstd but the `zstandard` package is not installed",
            "pip install zstandard, or choose encoding compact-u8-zlib / compact-u8",
        ) from None
    return zstandard


class RecordCompressor:
    """Compress / decompress single records for one encoding and record dtype."""

    def __init__(self, encoding: Encoding, dtype: np.dtype) -> None:
        self.encoding = encoding
        self.dtype = dtype
        if encoding.compression == "zstd":
            zstd = _zstd()
            self._c = zstd.ZstdCompressor(level=encoding.level, write_content_size=True, write_checksum=True)
            self._d = zstd.ZstdDecompressor()
        elif encoding.compression not in (None, "zlib"):
            raise ConfigError(f"unknown compression {encoding.compression!r}", "use zstd, zlib or none")

    def _delta_view(self, buf: np.ndarray) -> np.ndarray:
        sub, offset = self.dtype.fields["logprobs"][:2]
        if sub.itemsize == 0:  # k = 0 (pure sampling): nothing to delta-code
            return buf[offset:offset].reshape(sub.shape)
        return buf[offset : offset + sub.itemsize].reshape(sub.shape)

    def _sids_pack(self, buf: np.ndarray, inverse: bool = False) -> None:
        """In place on a record's bytes: sampled ids delta-coded along ``m`` (unsigned, wrapping:
        exact inverse) and split into byte planes; ``inverse`` undoes it."""
        sub, offset = self.dtype.fields["sids"][:2]
        base, size = sub.base, sub.itemsize
        region = buf[offset: offset + size]
        if not inverse:
            vals = region.view(base).reshape(sub.shape)
            d = vals.copy()
            d[..., 1:] = np.diff(vals, axis=-1)
            buf[offset: offset + size] = d.reshape(-1).view(np.uint8).reshape(-1, base.itemsize).T.reshape(-1)
        else:
            d = region.reshape(base.itemsize, -1).T.copy().reshape(-1).view(base).reshape(sub.shape)
            buf[offset: offset + size] = np.cumsum(d, axis=-1, dtype=base).reshape(-1).view(np.uint8)

    def compress(self, raw: bytes) -> bytes:
        data = raw
        has_sids = "sids" in (self.dtype.names or ())
        if (self.encoding.delta and self.encoding.logprob_dtype == "uint8") or has_sids:
            buf = np.frombuffer(raw, dtype=np.uint8).copy()
            if self.encoding.delta and self.encoding.logprob_dtype == "uint8":
                codes = self._delta_view(buf)
                codes[..., 1:] = np.diff(codes, axis=-1)  # uint8 arithmetic wraps: exact inverse below
            if has_sids:
                self._sids_pack(buf)
            data = buf.tobytes()
        if self.encoding.shuffle:
            data = shuffle_bytes(data, self.dtype)
        if self.encoding.compression == "zstd":
            return self._c.compress(data)
        return zlib.compress(data, self.encoding.level)

    def compress_blob(self, data: bytes) -> bytes:
        """Compress auxiliary bytes (the shard's id table) with the encoding's coder."""
        if self.encoding.compression == "zstd":
            return self._c.compress(data)
        return zlib.compress(data, self.encoding.level)

    def decompress_blob(self, data: bytes | memoryview, max_size: int) -> bytes:
        try:
            if self.encoding.compression == "zstd":
                return self._d.decompress(bytes(data), max_output_size=max_size)
            return zlib.decompress(bytes(data))
        except Exception as exc:  # zstd.ZstdError / zlib.error: corrupted frame
            raise CacheError(f"cannot decompress a cache frame: {exc}", "rebuild the cache") from None

    def decompress(self, data: bytes | memoryview) -> bytes:
        raw = self.decompress_blob(data, self.dtype.itemsize)
        if len(raw) != self.dtype.itemsize:
            raise CacheError(
                f"a cache record decompressed to {len(raw)} bytes, expected {self.dtype.itemsize}",
                "rebuild the cache",
            )
        if self.encoding.shuffle:
            raw = unshuffle_bytes(raw, self.dtype)
        has_sids = "sids" in (self.dtype.names or ())
        if (self.encoding.delta and self.encoding.logprob_dtype == "uint8") or has_sids:
            buf = np.frombuffer(raw, dtype=np.uint8).copy()
            if self.encoding.delta and self.encoding.logprob_dtype == "uint8":
                codes = self._delta_view(buf)
                np.cumsum(codes, axis=-1, dtype=np.uint8, out=codes)
            if has_sids:
                self._sids_pack(buf, inverse=True)
            raw = buf.tobytes()
        return raw
