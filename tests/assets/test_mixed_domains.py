"""mixed-domains: per-domain hash order, validation first, round-robin interleaving, idempotent."""

from __future__ import annotations

import json

from kdforge.assets import mixed_domains


def test_rows_are_split_per_domain_and_interleaved(tmp_path, monkeypatch):
    texts = {d: [f"{d} text {i}" for i in range(7)] + [f"{d} text 0"] for d in mixed_domains.DOMAINS}
    texts["speeches"] = texts["speeches"][:3]  # a short domain runs out first
    monkeypatch.setattr(mixed_domains, "domain_texts", lambda cache_dir=None: texts)
    monkeypatch.setattr(mixed_domains, "TRAIN_PER_DOMAIN", 4)
    monkeypatch.setattr(mixed_domains, "VALIDATION_PER_DOMAIN", 2)
    folder = mixed_domains.ensure(tmp_path)
    train = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (folder / "validation.jsonl").read_text().splitlines()]
    assert [r["domain"] for r in val] == list(mixed_domains.DOMAINS) * 2
    assert [r["domain"] for r in train[:4]] == list(mixed_domains.DOMAINS)
    counts = {d: sum(r["domain"] == d for r in train) for d in mixed_domains.DOMAINS}
    assert counts == {"austen": 4, "reviews": 4, "headlines": 4, "speeches": 1}
    for d in mixed_domains.DOMAINS:  # duplicates kept once, no row in both splits
        rows = [r["text"] for r in train + val if r["domain"] == d]
        assert len(rows) == len(set(rows)) == len(set(texts[d])) - (1 if d != "speeches" else 0)
    monkeypatch.setattr(mixed_domains, "domain_texts", lambda cache_dir=None: 1 / 0)
    assert mixed_domains.ensure(tmp_path) == folder  # built once: a second call reads nothing


def test_preset_names_the_two_files():
    from kdforge.data.sources import PRESETS

    assert PRESETS["mixed-domains"].files == {"train": "train.jsonl", "validation": "validation.jsonl"}
