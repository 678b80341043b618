"""Checkpoints of a :class:`~kdforge.train.Distiller`: save (atomic, verified) and exact resume;
and the export of the trained student (:func:`save_student`).

A checkpoint holds the student, the method's extra modules, the teacher source's tensors (an EMA
teacher's weights, under a reserved prefix of ``extras.safetensors``), optimizer, LR scheduler,
scaler, RNG states and ``trainer_state.json`` (data position, callbacks, schedules, sampler and
source state) — see :mod:`kdforge.train.checkpoint` for the files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kdforge.errors import CheckpointError
from kdforge.train.checkpoint import (
    CheckpointWriter,
    LoadedCheckpoint,
    gather_optimizer_state,
    is_fully_sharded,
    latest_checkpoint,
    prune_checkpoints,
    restore_model_state,
    restore_optimizer_state,
    state_dict_to_bytes,
)

logger = logging.getLogger(__name__)

__all__ = ["resume", "save_checkpoint", "save_student", "trainer_state_dict"]

#: prefix of a teacher source's tensors (an EMA teacher's weights) inside ``extras.safetensors``
SOURCE_PREFIX = "__teacher_source__."


def _split_state(state: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A source's state split into tensors (checkpointed as safetensors) and the rest (JSON)."""
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    return tensors, {k: v for k, v in state.items() if not torch.is_tensor(v)}


def save_checkpoint(d: Any) -> Path:
    """Write ``RUN_DIR/checkpoints/step-N`` atomically (all processes must call this)."""
    acc, state = d.accelerator, d.state
    writer = CheckpointWriter(d.checkpoint_root, state.step)
    if acc.is_main_process:
        writer.begin()
    acc.wait_for_everyone()
    writer.write_rng(acc.process_index)
    student_state = acc.get_state_dict(d.student)
    extras_state = {f"{name}.{k}": v for name, m in d.extras.items()
                    for k, v in acc.get_state_dict(m).items()}
    source_tensors, source_meta = _split_state(d.teacher_source.state_dict() if d.teacher_source else {})
    extras_state.update({SOURCE_PREFIX + k: v for k, v in source_tensors.items()})
    # Under FSDP the optimizer state is sharded: gather the full state (all ranks take part);
    # otherwise the main process's optimizer.state_dict() is the whole state.
    sharded = is_fully_sharded(d.student)
    if sharded and d.extras:
        raise CheckpointError(
            "checkpointing an FSDP-sharded student together with extra learnable modules (projectors) "
            "is not supported: their optimizer state cannot be gathered by the student's parameter names",
            "train methods with extra modules under DDP (configs/accelerate/ddp_8gpu.yaml), or set "
            "save_every: null",
        )
    optim_format, optim_state = "torch", None
    if sharded or acc.is_main_process:
        optim_format, optim_state = gather_optimizer_state(d.student, d._torch_optimizer)
    acc.wait_for_everyone()
    if acc.is_main_process:
        trainer_state = trainer_state_dict(d)
        trainer_state["teacher_source"] = source_meta
        trainer_state["optimizer_format"] = optim_format
        writer.write_main(student_state=student_state, extras_state=extras_state, optimizer=d.optimizer,
                          scheduler=d.scheduler, scaler=getattr(acc, "scaler", None),
                          trainer_state=trainer_state, optimizer_state=optim_state)
        writer.publish()
        prune_checkpoints(d.checkpoint_root, d.config.keep_last)
    acc.wait_for_everyone()
    for cb in d.callbacks:
        cb.on_save(state, writer.final)
    return writer.final

def trainer_state_dict(d: Any) -> dict[str, Any]:
    s = d.state
    return {
        "step": s.step, "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "max_steps": s.max_steps,
        "positions_seen": s.positions_seen, "seed": d.config.seed, "batch_size": d.config.batch_size,
        "grad_accum_steps": d.config.grad_accum_steps, "num_processes": d.accelerator.num_processes,
        "objective": d.objective.keys, "extras": d._extra_names,
        "callbacks": {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(d.callbacks)},
        "last_eval": s.last_eval,
        "schedules": d.schedules.state_dict(),
        "sampler": d.sampler.state_dict() if hasattr(d.sampler, "state_dict") else None,
        "last_logs": {k: v for k, v in (s.last_logs or {}).items() if isinstance(v, int | float | str)},
        "guards": {"empty_batches": d.empty_batches.state_dict(), "nonfinite": d.finite_guard.state_dict()},
    }

