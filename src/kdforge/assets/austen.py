"""Jane Austen's six novels as plain UTF-8 text, extracted offline from a Debian package.

The public-domain texts ship in the Debian package ``r-cran-janeaustenr`` as an R "lazy-load
database" (``janeaustenr/data/Rdata.rdb`` + ``Rdata.rdx``). :func:`ensure` downloads the
``.deb`` with ``apt-get download`` (it never *installs* it: that would pull in all of R),
unpacks it with ``dpkg-deb -x`` into a temporary folder, decodes the database with the pure
Python ``rdata`` reader and writes::

    <cache_root()>/data/austen/
        emma.txt  mansfieldpark.txt  northangerabbey.txt
        persuasion.txt  prideprejudice.txt  sensesensibility.txt
        manifest.json          # books, titles, characters, lines, sha256 of each file

About 4.0 MB of prose (~1M SmolLM2 tokens), one line of the original text per line.

R lazy-load format (as written by R's ``makeLazyLoadDB``): ``Rdata.rdx`` is a gzip'ed R
serialisation of a list whose ``variables`` element maps each object name to an
``(offset, length)`` pair into ``Rdata.rdb``. Each blob there starts with a 4-byte big-endian
uncompressed length, then either zlib data (default) or, for ``compress=2/3``, one type byte
(``'0'`` stored, ``'1'`` zlib, ``'2'`` bzip2, ``'Z'`` raw LZMA2) followed by the payload; the
payload is an ordinary R serialisation that ``rdata`` parses.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

from kdforge.errors import AssetError
from kdforge.io import sha256_file, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

DEB_PACKAGE = "r-cran-janeaustenr"
#: object name in the R package -> human title, in publication order
BOOKS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
MANIFEST = "manifest.json"

_COMMANDS = (
    f"mkdir -p /tmp/austen && cd /tmp/austen && apt-get download {DEB_PACKAGE} "
    f"(run `apt-get update` first if apt has no package lists) && "
    f"dpkg-deb -x {DEB_PACKAGE}_*.deb x; then call "
    "kdforge.assets.austen.from_deb('/tmp/austen/<file>.deb'). Do NOT `apt-get install` it: "
    "that pulls in all of R"
)


def target_dir(cache_dir: Path | None = None) -> Path:
    """Where the texts live (``<cache>/data/austen``)."""
    if cache_dir is None:
        from kdforge.assets import cache_root

        cache_dir = cache_root()
    return Path(cache_dir) / "data" / "austen"


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and all((path / f"{b}.txt").is_file() for b in BOOKS)


def book_path(book: str, cache_dir: Path | None = None) -> Path:
    """Path of one book's text; raises :class:`AssetError` for an unknown name."""
    if book not in BOOKS:
        raise AssetError(f"unknown Austen book {book!r}", f"choose one of: {', '.join(BOOKS)}")
    return ensure(cache_dir) / f"{book}.txt"


def ensure(cache_dir: Path | None = None) -> Path:
    """Return the folder of the six novels, downloading and extracting them on first use.

    Idempotent. Raises :class:`AssetError` (with the manual commands) when ``apt-get`` or
    ``dpkg-deb`` is unavailable or the package cannot be downloaded.
    """
    target = target_dir(cache_dir)
    if is_complete(target):
        return target
    with tempfile.TemporaryDirectory(prefix="kdforge-austen-") as tmp:
        deb = download_deb(Path(tmp))
        return from_deb(deb, target)


