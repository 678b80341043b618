"""Asset ``all-minilm-l6-v2``: see :mod:`kdforge.assets.sentence_encoders`."""

from __future__ import annotations

from pathlib import Path


def ensure(cache_dir: Path | None = None) -> Path:
    from kdforge.assets.sentence_encoders import ensure_minilm

    return ensure_minilm(cache_dir)
