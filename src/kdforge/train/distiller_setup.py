"""How a :class:`~kdforge.train.Distiller` is put together: task check, transform chain,
accelerator, teacher placement, optimizer, data and callbacks.

Each function takes the distiller (``d``) being built and sets its attributes; the Distiller's
``__init__`` calls them in a fixed order (the order matters: the optimizer must exist before the
LR scheduler, the state before the callbacks' context).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn

from kdforge.config import validate
from kdforge.distributed import needs_cpu_process_group, wrapper_of
from kdforge.errors import CheckpointError, ConfigError
from kdforge.io import write_text_atomic
from kdforge.train import tracking
from kdforge.train.callbacks import (
    Callback,
    JsonlLogger,
    ProgressBar,
    TrainerState,
    TrainingContext,
)
from kdforge.train.guards import EmptyBatches, FiniteGuard
from kdforge.train.objective import Objective
from kdforge.train.onpolicy import GenerateFn, OnPolicyConfig
from kdforge.train.optim import (
    lr_lambda,
    new_accelerator,
    param_groups,
    refuse_meta,
    resolve_mixed_precision,
)
from kdforge.train.sampler import EpochSampler
from kdforge.train.stream import BatchStream, dataset_of
from kdforge.train.tasks import CausalLMTask, Task
from kdforge.train.transforms import BatchTransform, OnPolicyTransform

# the Distiller's logger: its set-up warnings keep the name users filter on
logger = logging.getLogger("kdforge.train.distiller")

__all__ = ["check_task", "make_accelerator", "setup_callbacks", "setup_data", "setup_optimization",
           "setup_teacher", "transform_chain"]


def check_task(objective: Objective, task: Task) -> Task:
    """``task``, refused when it is no kdforge Task or lacks a term the objective takes from it."""
    if not isinstance(task, Task):
        raise ConfigError(f"task must be a kdforge Task, got {type(task).__name__}",
                          "pass ClassificationTask() or CausalLMTask()")
    missing = [n for n in objective.task_terms if n not in task.term_names]
    if missing:
        raise ConfigError(
            f"objective terms {missing} have source 'task', but {type(task).__name__} computes "
            f"{list(task.term_names) or 'no extra terms'}",
            "use a task that provides them, or make them registered losses (source: loss)",
        )
    return task


def transform_chain(d: Any, on_policy: Any, generate_fn: GenerateFn | None,
                    extra: Iterable[BatchTransform]) -> list[BatchTransform]:
    """The batch transforms: on-policy GKD first (when ``on_policy`` is given), then ``extra``."""
    chain: list[BatchTransform] = []
    if on_policy is not None:
        op = on_policy if isinstance(on_policy, OnPolicyConfig) else validate(OnPolicyConfig, dict(on_policy), source="on_policy")
        if not isinstance(d.task, CausalLMTask):
            raise ConfigError("on-policy distillation works with CausalLMTask only", "use CausalLMTask()")
        if d.teacher_source is None or not d.teacher_source.scores_new_samples:
            raise ConfigError("on-policy distillation needs an online teacher module to score student samples",
                              "pass teacher= (a cached top-k signal cannot score new samples)")
        chain.append(OnPolicyTransform(op, generate_fn, seed=d.config.seed))
    return [*chain, *extra]


def make_accelerator(d: Any) -> Any:
    """An ``accelerate.Accelerator`` from ``d.config`` (mixed precision, trackers under ``d.run_dir``)."""
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {"mixed_precision": resolve_mixed_precision(d.config.mixed_precision)}
    if needs_cpu_process_group():  # torchrun-style launch on a CPU-only machine: join a gloo group
        kwargs["cpu"] = True
    kwargs.update(tracking.accelerator_kwargs(d.config.log_with, d.run_dir))  # ConfigError if not installed
    return new_accelerator(Accelerator, kwargs)


def setup_teacher(d: Any, student: nn.Module, teacher_device: Any) -> None:
    """Freeze the source's modules and place them (the teacher is never prepared/wrapped)."""
    source = d.teacher_source
    if source is None:
        return
    for module in source.modules():
        refuse_meta(module, "teacher")
        module.requires_grad_(False)
        module.eval()
        shared = {id(p) for p in module.parameters()} & {id(p) for p in student.parameters()}
        if shared:
            logger.warning("%d parameter tensors are shared by teacher and student; they are frozen "
                           "(the teacher is frozen) and not trained", len(shared))
    if teacher_device == "auto":
        source.place(d.accelerator.device)
    elif teacher_device is not None:
        for module in source.modules():
            module.to(teacher_device)


