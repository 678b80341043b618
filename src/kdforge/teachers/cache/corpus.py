"""Tokenise a text corpus and pack it into fixed-length blocks for the teacher cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.errors import DataError

log = logging.getLogger(__name__)


def pack_tokens(
    texts: Iterable[str],
    tokenizer: Any,
    seq_len: int,
    *,
    max_sequences: int | None = None,
    add_eos: bool = True,
) -> np.ndarray:
    """Tokenise ``texts`` and cut the concatenated stream into ``[N, seq_len]`` int64 blocks.

    Documents are joined with the tokenizer's EOS token (if it has one and ``add_eos``); the
    last incomplete block is dropped (no padding, so every position is a real prediction).
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}", "use e.g. seq_len: 128")
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    stream: list[int] = []
    limit = None if max_sequences is None else max_sequences * seq_len
    for text in texts:
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if callable(tokenizer) else tokenizer.encode(text).ids
        stream.extend(ids)
        if eos is not None:
            stream.append(int(eos))
        if limit is not None and len(stream) >= limit:
            break
    n = len(stream) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise DataError(
            f"the corpus has {len(stream)} tokens, fewer than one block of {seq_len}",
            "use a larger corpus or a smaller seq_len",
        )
    return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def read_texts(path: str | Path, *, text_field: str = "text", fmt: str = "auto") -> list[str]:
    """Texts of a corpus: a ``.txt`` file (paragraphs split on blank lines), a ``.jsonl`` file
    (``text_field`` of each line), or a folder saved with ``datasets.Dataset.save_to_disk``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"corpus not found: {p}", "check corpus.path in the config")
    if fmt == "auto":
        fmt = "hf" if p.is_dir() else ("jsonl" if p.suffix in (".jsonl", ".json") else "text")
    if fmt == "text":
        raw = p.read_text(encoding="utf-8", errors="replace")
        return [part.strip() for part in raw.split("\n\n") if part.strip()]
    if fmt == "jsonl":
        texts = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{p}:{lineno} is not valid JSON", "write one JSON object per line") from None
            if text_field not in row:
                raise DataError(f"{p}:{lineno} has no {text_field!r} field", "set corpus.text_field")
            texts.append(str(row[text_field]))
        return texts
    if fmt == "hf":
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict
            ds = ds[next(iter(ds.keys()))]
        if text_field not in ds.column_names:
            raise DataError(f"{p} has columns {ds.column_names}, no {text_field!r}", "set corpus.text_field")
        return [str(t) for t in ds[text_field]]
    raise DataError(f"unknown corpus format {fmt!r}", "use auto, text, jsonl or hf")
