"""Paragraph handling shared by the text readers and the data layer (no kdforge imports: both
:mod:`kdforge.data.text` and :mod:`kdforge.data.sources` use it without importing each other)."""

from __future__ import annotations

import re

__all__ = ["unwrap_paragraphs"]

_BLANK_LINES = re.compile(r"\n\s*\n")


def unwrap_paragraphs(text: str) -> str:
    """Undo hard line wrapping: paragraphs (separated by blank lines) become single lines.

    Project-Gutenberg-style texts wrap prose at ~70 characters; a pretrained LM has seen
    running text, so rejoining the lines of each paragraph with spaces gives more natural
    input. Paragraphs stay separated by one blank line; empty paragraphs are dropped.
    """
    paragraphs = (" ".join(p.split()) for p in _BLANK_LINES.split(text))
    return "\n\n".join(p for p in paragraphs if p)
