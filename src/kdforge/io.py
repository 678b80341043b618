"""Crash-safe file writing.

Everything kdforge persists (cache shards, manifests, checkpoints, generated data, reports) goes
through :func:`atomic_write` or its helpers: data is written to a temporary file in the same
directory, flushed and fsync'ed, then renamed over the target. A crash leaves either the old file
or the new one, never a torn one.

An operating system's refusal (no permission, read-only file system, a folder where the file
belongs, too many open files, a full disk) becomes a :class:`~kdforge.errors.FileSystemError`
(:class:`~kdforge.errors.DiskFullError` for a full disk) naming the path and the fix; the target is
left as it was and no temporary file stays behind. :func:`os_errors` and :func:`ensure_dir` give
the same mapping to other file operations (creating run folders, appending logs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from kdforge.errors import FileSystemError, from_os_error

#: OS errors that are the environment's fault (not kdforge's), mapped to a FileSystemError
MAPPED_ERRNOS = frozenset(
    code for code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                      errno.EMFILE, errno.ENFILE, errno.ENOSPC, getattr(errno, "EDQUOT", None))
    if code is not None)


@contextlib.contextmanager
def os_errors(doing: str, path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an OS refusal inside the block into a :class:`~kdforge.errors.FileSystemError`.

    Only the errors in :data:`MAPPED_ERRNOS` are translated (a missing input file and other
    errors pass through unchanged, for the caller to explain). ``doing`` reads "while <doing> <path>".
    """
    try:
        yield
    except FileSystemError:
        raise
    except OSError as exc:
        if exc.errno not in MAPPED_ERRNOS:
            raise
        raise from_os_error(exc, path if path is not None else exc.filename, doing) from exc


def ensure_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; a refusal (read-only, no permission, a file in the way) is a FileSystemError."""
    folder = Path(path)
    with os_errors("creating the folder", folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched. A full disk
    raises :class:`~kdforge.errors.DiskFullError` naming the path and the fix.
    """
    if mode not in ("wb", "w"):
        raise ValueError("atomic_write supports mode 'wb' or 'w'")
    target = Path(path)
    ensure_dir(target.parent)
    with os_errors("writing", target):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp makes the file 0600; give it the permissions a plain open() would (0666 & ~umask).
        os.chmod(tmp, 0o666 & ~_current_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        if exc.errno not in MAPPED_ERRNOS:
            raise
        # the error names the temporary file (or the parent); the user knows the target
        raise from_os_error(exc, target, "writing") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):  # gone already, or the disk refuses even that
        os.unlink(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            h.update(block)
    return h.hexdigest()
