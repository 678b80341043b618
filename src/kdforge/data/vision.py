"""Image classification data: an IDX reader/writer, Fashion-MNIST loading, dict-batch datasets.

IDX is the format of MNIST and Fashion-MNIST (LeCun et al.): a big-endian header
``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` uint32 sizes, then the array in C order.
Files may be gzip-compressed (detected by their magic bytes, not their name).

Datasets yield the dict batches the trainer consumes (``kdforge.train.ClassificationTask``)::

    {"inputs": float32 [B, 1, 28, 28], "labels": int64 [B], "teacher_logits": float32 [B, C]}

``labels`` may be ``-100`` (ignore index) for unlabelled images of a *transfer set* — images
the teacher labels with soft targets only (Hinton et al. 2015, section 3).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.errors import DataError
from kdforge.io import write_bytes_atomic

# IDX dtype code -> numpy dtype (big-endian as stored)
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[str, int] = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in _IDX_DTYPES.items()}


FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# pixel statistics of the Fashion-MNIST training set (after scaling to [0, 1])
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}", "check the path and permissions") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is a corrupt gzip file: {exc}", "download or install it again") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a native-endian numpy array.

    Raises:
        DataError: bad magic number, unknown dtype code, or a size that does not match the header.
    """
    p = Path(path)
    raw = _read_bytes(p)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{p} is not an IDX file (bad magic number)", "pass an MNIST-style IDX file")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{p}: unknown IDX dtype code 0x{code:02x}", "the file is corrupt or not IDX")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header", "download or install the file again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{p}: header says shape {shape} ({expected} bytes) but the file holds {len(raw) - header}",
            "the file is truncated or corrupt; download or install it again",
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file, gzipped when ``compress`` (default: name ends in ``.gz``)."""
    p = Path(path)
    arr = np.ascontiguousarray(array)
    key = arr.dtype.newbyteorder("=").str[1:]
    if key not in _IDX_CODES:
        raise DataError(f"IDX cannot store dtype {arr.dtype}", "use uint8, int8, int16, int32, float32 or float64")
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(_IDX_DTYPES[code]).tobytes()
    if compress if compress is not None else p.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    write_bytes_atomic(p, data)


@dataclass(frozen=True)
class ImageSplits:
    """Train and test images (``uint8 [N, H, W]``) and labels (``int64 [N]``)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_fashion_mnist(root: str | Path | None = None) -> ImageSplits:
    """Load the four Fashion-MNIST IDX files from ``root`` (default: :func:`kdforge.assets.fashion_mnist.ensure`).

    Raises:
        DataError: a file is missing or malformed, or image and label counts disagree.
    """
    from kdforge.assets import fashion_mnist as asset

    folder = Path(root) if root is not None else asset.ensure()
    arrays = {}
    for stem in asset.FILES:
        path = asset.idx_file(folder, stem)
        if path is None:
            raise DataError(f"{folder} lacks {stem}(.gz)", asset.INSTALL_HELP)
        arrays[stem] = read_idx(path)
    splits = []
    for prefix in ("train", "t10k"):
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match",
                "images must be [N, H, W] and labels [N]; reinstall the dataset",
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
            raise DataError(f"{folder}: {prefix} labels outside 0..9", "reinstall the dataset")
        splits += [torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))]
    return ImageSplits(*splits, classes=FASHION_MNIST_CLASSES)


def stratified_indices(labels: torch.Tensor, n: int, *, seed: int = 0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` indices with (as near as possible) equal counts per class, drawn with ``seed``.

    Args:
        labels: ``int64 [N]`` class ids.
        n: how many to draw; at most the number of available indices.
        exclude: indices that must not be drawn (e.g. the labelled subset when drawing a transfer set).

    Returns:
        ``int64 [n]`` sorted indices.
    """
    available = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None and len(exclude):
        available[exclude] = False
    if n > int(available.sum()):
        raise DataError(
            f"asked for {n} examples but only {int(available.sum())} are available",
            "lower the subset size",
        )
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels[available])
    per_class = [torch.nonzero(available & (labels == c)).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=gen)] for idx in per_class]
    quota = [0] * len(classes)
    remaining = n
    # round-robin so rare classes give up their unused share to the others
    while remaining:
        progressed = False
        for i, idx in enumerate(per_class):
            if remaining and quota[i] < len(idx):
                quota[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    chosen = torch.cat([idx[:q] for idx, q in zip(per_class, quota)]) if classes.numel() else torch.empty(0, dtype=torch.long)
    return chosen.sort().values


def normalize_images(images: torch.Tensor, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD) -> torch.Tensor:
    """``uint8 [N, H, W]`` -> ``float32 [N, 1, H, W]``, scaled to [0, 1] then standardised."""
    if images.ndim != 3:
        raise DataError(f"expected images [N, H, W], got {tuple(images.shape)}", "pass greyscale images")
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)


class ImageClassificationDataset(Dataset):
    """Tensors in memory, items as dicts ``{"inputs", "labels"[, "teacher_logits"]}``.

    Args:
        inputs: ``float32 [N, C, H, W]`` (already normalised, see :func:`normalize_images`).
        labels: ``int64 [N]``; ``-100`` marks an unlabelled image (transfer set).
        teacher_logits: optional ``float32 [N, num_classes]`` precomputed once by the teacher.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
        if len(inputs) != len(labels):
            raise DataError(f"{len(inputs)} inputs but {len(labels)} labels", "pass one label per image")
        if teacher_logits is not None and len(teacher_logits) != len(inputs):
            raise DataError(
                f"{len(inputs)} inputs but {len(teacher_logits)} rows of teacher logits",
                "compute teacher logits over exactly these inputs",
            )
        self.inputs = inputs
        self.labels = labels
        self.teacher_logits = teacher_logits

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"inputs": self.inputs[index], "labels": self.labels[index]}
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits[index]
        return item


def write_synthetic_fashion_mnist(
    folder: str | Path, *, n_train: int = 600, n_test: int = 200, seed: int = 0, compress: bool = True
) -> Path:
    """Write four small Fashion-MNIST-shaped IDX files into ``folder`` (for tests and smoke runs).

    Class ``c`` is a bright horizontal band at rows ``2c..2c+7`` plus uniform noise, so tiny
    models learn it in a few steps but not perfectly. Labels cycle ``0..9``. Returns ``folder``.
    """
    out = Path(folder)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 160, (n, 28, 28)).astype(np.int32)
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 8, 4:24] += 96
        write_idx(out / f"{prefix}-images-idx3-ubyte{suffix}", np.clip(images, 0, 255).astype(np.uint8))
        write_idx(out / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return out
