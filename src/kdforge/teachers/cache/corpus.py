"""The older ``corpus:`` block of the teacher cache, read by the data layer.

Reading is :mod:`kdforge.data` (so a ``.txt`` file means the same here as everywhere: one
document, wrapped lines rejoined); packing is :func:`kdforge.data.text.pack_tokens` (shared with
the trainer's data path, so a cache and a training run tokenise identically). This module only
maps the corpus block's ``path``/``format`` onto a data-layer source.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kdforge.data.text import pack_tokens
from kdforge.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["corpus_source", "pack_tokens", "read_texts"]

FORMATS = ("auto", "text", "jsonl", "hf")


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (
        path / "state.json"
    ).is_file()


def corpus_source(path: str | Path, *, fmt: str = "auto") -> str:
    """The data-layer ``path`` of a corpus: the path itself, or ``folder/*.txt`` for a folder of
    text files (a corpus folder means its ``.txt`` files, sorted by name).

    Raises:
        DataError: the path does not exist, the format is unknown, or a text folder has no ``.txt``.
    """
    p = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown corpus format {fmt!r}", f"use {', '.join(FORMATS)} (jsonl for .jsonl files)")
    if not p.exists():
        raise DataError(f"corpus not found: {p}", "check corpus.path in the config")
    if p.is_dir() and (fmt == "text" or (fmt == "auto" and not _is_saved_hf_dataset(p))):
        if not any(p.glob("*.txt")):
            raise DataError(f"{p} holds no .txt files", "point corpus.path to a text file or folder")
        return str(p / "*.txt")
    return str(p)


def read_texts(path: str | Path, *, text_field: str = "text", fmt: str = "auto") -> list[str]:
    """Documents of a corpus on disk, read by the data layer (:func:`kdforge.data.load`).

    Args:
        path: a ``.txt`` file (one document, hard-wrapped paragraphs rejoined: the package's
            ``.txt`` rule), a folder of ``.txt`` files (one document each, sorted by name), a
            ``.jsonl``/``.json``/``.csv``/``.parquet`` file (field ``text_field`` of each row), or
            a folder written by ``datasets``' ``save_to_disk`` (its ``train`` split, else its first).
        text_field: the text column/field of tables and saved datasets.
        fmt: ``auto``, ``text``, ``jsonl`` or ``hf`` (only checked: the layer reads by extension).
    """
    from kdforge.data.sources import parse_spec, read_splits

    spec = parse_spec({"path": corpus_source(path, fmt=fmt), "text_field": text_field})
    splits = read_splits(spec)
    split = "train" if "train" in splits else next(iter(splits))
    ds = splits[split]
    if text_field not in ds.column_names:
        raise DataError(f"{path} has no {text_field!r} field (fields: {ds.column_names})", "set corpus.text_field")
    return [str(t) for t in ds[text_field] if t is not None]
