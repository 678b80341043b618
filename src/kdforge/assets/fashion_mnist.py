"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence): 60,000 + 10,000 28x28 greyscale images.

:func:`ensure` returns a folder holding the four original IDX files (gzipped or not)::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

It looks, in this order, at

1. ``$KDFORGE_FASHION_MNIST_DIR`` (an explicit choice by the user always wins),
2. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``),
3. ``<cache>/fashion-mnist`` (a previous download),
4. installs the Debian package when running as root on a system with ``apt-get`` (works on a
   machine that reaches only package mirrors),
5. downloads the original files from the Zalando mirror into ``<cache>/fashion-mnist``, checking
   the MD5 sums published in the dataset's README,

and otherwise raises :class:`~kdforge.errors.AssetError` with the exact commands to run.
Every folder is checked (all four files present) before it is returned.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

from kdforge.errors import AssetError
from kdforge.io import write_bytes_atomic

log = logging.getLogger(__name__)

ENV_VAR = "KDFORGE_FASHION_MNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
MIRROR_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# stem -> MD5 of the original gzip file (from the Fashion-MNIST README)
FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}

INSTALL_HELP = (
    f"on Debian/Ubuntu run `sudo apt-get update && sudo apt-get install -y {DEBIAN_PACKAGE}`; "
    f"or download the four files {', '.join(f + '.gz' for f in FILES)} from {MIRROR_URL} "
    f"into a folder and `export {ENV_VAR}=/that/folder`"
)


def idx_file(folder: Path, stem: str) -> Path | None:
    """Path of ``stem`` in ``folder``, gzipped (``stem.gz``) or raw; ``None`` if absent."""
    for name in (f"{stem}.gz", stem):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def missing_files(folder: Path) -> list[str]:
    """The IDX stems that ``folder`` lacks (all four when it does not exist)."""
    return [stem for stem in FILES if idx_file(folder, stem) is None]


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and not missing_files(folder)


def ensure(
    cache_dir: Path | None = None,
    *,
    system_dir: Path = SYSTEM_DIR,
    allow_install: bool = True,
    allow_download: bool = True,
) -> Path:
    """Return a folder with the four Fashion-MNIST IDX files, installing them if needed.

    Args:
        cache_dir: where a download goes (default :func:`kdforge.assets.cache_root`).
        system_dir: where the Debian package puts the files.
        allow_install: try ``apt-get install dataset-fashion-mnist`` when root.
        allow_download: try the original mirror when nothing else worked.

    Raises:
        AssetError: ``$KDFORGE_FASHION_MNIST_DIR`` points at an incomplete folder, or no source
            worked; the message lists the commands that install the data.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        folder = Path(env).expanduser()
        if not is_complete(folder):
            raise AssetError(
                f"${ENV_VAR}={folder} lacks {', '.join(missing_files(folder))} (.gz or raw)",
                f"point ${ENV_VAR} at a folder with all four IDX files, or unset it; {INSTALL_HELP}",
            )
        return folder
    if is_complete(system_dir):
        return system_dir
    if cache_dir is None:
        from kdforge.assets import cache_root

        cache_dir = cache_root()
    cached = Path(cache_dir) / "fashion-mnist"
    if is_complete(cached):
        return cached
    problems: list[str] = []
    if allow_install:
        problem = _apt_install()
        if problem is None and is_complete(system_dir):
            return system_dir
        problems.append(problem or f"{DEBIAN_PACKAGE} installed but {system_dir} is incomplete")
    if allow_download:
        problem = _download(cached)
        if problem is None:
            return cached
        problems.append(problem)
    raise AssetError(
        "Fashion-MNIST not found" + (f" ({'; '.join(problems)})" if problems else ""),
        INSTALL_HELP,
    )


def _apt_install() -> str | None:
    """Install the Debian package; return ``None`` on success, else why it was not possible.

    Tries ``apt-get install`` first (fast when the package lists are fresh) and, if that fails,
    ``apt-get update`` followed by a second ``apt-get install``.
    """
    apt = shutil.which("apt-get")
    if apt is None:
        return "apt-get not available"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root, so the Debian package was not installed"
    install = [apt, "install", "-y", DEBIAN_PACKAGE]
    if _run(install) is None:
        return None
    problem = _run([apt, "update"])
    if problem is not None:
        return problem
    return _run(install)


def _run(args: list[str]) -> str | None:
    log.info("running: %s", " ".join(args))
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(args)}` failed: {exc}"
    if result.returncode != 0:
        return f"`{' '.join(args)}` failed: {result.stderr.strip()[-300:]}"
    return None


def _download(folder: Path) -> str | None:
    """Download the four gzip files into ``folder``, checking MD5; ``None`` on success."""
    for stem, md5 in FILES.items():
        target = folder / f"{stem}.gz"
        if target.is_file():
            continue
        url = MIRROR_URL + f"{stem}.gz"
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (fixed https/http mirror)
                data = response.read()
        except (OSError, http.client.HTTPException) as exc:  # HTTPException: e.g. IncompleteRead, a dropped connection
            return f"download of {url} failed: {exc!r}"
        digest = hashlib.md5(data).hexdigest()  # noqa: S324 (checksum published by the authors)
        if digest != md5:
            return f"{url} has MD5 {digest}, expected {md5}"
        write_bytes_atomic(target, data)
    return None
