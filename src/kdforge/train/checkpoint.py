"""Atomic, verifiable, resumable checkpoints.

Layout of ``RUN_DIR/checkpoints/step-N/``::

    student.safetensors     student weights (tied tensors stored once, aliases in the metadata)
    extras.safetensors      the method's extra learnable modules (projectors...), if any; never
                            inside the student file
    optimizer.pt            optimizer state: ``optimizer.state_dict()`` (one process, DDP), or under
                            FSDP the *full* state gathered from every shard, keyed by parameter
                            name (``trainer_state.json`` ``optimizer_format``: "torch" / "full-fqn")
    scheduler.pt            LR scheduler state_dict
    scaler.pt               fp16 grad-scaler state (fp16 runs only)
    rng-rank<R>.pt          python / numpy / torch / CUDA RNG states of process R
    trainer_state.json      step, data position (epoch, batch in epoch), callback states
    checksums.json          SHA-256 of every file above; written last

Sharded training (FSDP1/FSDP2): parameters and optimizer moments live in shards, one per
process, so ``optimizer.state_dict()`` on the main process would save one shard only. The
student and optimizer states are then gathered into full, unsharded state dicts with
``torch.distributed.checkpoint.state_dict`` (a collective every process joins) and written by the
main process; on resume every process reads the full state and keeps its own shard
(:func:`gather_optimizer_state`, :func:`restore_optimizer_state`, :func:`restore_model_state`).
The layout stays the same single-folder, checksummed one, and such a checkpoint can be resumed
under another number of processes' shards (the data position still requires the same count).

The folder is assembled under ``checkpoints/.tmp-step-N`` and renamed into place with
``os.replace``, so a crash leaves either no ``step-N`` or a complete one. A folder whose
checksums do not match (truncated copy, disk error, manual edit) raises
:class:`~kdforge.errors.CheckpointError` naming the folder and the fix.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kdforge.errors import CheckpointError
from kdforge.io import ensure_dir, os_errors, sha256_file, write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"
STATE = "trainer_state.json"


# -- tensors -----------------------------------------------------------------------------------
def state_dict_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a state dict; tensors sharing memory (tied weights) are stored once."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.to("cpu").contiguous()
    return st_save(tensors, metadata={"kdforge_aliases": json.dumps(aliases)})


def state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    aliases = json.loads(header.get("__metadata__", {}).get("kdforge_aliases", "{}"))
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    return tensors


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


# -- sharded (FSDP) model and optimizer state -------------------------------------------------
#: ``optimizer.pt`` formats: this process's ``optimizer.state_dict()`` (parameter indices), or the
#: full state gathered from all FSDP shards, keyed by parameter name (fully qualified name)
OPTIMIZER_FORMATS = ("torch", "full-fqn")


def is_fully_sharded(module: Any) -> bool:
    """True when ``module`` or a submodule is FSDP-wrapped (FSDP1 ``FullyShardedDataParallel`` or
    FSDP2 ``fully_shard``): its parameters and optimizer state are split over processes."""
    from kdforge.distributed import wrapper_of

    return wrapper_of(module) in ("FullyShardedDataParallel", "FSDPModule")


def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[str, dict[str, Any]]:
    """``(format, state)`` of ``optimizer`` for ``optimizer.pt``.

    Unsharded ``model`` (one process, DDP): ``("torch", optimizer.state_dict())``, complete on
    every process. FSDP ``model``: a collective (**every process must call it**) that gathers the
    full, unsharded state keyed by parameter name, on CPU, on rank 0 (``{}`` elsewhere):
    ``("full-fqn", state)``. ``optimizer`` is the torch optimizer (unwrap accelerate's
    ``AcceleratedOptimizer`` first).
    """
    if not is_fully_sharded(model):
        return "torch", optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return "full-fqn", get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of ``model`` (collective under FSDP: every process calls it; rank 0 gets it)."""
    if not is_fully_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def restore_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Any,
                            fmt: str = "torch") -> None:
    """Load ``state`` written by :func:`gather_optimizer_state` into ``optimizer``.

    ``"full-fqn"`` goes through ``set_optimizer_state_dict``: under FSDP each process keeps its
    own shard of the full state (every process must call it); for an unsharded model it loads the
    whole state, so a checkpoint written under FSDP also resumes in one process.
    """
    if fmt not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"unknown optimizer state format {fmt!r}",
                              f"this kdforge reads {', '.join(OPTIMIZER_FORMATS)}; upgrade kdforge")
    if fmt == "torch":
        if is_fully_sharded(model):
            raise CheckpointError(
                "this checkpoint holds one process's optimizer state (format 'torch'), but the student is "
                "now sharded with FSDP: each shard would get the wrong moments",
                "resume it without FSDP (the launch config it was written with), or start a fresh run",
            )
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_full_options())


