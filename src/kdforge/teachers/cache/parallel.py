"""Data-parallel cache builds: which processes build together and which shards each one writes.

Under ``accelerate launch`` / ``torchrun`` with ``N`` processes, a data-parallel build
(:func:`~kdforge.teachers.cache.writer.write_teacher_cache` with ``data_parallel=True``, or
``kdforge cache-teacher``) runs in three phases:

1. rank 0 takes the folder lock, verifies what an earlier (possibly killed) build left and writes
   the manifest listing the finished shards; barrier;
2. every rank reads that manifest, takes every ``N``-th of the *unfinished* shards
   (:func:`assign_shards`) and writes them, each followed by its own progress record
   (``.progress-rank<R>.json``, rewritten atomically); barrier;
3. rank 0 merges the progress records into the manifest once (atomically) and deletes them;
   barrier.

Shard boundaries and batches depend only on ``shard_size`` and ``batch_size``, never on ``N``, so
shard bytes and the manifest are the same for any number of processes, and a build killed with
one ``N`` resumes with any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdforge.errors import CacheError

log = logging.getLogger(__name__)

PROGRESS_GLOB = ".progress-rank*.json"


def progress_name(rank: int) -> str:
    """File name of rank ``rank``'s progress record (a hidden file next to the shards)."""
    return f".progress-rank{rank:05d}.json"


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class BuildGroup:
    """The processes that build one cache together.

    Attributes:
        rank: this process's index in ``[0, world_size)``; rank 0 owns the lock and the manifest.
        world_size: number of processes writing shards.
        barrier: blocks until every process of the group has called it.
    """

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise CacheError(
                f"invalid build group: rank {self.rank} of {self.world_size} processes",
                "pass 0 <= rank < world_size",
            )


def join_launch_group() -> BuildGroup:
    """The group of the current multi-process launch; a single-process group when not launched.

    Uses an existing ``torch.distributed`` process group if there is one; otherwise, when the
    launcher started several processes, forms one through ``accelerate.PartialState`` (gloo on a
    machine without CUDA, see :func:`kdforge.distributed.needs_cpu_process_group`).

    Raises:
        DeviceError: the launched processes could not form one group (each would build alone).
    """
    import torch.distributed as dist

    from kdforge.distributed import (
        check_process_group,
        launched_world_size,
        needs_cpu_process_group,
    )

    if dist.is_available() and dist.is_initialized():
        return BuildGroup(dist.get_rank(), dist.get_world_size(), dist.barrier)
    if launched_world_size() <= 1:
        return BuildGroup()
    from accelerate import PartialState

    state = PartialState(cpu=needs_cpu_process_group())
    check_process_group(state)
    return BuildGroup(state.process_index, state.num_processes, state.wait_for_everyone)


def assign_shards(pending: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The unfinished shard indices rank ``rank`` writes: every ``world_size``-th, from ``rank``.

    Round-robin over the *pending* list (not over all shards), so a resumed build spreads the
    remaining work evenly whatever ``world_size`` the killed build had; ranks differ by at most
    one shard.
    """
    return list(pending[rank::world_size])


def progress_files(out: Path) -> list[Path]:
    return sorted(out.glob(PROGRESS_GLOB))