def download_deb(workdir: Path) -> Path:
    """``apt-get download r-cran-janeaustenr`` into ``workdir`` (``apt-get update`` on a miss)."""
    if shutil.which("apt-get") is None:
        raise AssetError("apt-get is not available, so the Austen texts cannot be fetched", _COMMANDS)

    def _download() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", DEB_PACKAGE], cwd=workdir, capture_output=True, text=True
        )

    result = _download()
    if result.returncode != 0:
        log.info("apt-get download failed (%s); running apt-get update and retrying",
                 result.stderr.strip()[-200:])
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = _download()
    debs = sorted(workdir.glob(f"{DEB_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise AssetError(
            f"`apt-get download {DEB_PACKAGE}` failed: {result.stderr.strip()[-300:]}", _COMMANDS
        )
    return debs[-1]


def from_deb(deb: str | os.PathLike, target: Path | None = None) -> Path:
    """Extract the novels from a downloaded ``r-cran-janeaustenr`` ``.deb`` into ``target``."""
    if shutil.which("dpkg-deb") is None:
        raise AssetError("dpkg-deb is not available to unpack the Austen package", _COMMANDS)
    target = target_dir() if target is None else Path(target)
    with tempfile.TemporaryDirectory(prefix="kdforge-austen-x-") as tmp:
        result = subprocess.run(["dpkg-deb", "-x", str(deb), tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise AssetError(f"dpkg-deb -x {deb} failed: {result.stderr.strip()}", _COMMANDS)
        found = sorted(Path(tmp).rglob("janeaustenr/data/Rdata.rdx"))
        if not found:
            raise AssetError(f"{deb} holds no janeaustenr/data/Rdata.rdx", "check the package version")
        books = read_lazyload_db(found[0].with_suffix(""))
    return write_books(books, target, source=Path(deb).name)


def write_books(books: dict[str, list[str]], target: Path, source: str = "") -> Path:
    """Write one UTF-8 text per book plus ``manifest.json``, atomically, into ``target``.

    ``books`` maps object names (keys of :data:`BOOKS`) to lists of lines.
    """
    missing = [b for b in BOOKS if b not in books]
    if missing:
        raise AssetError(
            f"the Austen data lacks books {missing} (found {sorted(books)})",
            "use the Debian package r-cran-janeaustenr, which holds all six novels",
        )
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        entries = []
        for name, title in BOOKS.items():
            text = "\n".join(books[name]).strip("\n") + "\n"
            path = tmp / f"{name}.txt"
            write_text_atomic(path, text)
            entries.append(
                {"book": name, "title": title, "file": path.name, "chars": len(text),
                 "lines": text.count("\n"), "sha256": sha256_file(path)}
            )
        write_json_atomic(tmp / MANIFEST, {"source": source, "books": entries})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d Austen novels to %s", len(entries), target)
    return target


def read_lazyload_db(stem: str | os.PathLike) -> dict[str, list[str]]:
    """Read every character-vector object of an R lazy-load database ``stem.rdx``/``stem.rdb``.

    Returns ``{object name: list of strings}`` (R ``NA`` strings become empty lines).
    """
    stem = Path(stem)
    index = _parse_r(_gunzip_or_zlib(Path(f"{stem}.rdx").read_bytes()), f"{stem}.rdx")
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict) or not variables:
        raise AssetError(f"{stem}.rdx is not an R lazy-load index (no 'variables')", _COMMANDS)
    blob_file = Path(f"{stem}.rdb").read_bytes()
    out: dict[str, list[str]] = {}
    for name, pos in variables.items():
        offset, length = (int(x) for x in list(pos)[:2])
        value = _parse_r(decompress_blob(blob_file[offset : offset + length]), f"{stem}.rdb:{name}")
        out[str(name)] = ["" if v is None else str(v) for v in _as_list(value)]
    return out


def decompress_blob(blob: bytes) -> bytes:
    """Decompress one object of an ``.rdb`` file (see the module docstring for the layout)."""
    if len(blob) < 5:
        raise AssetError("truncated R lazy-load blob", "re-download the package")
    (size,) = struct.unpack(">I", blob[:4])
    kind, payload = blob[4:5], blob[5:]
    try:
        if kind == b"Z":
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
            data = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=filters)
        elif kind == b"2":
            data = bz2.decompress(payload)
        elif kind == b"1":
            data = zlib.decompress(payload)
        elif kind == b"0":
            data = payload
        else:  # compress=1 (the default): plain zlib straight after the length
            data = zlib.decompress(blob[4:])
    except (zlib.error, lzma.LZMAError, OSError, ValueError) as exc:
        raise AssetError(f"corrupt R lazy-load blob: {exc}", "re-download the package") from None
    if len(data) != size:
        raise AssetError(
            f"R lazy-load blob decompressed to {len(data)} bytes, header says {size}",
            "re-download the package",
        )
    return data


def _gunzip_or_zlib(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    try:
        return zlib.decompress(data[4:])
    except zlib.error:
        return data


def _parse_r(data: bytes, where: str) -> Any:
    try:
        import rdata
    except ImportError:
        raise AssetError("the `rdata` package is needed to read the Austen texts",
                         "pip install rdata") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(data))
    except Exception as exc:  # rdata raises assorted errors on bad input
        raise AssetError(f"cannot parse the R data in {where}: {exc}", "re-download the package") from exc


def _as_list(value: Any) -> list[Any]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str):
        return [value]
    return list(value)


def load_books(cache_dir: Path | None = None, books: list[str] | None = None) -> dict[str, str]:
    """``{book: full text}`` for the requested books (all six by default)."""
    folder = ensure(cache_dir)
    names = list(BOOKS) if books is None else books
    for name in names:
        if name not in BOOKS:
            raise AssetError(f"unknown Austen book {name!r}", f"choose from: {', '.join(BOOKS)}")
    return {name: (folder / f"{name}.txt").read_text(encoding="utf-8") for name in names}