def setup_optimization(d: Any, student: nn.Module, extra_modules: dict[str, nn.Module],
                       optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None) -> None:
    """Optimizer over the student's and the method's trainable parameters; accelerate prepares them."""
    d._extra_names = list(extra_modules)
    extras = list(extra_modules.values())
    groups = param_groups([student, *extras], d.config.weight_decay)
    if optimizer_factory is not None:
        optimizer = optimizer_factory(groups)
    else:
        optimizer = torch.optim.AdamW(groups, lr=d.config.lr, betas=d.config.betas)
    # only modules with trainable parameters are prepared (DDP refuses a module without any, e.g. feature
    # terms whose projectors are all identities); the others just move to the device
    learned = [any(p.requires_grad for p in m.parameters()) for m in extras]
    d.student, *prepared, d.optimizer = d.accelerator.prepare(
        student, *[m for m, t in zip(extras, learned) if t], optimizer)
    ready = iter(prepared)
    d.extras = {name: next(ready) if t else m.to(d.accelerator.device)
                for name, m, t in zip(d._extra_names, extras, learned)}
    if d.config.save_every and wrapper_of(d.student) == "DeepSpeedEngine":
        # ZeRO partitions the optimizer state inside the engine: a checkpoint of rank 0's view
        # would resume with the wrong moments. Refuse before training, not at the first save.
        raise CheckpointError(
            "save_every is set, but kdforge checkpoints cannot save DeepSpeed ZeRO's partitioned "
            "optimizer state (a resume would be silently wrong)",
            "use FSDP for a sharded, resumable run (configs/accelerate/fsdp_8gpu.yaml), or set "
            "save_every: null under DeepSpeed",
        )


def setup_data(d: Any, train_data: Any, eval_data: Any, collate_fn: Any, sampler: Any) -> None:
    """Data (kdforge owns the default sampler: order = f(seed, epoch), resumable mid-epoch), the
    trainer state, the step count, the guards, the LR scheduler and the objective's schedules."""
    acc, cfg = d.accelerator, d.config
    dataset, d.collate_fn = dataset_of(train_data, collate_fn, "train_data")
    d.train_dataset = dataset
    d.eval_data = eval_data
    d.sampler = sampler if sampler is not None else EpochSampler(
        len(dataset), seed=cfg.seed, shuffle=True, num_replicas=acc.num_processes, rank=acc.process_index)
    d.state = TrainerState(run_dir=d.run_dir, is_main_process=acc.is_main_process)
    d.stream = BatchStream(dataset, d.collate_fn, d.sampler, batch_size=cfg.batch_size, seed=cfg.seed,
                           num_workers=d.num_workers, device=acc.device, state=d.state)
    d.batches_per_epoch = d.stream.batches_per_epoch
    max_steps = cfg.max_steps if cfg.max_steps is not None else math.ceil(
        cfg.epochs * d.batches_per_epoch / cfg.grad_accum_steps)
    d.state.max_steps, d.state.batches_per_epoch = max_steps, d.batches_per_epoch
    d.empty_batches = EmptyBatches(cfg.empty_start_batches, d.batches_per_epoch,
                                   f"the training data ({type(dataset).__name__}, {len(dataset)} examples)")
    d.finite_guard = FiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite_skips)
    d.scheduler = torch.optim.lr_scheduler.LambdaLR(
        d._torch_optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, max_steps))
    d.schedules = d.objective.schedules(max_steps)
    if eval_data is None and cfg.eval_every:
        logger.warning("eval_every=%d is set but no eval_data was given: periodic evaluation is off",
                       cfg.eval_every)


def setup_callbacks(d: Any, callbacks: Iterable[Callback], run_config: Any) -> None:
    """The callbacks (the user's, then progress bar and ``metrics.jsonl``), their shared context,
    and ``RUN_DIR/config.yaml``."""
    # User callbacks run first, so metrics they add to a record (e.g. the teacher-hacking
    # monitor's flags) reach the progress bar and metrics.jsonl written by the built-ins.
    d.callbacks = list(callbacks)
    d._jsonl = None
    if tracking.progress_enabled(d.config.progress):
        d.callbacks.append(ProgressBar())
    if d.run_dir is not None:
        d._jsonl = JsonlLogger(d.run_dir / "metrics.jsonl")
        d.callbacks.append(d._jsonl)
    d.context = TrainingContext(d)
    for cb in d.callbacks:
        cb.context = d.context
    if d.run_dir is not None and run_config is not None and d.accelerator.is_main_process:
        data = run_config.model_dump(mode="json") if isinstance(run_config, BaseModel) else dict(run_config)
        write_text_atomic(d.run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))
