"""Austen asset: R lazy-load decoding and text writing, on tiny synthetic databases."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from kdforge.assets import austen
from kdforge.errors import AssetError

rdata = pytest.importorskip("rdata")


def _r_serialise(obj) -> bytes:
    """Uncompressed XDR R serialisation of a Python object (what R writes into .rdb/.rdx)."""
    r_data = rdata.conversion.convert_python_to_r_data(obj)
    return rdata.unparser.unparse_data(r_data, file_format="xdr", file_type="rds")


def _blob(payload: bytes, kind: str) -> bytes:
    header = struct.pack(">I", len(payload))
    if kind == "default":
        return header + zlib.compress(payload)
    if kind == "0":
        return header + b"0" + payload
    if kind == "1":
        return header + b"1" + zlib.compress(payload)
    if kind == "2":
        return header + b"2" + bz2.compress(payload)
    if kind == "Z":
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 6 | lzma.PRESET_EXTREME}]
        return header + b"Z" + lzma.compress(payload, format=lzma.FORMAT_RAW, filters=filters)
    raise ValueError(kind)


def _write_db(folder: Path, objects: dict[str, list[str]], kind: str = "default") -> Path:
    rdb = b""
    variables = {}
    for name, lines in objects.items():
        blob = _blob(_r_serialise(np.array(lines, dtype=object)), kind)
        variables[name] = np.array([len(rdb), len(blob)], dtype=np.int32)
        rdb += blob
    index = {"variables": variables, "references": {}, "compressed": np.array([True])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_r_serialise(index)))
    return folder / "Rdata"


@pytest.mark.parametrize("kind", ["default", "0", "1", "2", "Z"])
def test_decompress_blob_handles_every_r_compression_type(kind):
    payload = b"R serialisation bytes " * 50
    assert austen.decompress_blob(_blob(payload, kind)) == payload


def test_decompress_blob_rejects_a_length_mismatch():
    blob = struct.pack(">I", 999) + zlib.compress(b"short")
    with pytest.raises(AssetError, match="header says 999"):
        austen.decompress_blob(blob)


def test_read_lazyload_db_returns_every_character_vector(tmp_path):
    objects = {"emma": ["EMMA", "", "By Jane Austen"], "persuasion": ["Persuasion", "Chapter 1"]}
    stem = _write_db(tmp_path / "db", objects)
    assert austen.read_lazyload_db(stem) == objects


def test_write_books_writes_texts_and_manifest_then_ensure_reuses_them(tmp_path, monkeypatch):
    books = {name: [name.upper(), "", f"text of {name}"] for name in austen.BOOKS}
    target = austen.target_dir(tmp_path)
    austen.write_books(books, target, source="synthetic")
    assert (target / "emma.txt").read_text(encoding="utf-8") == "EMMA\n\ntext of emma\n"
    manifest = json.loads((target / "manifest.json").read_text())
    assert [b["book"] for b in manifest["books"]] == list(austen.BOOKS)
    assert manifest["books"][0]["lines"] == 3

    def _no_download(*args, **kwargs):
        raise AssertionError("ensure() must not download when the texts are present")

    monkeypatch.setattr(austen, "download_deb", _no_download)
    assert austen.ensure(tmp_path) == target
    assert austen.load_books(tmp_path, ["persuasion"]) == {"persuasion": "PERSUASION\n\ntext of persuasion\n"}


def test_write_books_refuses_an_incomplete_set(tmp_path):
    with pytest.raises(AssetError, match="lacks books"):
        austen.write_books({"emma": ["x"]}, tmp_path / "austen")
    assert not (tmp_path / "austen").exists()


def test_missing_apt_get_raises_asset_error_with_the_manual_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(austen.shutil, "which", lambda name: None)
    with pytest.raises(AssetError) as info:
        austen.ensure(tmp_path)
    assert "apt-get download r-cran-janeaustenr" in str(info.value)
    assert "dpkg-deb -x" in str(info.value)


def test_unknown_book_name_is_a_clear_error(tmp_path):
    with pytest.raises(AssetError, match="unknown Austen book"):
        austen.load_books(tmp_path, ["ulysses"])


@pytest.mark.slow
def test_real_package_gives_six_novels(kdforge_cache):
    folder = austen.ensure()
    text = (folder / "prideprejudice.txt").read_text(encoding="utf-8")
    assert "It is a truth universally acknowledged" in text
    assert sum(len(t) for t in austen.load_books().values()) > 3_500_000
