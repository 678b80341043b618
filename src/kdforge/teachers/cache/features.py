"""Teacher hidden states of chosen layers stored with a cache (feature terms from a cached teacher).

A cache built with ``feature_layers=[l, ...]`` (indices into the model's ``hidden_states``: 0 = the
embeddings, ``L`` = the last block) writes, next to each shard ``shard-XXXXX.kdc``, a file
``features-XXXXX.kdf`` holding the rows' hidden states ``[n, F, T, H]`` (``F`` chosen layers),
compressed by one of :data:`FEATURE_DTYPES`:

* ``"bf16"``: bfloat16 (2 bytes per value; relative error <= 2^-8 per value);
* ``"int8"``: per row (one token of one layer) symmetric scaling, ``q = round(h / s)`` with
  ``s = max|h| / 127`` stored as float32: ``H + 4`` bytes per row, absolute error <= ``s / 2``;
* ``"fp32"``: float32 as computed (4 bytes per value, exact: what the live teacher gives).

The file is written atomically before its shard; the shard's manifest entry records its name,
size and SHA-256 (checked on open and on resume, like the shard).
"""

from __future__ import annotations

import numpy as np
import torch

from kdforge.errors import CacheError, ConfigError

__all__ = ["FEATURE_DTYPES", "decode_features", "encode_features", "feature_name", "feature_record_bytes"]

FEATURE_DTYPES = ("bf16", "int8", "fp32")


def feature_name(index: int) -> str:
    return f"features-{index:05d}.kdf"


def check_feature_dtype(dtype: str) -> None:
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"unknown feature dtype {dtype!r}", f"use one of: {', '.join(FEATURE_DTYPES)}")


def feature_record_bytes(dtype: str, layers: int, seq_len: int, hidden: int) -> int:
    """Bytes of one sequence's features."""
    rows = layers * seq_len
    if dtype == "fp32":
        return rows * hidden * 4
    return rows * hidden * 2 if dtype == "bf16" else rows * (hidden + 4)


def encode_features(hidden: torch.Tensor | np.ndarray, dtype: str) -> tuple[bytes, float]:
    """``[n, F, T, H]`` float hidden states -> (file bytes, largest absolute decoding error).

    Layout: ``bf16``: the uint16 bit patterns, C order; ``int8``: float32 scales ``[n, F, T]``
    then int8 values ``[n, F, T, H]``; ``fp32``: little-endian float32, C order.
    """
    check_feature_dtype(dtype)
    h = torch.as_tensor(hidden).detach().float().cpu()
    if dtype == "fp32":
        return h.numpy().astype("<f4").tobytes(), 0.0
    if dtype == "bf16":
        q = h.to(torch.bfloat16)
        blob = q.view(torch.int16).numpy().astype("<i2").tobytes()
        return blob, float((q.float() - h).abs().max()) if h.numel() else 0.0
    scale = h.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(h / safe[..., None]).clamp(-127, 127).to(torch.int8)
    err = float((q.float() * safe[..., None] - h).abs().max()) if h.numel() else 0.0
    return scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes(), err


def decode_features(buf: np.ndarray | bytes, dtype: str, n: int, layers: int, seq_len: int, hidden: int,
                    row: int | None = None) -> np.ndarray:
    """float32 ``[n, F, T, H]`` from :func:`encode_features`' bytes (``row``: only that sequence,
    ``[F, T, H]``; reads just its slice of a memory map)."""
    raw = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else buf
    if raw.size != n * feature_record_bytes(dtype, layers, seq_len, hidden):
        raise CacheError(f"a features file holds {raw.size} bytes, expected "
                         f"{n * feature_record_bytes(dtype, layers, seq_len, hidden)}", "rebuild the cache")
    rows = range(n) if row is None else [row]
    out = []
    for r in rows:
        if dtype == "fp32":
            size = layers * seq_len * hidden * 4
            out.append(np.frombuffer(raw[r * size: (r + 1) * size].tobytes(), dtype="<f4")
                       .reshape(layers, seq_len, hidden).astype(np.float32))
        elif dtype == "bf16":
            size = layers * seq_len * hidden * 2
            bits = np.frombuffer(raw[r * size: (r + 1) * size].tobytes(), dtype="<i2").reshape(layers, seq_len, hidden)
            out.append(torch.from_numpy(bits.copy()).view(torch.bfloat16).float().numpy())
        else:
            n_scale = layers * seq_len
            scales = np.frombuffer(raw[r * n_scale * 4: (r + 1) * n_scale * 4].tobytes(), dtype="<f4")
            base = n * n_scale * 4 + r * n_scale * hidden
            vals = np.frombuffer(raw[base: base + n_scale * hidden].tobytes(), dtype=np.int8)
            out.append((vals.reshape(n_scale, hidden).astype(np.float32) * scales[:, None])
                       .reshape(layers, seq_len, hidden))
    arr = np.stack(out)
    return arr if row is None else arr[0]