def resume(d: Any, resume: bool | str | Path) -> bool:
    """Load a checkpoint; return False when there is none (fresh start)."""
    path = Path(resume) if isinstance(resume, str | Path) else latest_checkpoint(d.checkpoint_root)
    if path is None:
        logger.info("no checkpoint under %s: starting a fresh run", d.checkpoint_root)
        return False
    ckpt = LoadedCheckpoint(path)
    ts = ckpt.trainer_state
    for key, mine in (("batch_size", d.config.batch_size), ("num_processes", d.accelerator.num_processes),
                      ("seed", d.config.seed)):
        if ts.get(key) != mine:
            raise CheckpointError(
                f"checkpoint {path} was written with {key}={ts.get(key)}, this run has {key}={mine}; "
                "the data position cannot be restored exactly",
                f"resume with {key}={ts.get(key)}, or start a fresh run in a new output_dir",
            )
    acc = d.accelerator
    try:
        if is_fully_sharded(d.student):  # every rank keeps its shard of the full state
            restore_model_state(d.student, ckpt.student_state())
        else:
            acc.unwrap_model(d.student).load_state_dict(ckpt.student_state())
        extras_state = ckpt.extras_state() or {}
        if d.teacher_source is not None:
            source_tensors = {k[len(SOURCE_PREFIX):]: v for k, v in extras_state.items()
                              if k.startswith(SOURCE_PREFIX)}
            d.teacher_source.load_state_dict({**(ts.get("teacher_source") or {}), **source_tensors})
        for name, module in d.extras.items():
            prefix = f"{name}."
            acc.unwrap_model(module).load_state_dict(
                {k[len(prefix):]: v for k, v in extras_state.items() if k.startswith(prefix)})
        restore_optimizer_state(d.student, d._torch_optimizer, ckpt.optimizer_state(),
                                ckpt.optimizer_format)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError) as exc:  # torch: size mismatch, missing keys, param groups
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        raise CheckpointError(
            f"checkpoint {path} does not fit this run's student, extra modules or optimizer: {detail[:300]}",
            "resume with the same student architecture and method that wrote it, "
            "or start a fresh run in a new output_dir",
        ) from None
    sched = ckpt.scheduler_state()
    if sched is not None:
        d.scheduler.load_state_dict(sched)
    scaler_state = ckpt.scaler_state()
    if scaler_state is not None and getattr(acc, "scaler", None) is not None:
        acc.scaler.load_state_dict(scaler_state)
    rng = ckpt.rng_state(acc.process_index)
    if rng is not None:
        from kdforge.train.checkpoint import set_rng_state

        set_rng_state(rng)
    s = d.state
    s.step, s.epoch, s.batch_in_epoch = int(ts["step"]), int(ts["epoch"]), int(ts["batch_in_epoch"])
    s.positions_seen = int(ts.get("positions_seen", 0))
    s.last_eval = ts.get("last_eval") or {}
    if ts.get("last_logs"):
        s.last_logs = ts["last_logs"]
    s.should_stop = False
    d.stream.reset()
    if ts.get("schedules"):
        d.schedules.load_state_dict(ts["schedules"])
    guards = ts.get("guards") or {}
    d.empty_batches.load_state_dict(guards.get("empty_batches") or {})
    d.finite_guard.load_state_dict(guards.get("nonfinite") or {})
    if ts.get("sampler") is not None and hasattr(d.sampler, "load_state_dict"):
        d.sampler.load_state_dict(ts["sampler"])
    saved_cbs = ts.get("callbacks", {})
    for i, cb in enumerate(d.callbacks):
        key = f"{i}:{type(cb).__name__}"
        if key in saved_cbs:
            cb.load_state_dict(saved_cbs[key])
    if d._jsonl is not None:
        d._jsonl.resume_step = s.step
    logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, s.step, s.epoch, s.batch_in_epoch)
    return True


def save_student(d: Any, path: str | Path) -> Path:
    """Save the trained student: ``save_pretrained`` for HF models, else ``model.safetensors``."""
    path = Path(path)
    acc = d.accelerator
    model = acc.unwrap_model(d.student)
    state = acc.get_state_dict(d.student)
    if acc.is_main_process:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(path, state_dict=state)
        else:
            from kdforge.io import write_bytes_atomic

            write_bytes_atomic(path / "model.safetensors", state_dict_to_bytes(state))
    acc.wait_for_everyone()
    return path
