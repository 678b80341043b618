"""One error hierarchy for kdforge.

Every error raised on purpose by kdforge derives from :class:`KdforgeError` and carries a
message that says *what* is wrong and *how to fix it*. Catch ``KdforgeError`` to handle all of
them; the CLI prints the message (no traceback) and exits with status 2.
"""

from __future__ import annotations

import errno as _errno
import os


class KdforgeError(Exception):
    """Base class of all kdforge errors.

    Args:
        problem: what is wrong, in one sentence.
        fix: what the user should do about it (optional but strongly encouraged).
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  Fix: {fix}")


class ConfigError(KdforgeError, ValueError):
    """A config or recipe file is invalid: unknown key, wrong type, bad value."""


class ShapeError(KdforgeError, ValueError):
    """Tensors have shapes that do not fit together (e.g. student vs teacher logits)."""


class VocabMismatchError(ShapeError):
    """Teacher and student vocabularies differ in a way kdforge cannot reconcile."""


class NonFiniteError(KdforgeError, ValueError):
    """NaN or Inf values were found where finite numbers are required (logits, losses)."""


class DataError(KdforgeError, ValueError):
    """A dataset is missing, empty, or malformed."""


class AssetError(KdforgeError, RuntimeError):
    """A model or data asset could not be found or installed."""


class CacheError(KdforgeError, RuntimeError):
    """A teacher cache is missing, corrupted, or was built for another teacher/tokenizer."""


class CheckpointError(KdforgeError, RuntimeError):
    """A checkpoint is missing, corrupted, or does not match the run being resumed."""


class DeviceError(KdforgeError, RuntimeError):
    """Models or tensors sit on devices/dtypes that cannot work together."""


class GenerationError(KdforgeError, RuntimeError):
    """Teacher generation failed (backend unreachable, retries exhausted, bad response)."""


class FileSystemError(KdforgeError):
    """The operating system refused a file operation: no permission, a read-only file system, a
    folder where a file belongs (or the reverse), too many open files, a full disk.

    Attributes:
        path: the file or folder involved (None when unknown).
        errno: the OS error number (``errno.EACCES``...; None when unknown).
    """

    def __init__(self, problem: str, fix: str | None = None, *, path: str | os.PathLike | None = None,
                 errno: int | None = None) -> None:
        super().__init__(problem, fix)
        self.path = None if path is None else os.fspath(path)
        self.errno = errno


class DiskFullError(FileSystemError):
    """The disk filled up during a write; the previous version of the file is left intact."""


#: what to do about each OS refusal (``{path}`` is filled in)
_PERMISSION_FIX = ("give this user write permission on {path} and its folder (chmod u+w, or chown), or "
                   "write somewhere else (`-o NEW_DIR` on the command line, output_dir in a config)")
_OS_FIXES: dict[int, tuple[str, str]] = {
    _errno.EACCES: ("permission denied", _PERMISSION_FIX),
    _errno.EPERM: ("operation not permitted", _PERMISSION_FIX),
    _errno.EROFS: ("read-only file system",
                   "write to a folder on a writable disk (`-o NEW_DIR` on the command line, output_dir in a "
                   "config), or remount that file system read-write"),
    _errno.EISDIR: ("a folder is where a file is expected",
                    "remove or rename the folder {path}, or choose another output path"),
    _errno.ENOTDIR: ("a file is where a folder is expected (in the path)",
                     "remove or rename the file in the way, or choose another output folder"),
    _errno.EEXIST: ("a file is where a folder is expected",
                    "remove or rename the file {path}, or choose another output folder"),
    _errno.EMFILE: ("too many open files in this process",
                    "raise the limit (`ulimit -n 4096` in the shell that starts kdforge), or lower num_workers"),
    _errno.ENFILE: ("too many open files on this system",
                    "close other programs' files or raise the system limit (fs.file-max), then run again"),
}


def from_os_error(exc: OSError, path: str | os.PathLike | None = None, doing: str = "writing") -> FileSystemError:
    """The :class:`FileSystemError` (or :class:`DiskFullError`) that explains ``exc``.

    ``path`` defaults to the error's own ``filename``; ``doing`` names the operation ("writing",
    "creating the folder", "reading"...). Raise the result ``from exc``.
    """
    where = path if path is not None else (exc.filename if exc.filename is not None else None)
    shown = os.fspath(where) if where is not None else "a file"
    code = exc.errno
    if code in (_errno.ENOSPC, getattr(_errno, "EDQUOT", -1)):
        what = "disk full" if code == _errno.ENOSPC else "disk quota exceeded"
        return DiskFullError(
            f"{what} while {doing} {shown}; the previous version (if any) is intact",
            "free disk space (or point the output to another disk) and run the same command again with "
            "--resume: finished work is kept and the job continues from it",
            path=where, errno=code)
    if code in _OS_FIXES:
        what, fix = _OS_FIXES[code]
        return FileSystemError(f"{what} while {doing} {shown}", fix.format(path=shown), path=where, errno=code)
    reason = exc.strerror or str(exc) or type(exc).__name__
    problem = f"{reason} while {doing} {shown}" if where is not None else f"{type(exc).__name__}: {reason}"
    return FileSystemError(problem,
                           "check the path, its permissions and the disk, then run again (`kdforge --debug` "
                           "shows the traceback)", path=where, errno=code)
