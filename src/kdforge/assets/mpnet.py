"""Asset ``all-mpnet-base-v2``: see :mod:`kdforge.assets.sentence_encoders`."""

from __future__ import annotations

from pathlib import Path


def ensure(cache_dir: Path | None = None) -> Path:
    from kdforge.assets.sentence_encoders import ensure_mpnet

    return ensure_mpnet(cache_dir)
