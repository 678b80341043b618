"""Read a text corpus for the teacher cache and pack it into fixed-length token blocks.

Packing itself is :func:`kdforge.data.text.pack_tokens` (shared with the trainer's data path,
so a cache and a training run tokenise identically); this module only reads corpora from disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kdforge.data.text import pack_tokens, unwrap_paragraphs
from kdforge.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["pack_tokens", "read_texts"]


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (
        path / "state.json"
    ).is_file()


def read_texts(path: str | Path, *, text_field: str = "text", fmt: str = "auto") -> list[str]:
    """Documents of a corpus on disk.

    Args:
        path: a ``.txt`` file (one document, hard-wrapped paragraphs rejoined), a folder of
            ``.txt`` files (one document each, sorted by name), a ``.jsonl`` file (field
            ``text_field`` of each line), or a folder written by ``datasets``' ``save_to_disk``.
        text_field: the text column/field of jsonl and HF datasets.
        fmt: ``auto`` (by suffix / folder content), ``text``, ``jsonl`` or ``hf``.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"corpus not found: {p}", "check corpus.path in the config")
    if fmt == "auto":
        if p.is_dir():
            fmt = "hf" if _is_saved_hf_dataset(p) else "text"
        else:
            fmt = "jsonl" if p.suffix in (".jsonl", ".json") else "text"
    if fmt == "text":
        files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
        if not files:
            raise DataError(f"{p} holds no .txt files", "point corpus.path to a text file or folder")
        return [unwrap_paragraphs(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    if fmt == "jsonl":
        texts = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{p}:{lineno} is not valid JSON", "write one JSON object per line") from None
            if not isinstance(row, dict) or text_field not in row:
                raise DataError(f"{p}:{lineno} has no {text_field!r} field", "set corpus.text_field")
            texts.append(str(row[text_field]))
        return texts
    if fmt == "hf":
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):  # DatasetDict
            split = "train" if "train" in ds else next(iter(ds.keys()))
            log.info("using split %r of %s", split, p)
            ds = ds[split]
        if text_field not in ds.column_names:
            raise DataError(f"{p} has columns {ds.column_names}, no {text_field!r}", "set corpus.text_field")
        return [str(t) for t in ds[text_field]]
    raise DataError(f"unknown corpus format {fmt!r}", "use auto, text, jsonl or hf")