def restore_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a full state dict into ``model`` (under FSDP every process keeps its shard; collective)."""
    if not is_fully_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # Each tensor is scattered to the shards by a collective, in the dict's order: every rank must
    # use the same order, and a safetensors file's load order is not fixed across processes.
    order = {name: i for i, name in enumerate(model.state_dict())}
    ordered = dict(sorted(state.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    set_model_state_dict(model, ordered, options=_full_options())


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (CPU) and CUDA RNG states of this process (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(obj: Any) -> Any:
    return tuple(_to_tuple(x) for x in obj) if isinstance(obj, list | tuple) else obj


# -- folders -----------------------------------------------------------------------------------
def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-N`` folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against ``checksums.json``; return the parsed trainer state.

    Raises:
        CheckpointError: the folder is missing, incomplete, or a file does not match its checksum.
    """
    path = Path(path)
    fix = (f"delete {path} to resume from the previous checkpoint "
           f"(or start a fresh run with resume=False / a new output_dir)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist", "pass an existing step-N folder")
    try:
        sums = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {path} has no readable {CHECKSUMS} (incomplete or corrupted)", fix) from None
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}", fix)
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (truncated or corrupted)", fix)
    for required in ("student.safetensors", STATE):
        if required not in sums:
            raise CheckpointError(f"checkpoint {path} lacks {required}", fix)
    return json.loads((path / STATE).read_text(encoding="utf-8"))


class CheckpointWriter:
    """Assembles one checkpoint in a temporary folder, then publishes it atomically.

    Multi-process use: the main process calls :meth:`begin`; after a barrier every process calls
    :meth:`write_rng`; after another barrier the main process calls :meth:`write_main` and
    :meth:`publish`.
    """

    def __init__(self, root: str | Path, step: int) -> None:
        self.root = Path(root)
        self.step = int(step)
        self.tmp = self.root / f".tmp-step-{self.step}"
        self.final = self.root / f"step-{self.step}"

    def begin(self) -> None:
        """Create the temporary folder; remove leftovers of writes interrupted by a crash."""
        if self.root.is_dir():
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        ensure_dir(self.root)
        with os_errors("creating the folder", self.tmp):
            self.tmp.mkdir()

    def write_rng(self, rank: int) -> None:
        write_bytes_atomic(self.tmp / f"rng-rank{rank}.pt", _torch_bytes(rng_state()))

    def write_main(self, *, student_state: Mapping[str, torch.Tensor],
                   extras_state: Mapping[str, torch.Tensor] | None, optimizer: Any, scheduler: Any,
                   scaler: Any, trainer_state: dict[str, Any], optimizer_state: Any = None) -> None:
        """Write the main process's files. ``optimizer_state`` (e.g. from
        :func:`gather_optimizer_state`) replaces ``optimizer.state_dict()`` when given."""
        write_bytes_atomic(self.tmp / "student.safetensors", state_dict_to_bytes(student_state))
        if extras_state:
            write_bytes_atomic(self.tmp / "extras.safetensors", state_dict_to_bytes(extras_state))
        if optimizer_state is None:
            optimizer_state = optimizer.state_dict()
        write_bytes_atomic(self.tmp / "optimizer.pt", _torch_bytes(optimizer_state))
        if scheduler is not None:
            write_bytes_atomic(self.tmp / "scheduler.pt", _torch_bytes(scheduler.state_dict()))
        if scaler is not None:
            write_bytes_atomic(self.tmp / "scaler.pt", _torch_bytes(scaler.state_dict()))
        write_json_atomic(self.tmp / STATE, trainer_state)

    def publish(self) -> Path:
        sums = {p.name: sha256_file(p) for p in sorted(self.tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
        write_json_atomic(self.tmp / CHECKSUMS, sums)
        old = None
        with os_errors("publishing the checkpoint", self.final):
            if self.final.exists():
                old = self.root / f".old-step-{self.step}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(self.final, old)
            os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", self.final)
        return self.final


def prune_checkpoints(root: str | Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``step-N`` folders; return the deleted paths."""
    if keep_last is None:
        return []
    dirs = step_dirs(root)
    doomed = [p for _, p in dirs[: max(len(dirs) - keep_last, 0)]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


class LoadedCheckpoint:
    """Lazy accessors for the parts of a verified checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.trainer_state = verify_checkpoint(self.path)

    def _load(self, name: str) -> Any:
        try:
            return _torch_load(self.path / name)
        except Exception as exc:  # unpickling errors come in many types
            raise CheckpointError(f"cannot read {self.path / name}: {exc}",
                                  f"delete {self.path} to resume from the previous checkpoint") from None

    def student_state(self) -> dict[str, torch.Tensor]:
        return state_dict_from_bytes((self.path / "student.safetensors").read_bytes())

    def extras_state(self) -> dict[str, torch.Tensor] | None:
        f = self.path / "extras.safetensors"
        return state_dict_from_bytes(f.read_bytes()) if f.is_file() else None

    def optimizer_state(self) -> Any:
        return self._load("optimizer.pt")

    @property
    def optimizer_format(self) -> str:
        """``"torch"`` (also for checkpoints written before the format was recorded) or ``"full-fqn"``."""
        return str(self.trainer_state.get("optimizer_format", "torch"))

    def scheduler_state(self) -> Any | None:
        return self._load("scheduler.pt") if (self.path / "scheduler.pt").is_file() else None

    def scaler_state(self) -> Any | None:
        return self._load("scaler.pt") if (self.path / "scaler.pt").is_file() else None

    def rng_state(self, rank: int) -> Any | None:
        f = self.path / f"rng-rank{rank}.pt"
        return self._load(f.name) if f.is_file() else None
