"""Does a pre-flight :class:`~kdforge.preflight.estimate.Estimate` fit this machine?

:func:`available_memory` reads what the device has free (``torch.cuda.mem_get_info`` on a GPU,
``MemAvailable`` on the CPU), :func:`check_free_disk` the free space under the output folder;
:func:`check_fits` records a :class:`~kdforge.preflight.problems.Problem` for each that is short
(``kdforge run --force`` skips this check).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from kdforge.preflight.checks import nearest_existing
from kdforge.preflight.estimate import Estimate, Item, fmt_bytes
from kdforge.preflight.problems import Problems

__all__ = ["available_memory", "check_fits", "check_free_disk"]


def available_memory(device: str = "cpu") -> int | None:
    """Free bytes on ``device`` (``cuda``/``cuda:N``: the GPU's free memory; else the host's
    available RAM); None when unknown."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = int(str(device).partition(":")[2] or 0)
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_free_disk(problems: Problems, key: str, path: Path, need_bytes: int) -> None:
    """The disk of ``path`` has at least ``need_bytes`` free (the pre-flight estimate of what the
    run writes)."""
    try:
        free = shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return
    if need_bytes > free:
        problems.add(key, f"the run will write about {fmt_bytes(need_bytes)} but the disk of {path} has "
                          f"{fmt_bytes(free)} free",
                     "free disk space, write elsewhere with -o NEW_DIR, or shrink the run (fewer sequences, "
                     "a smaller cache k, save_students: false); --force runs anyway")


def check_fits(problems: Problems, estimate: Estimate, output_dir: Path,
               available: int | None = None) -> None:
    """Problems when the memory lines exceed what ``estimate.device`` has free, or the disk lines
    the free space under ``output_dir``."""
    free = available if available is not None else available_memory(estimate.device)
    need = estimate.memory_bytes
    if free is not None and need > free:
        biggest = ", ".join(f"{i.name} {fmt_bytes(i.bytes)}" for i in _largest(estimate.items, "memory"))
        problems.add("memory", f"the run needs about {fmt_bytes(need)} of memory on {estimate.device} "
                               f"({biggest}...), {fmt_bytes(free)} is available",
                     "use a smaller batch_size or seq_len, chunked: true (logits in chunks), a smaller "
                     "teacher/student or bfloat16, free memory, or pass --force to run anyway")
    if estimate.disk_bytes:
        check_free_disk(problems, "disk", output_dir, estimate.disk_bytes)


def _largest(items: Iterable[Item], kind: str, n: int = 3) -> list[Item]:
    return sorted((i for i in items if i.kind == kind), key=lambda i: -i.bytes)[:n]

