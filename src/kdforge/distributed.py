"""Small helpers for multi-process runs (``accelerate launch``, ``torchrun``, ``mpirun``).

kdforge trains with Hugging Face ``accelerate``; this module only adds the checks that
``accelerate`` leaves to the user (see ``docs/scaling.md``):

* :func:`launched_world_size` — how many processes the launcher started (read from the
  environment, before or without any process group).
* :func:`needs_cpu_process_group` — whether an ``Accelerator`` must be built with ``cpu=True``
  for the launched processes to form a (gloo) group: a torchrun-style launch on a machine
  without CUDA. Without it, each process silently trains alone on its own copy of the data.
* :func:`check_process_group` — raise a :class:`~kdforge.errors.DeviceError` when the
  accelerator sees fewer processes than were launched (the silent failure above).
* :func:`wrapper_of` — the data-parallel wrapper (DDP, FSDP, DeepSpeed) around a module, if
  any: a frozen teacher must have none.

Example::

    from accelerate import Accelerator
    from kdforge.distributed import check_process_group, needs_cpu_process_group

    accelerator = Accelerator(cpu=needs_cpu_process_group())
    check_process_group(accelerator)
"""

from __future__ import annotations

import os
from typing import Any

from kdforge.errors import DeviceError

#: environment variables holding the world size, by launcher: torchrun/accelerate, Intel MPI /
#: MPICH (PMI), Open MPI, MVAPICH
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

#: class names of data-parallel wrappers (matched by name: no import of optional packages)
WRAPPER_CLASSES = frozenset({
    "DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine",
    "DataParallel",
})


def launched_world_size() -> int:
    """Number of processes the launcher started (1 when not launched as a group)."""
    for var in WORLD_SIZE_VARS:
        value = os.environ.get(var)
        if value:
            try:
                return max(int(value), 1)
            except ValueError:
                continue
    return 1


def needs_cpu_process_group() -> bool:
    """True when several processes were launched but there is no CUDA device.

    ``accelerate`` only forms a CPU (gloo) process group when the ``Accelerator`` is built with
    ``cpu=True`` (or ``ACCELERATE_USE_CPU=1`` is set); otherwise, on a CPU-only machine, each
    torchrun-launched process believes it is alone.
    """
    if launched_world_size() <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


def check_process_group(accelerator: Any) -> None:
    """Raise :class:`DeviceError` if ``accelerator`` sees fewer processes than were launched.

    Args:
        accelerator: an ``accelerate.Accelerator`` (anything with ``num_processes``).

    Raises:
        DeviceError: e.g. 2 processes launched on a CPU machine without ``ACCELERATE_USE_CPU=1``:
            both would train the full run independently and write to the same folder.
    """
    launched = launched_world_size()
    seen = int(getattr(accelerator, "num_processes", 1))
    if launched > 1 and seen != launched:
        raise DeviceError(
            f"{launched} processes were launched but each sees a world of {seen}: they would train "
            "independently (duplicated work, clashing writes to the same output folder)",
            "on a machine without CUDA export ACCELERATE_USE_CPU=1 before `accelerate launch` (or build "
            "Accelerator(cpu=True)); use configs/accelerate/cpu_2proc.yaml; see docs/scaling.md",
        )


def wrapper_of(module: Any) -> str | None:
    """Class name of the first data-parallel wrapper in ``module`` or its submodules, else None.

    A frozen teacher must return None: wrapping it in DDP adds a gradient all-reduce hook to
    parameters that never get gradients (and DDP refuses modules without trainable parameters);
    FSDP/ZeRO-3 would shard it and gather it at every forward.
    """
    modules = module.modules() if hasattr(module, "modules") else [module]
    for m in modules:
        # FSDP2's fully_shard swaps the class for a subclass named FSDP<Original>: look at the MRO
        for cls in type(m).__mro__:
            if cls.__name__ in WRAPPER_CLASSES:
                return cls.__name__
    return None


def broadcast_from_main(obj: Any) -> Any:
    """``obj`` as the main process (rank 0) has it, on every process (picklable objects).

    A decision that several processes must take together (skip a finished sub-run, resume from
    this checkpoint) is made once, on rank 0, and shared: if each rank read the files itself, a
    rank that saw a file another had not yet seen would take another branch and the group would
    hang at its next collective. Outside an initialised ``torch.distributed`` group, returns
    ``obj`` unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
