"""kdforge: knowledge distillation for Hugging Face and PyTorch models.

Public API is re-exported from the concept subpackages (``kdforge.losses``,
``kdforge.train``, ``kdforge.teachers``, ...). Import those directly; this top-level module stays
light so ``import kdforge`` does not pull in torch.
"""

__version__ = "0.1.0"

from kdforge.errors import (  # noqa: E402
    AssetError,
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    DiskFullError,
    FileSystemError,
    GenerationError,
    KdforgeError,
    NonFiniteError,
    ShapeError,
    VocabMismatchError,
)

__all__ = [
    "__version__",
    "AssetError",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "DiskFullError",
    "FileSystemError",
    "GenerationError",
    "KdforgeError",
    "NonFiniteError",
    "ShapeError",
    "VocabMismatchError",
]
