"""``austen-chat``: a chat-format dataset derived from the Austen novels (offline, deterministic).

Each row is one two-message conversation in ``messages`` form::

    {"messages": [{"role": "user", "content": "Continue this passage from Jane Austen's Emma:\\n\\n<paragraph i>"},
                  {"role": "assistant", "content": "<paragraph i+1>"}],
     "book": "emma"}

for consecutive paragraphs of 15 to 45 words each (paragraphs by the package ``.txt`` rule,
hard-wrapped lines rejoined: :func:`kdforge.data.sources.split_txt`). ``train.jsonl`` holds the
first five novels, ``validation.jsonl`` *Persuasion* (held out by book, as in the quickstart).
It exists so that chat distillation (response-only loss on the assistant turn, the tokenizer's
chat template) runs end to end on a machine without a network: ``data: {path: austen-chat,
eval_split: validation}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdforge.io import write_text_atomic

FILES = ("train.jsonl", "validation.jsonl")
HELD_OUT = "persuasion"
MIN_WORDS, MAX_WORDS = 15, 45
VERSION = 2


def target_dir(cache_dir: Path | None = None) -> Path:
    """Where the files live (``<cache>/data/austen_chat``)."""
    if cache_dir is None:
        from kdforge.assets import cache_root

        cache_dir = cache_root()
    return Path(cache_dir) / "data" / "austen_chat"


def conversations(book: str, title: str, text: str) -> list[dict]:
    """The rows of one book (module doc)."""
    from kdforge.data.sources import split_txt

    paragraphs = [p for p in split_txt(text, unit="paragraph") if MIN_WORDS <= len(p.split()) <= MAX_WORDS]
    rows = []
    for first, second in zip(paragraphs[0::2], paragraphs[1::2]):  # disjoint pairs: no paragraph twice
        rows.append({"messages": [
            {"role": "user", "content": f"Continue this passage from Jane Austen's {title}:\n\n{first}"},
            {"role": "assistant", "content": second}], "book": book})
    return rows


def ensure(cache_dir: Path | None = None) -> Path:
    """Derive the two files from the Austen asset on first use (idempotent, atomic); return the folder."""
    from kdforge.assets import austen

    target = target_dir(cache_dir)
    stamp = target / "version.txt"
    if stamp.is_file() and stamp.read_text().strip() == str(VERSION) and all((target / f).is_file() for f in FILES):
        return target
    books = austen.load_books(cache_dir)
    split: dict[str, list[str]] = {"train.jsonl": [], "validation.jsonl": []}
    for book, text in books.items():
        name = "validation.jsonl" if book == HELD_OUT else "train.jsonl"
        split[name] += [json.dumps(r, ensure_ascii=False) for r in conversations(book, austen.BOOKS[book], text)]
    target.mkdir(parents=True, exist_ok=True)
    for name, lines in split.items():
        write_text_atomic(target / name, "\n".join(lines) + "\n")
    write_text_atomic(stamp, f"{VERSION}\n")
    return target
