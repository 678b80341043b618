"""One error hierarchy for kdforge.

Every error raised on purpose by kdforge derives from :class:`KdforgeError` and carries a
message that says *what* is wrong and *how to fix it*. Catch ``KdforgeError`` to handle all of
them; the CLI prints the message (no traceback) and exits with status 2.
"""

from __future__ import annotations


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


class DiskFullError(KdforgeError):
    """The disk filled up during a write; the previous version of the file is left intact."""
