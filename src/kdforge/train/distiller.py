"""The :class:`Distiller` training loop (on Hugging Face ``accelerate``).

The loop is short because the work lives in small pieces, each replaceable:

* a :class:`~kdforge.teachers.sources.TeacherSource` gives the teacher signal of a batch (a live
  model, a cache, a server, an ensemble, the student's EMA) — decided once, in :func:`as_source`;
* a :class:`~kdforge.train.tasks.Task` runs the student on a batch (logits, labels, mask);
* an :class:`~kdforge.train.Objective` sums weighted registered losses over real positions;
* :mod:`~kdforge.train.transforms` rewrite micro-batches (on-policy GKD is one);
* a sampler orders the data (:mod:`~kdforge.train.stream`); callbacks see a
  :class:`~kdforge.train.callbacks.TrainingContext`; :mod:`~kdforge.train.checkpoint` writes
  atomic, verified checkpoints.

The step is public: :meth:`Distiller.compute_loss` (one micro-batch -> :class:`ObjectiveValue`)
and :meth:`Distiller.training_step` (one optimizer step); a regime overrides either.

One optimizer step = ``grad_accum_steps`` micro-batches. Their real positions are counted first
and summed over processes (``N``); every loss term is a ``reduction="sum"`` value divided by
``N``, so the update equals one big batch exactly (see :mod:`kdforge.train.objective`). Inputs
are validated on the first micro-batch and whenever the batch layout changes. A step has two
blocking host reads: the per-micro-batch position counts before the forward passes (empty
micro-batches are skipped, training on nothing is an error) and the finiteness of the losses and
the gradient before the update (:mod:`kdforge.train.guards`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdforge.config import validate
from kdforge.distributed import check_process_group, needs_cpu_process_group, wrapper_of
from kdforge.errors import CheckpointError, ConfigError, NonFiniteError
from kdforge.io import write_text_atomic
from kdforge.losses import value_checks
from kdforge.teachers.sources import TeacherSource, as_source
from kdforge.train import evaluation, persistence, tracking
from kdforge.train.callbacks import (
    Callback,
    JsonlLogger,
    ProgressBar,
    TrainerState,
    TrainingContext,
)
from kdforge.train.checkpoint import (
    latest_checkpoint,
)
from kdforge.train.config import TrainConfig
from kdforge.train.guards import EmptyBatches, FiniteGuard, grad_norm_of
from kdforge.train.objective import LossTerm, NoSchedules, Objective, ObjectiveValue
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
from kdforge.train.tasks import (
    CausalLMTask,
    Task,
    TaskOutput,
    attach_teacher,
    count_positions,
    pick_source,
)
from kdforge.train.transforms import BatchTransform, OnPolicyTransform, StepContext

logger = logging.getLogger(__name__)

__all__ = ["Distiller", "lr_lambda", "resolve_mixed_precision"]


class Distiller:
    """Train a student to match a teacher signal on a dataset.

    Args:
        student: the trainable model.
        teacher: a :class:`~kdforge.teachers.sources.TeacherSource` (``OnlineTeacher``,
            ``CachedTeacher``, ``ServedTeacher``, ``EnsembleTeacher``, ``SelfTeacher``...), a frozen
            ``nn.Module`` (wrapped in an ``OnlineTeacher``: frozen, eval mode, never wrapped by
            accelerate), or None (labels only, or batches that carry a cached signal).
        task: a :class:`~kdforge.train.tasks.Task` (``ClassificationTask()``, ``CausalLMTask()``).
        objective: an :class:`Objective` or a list of loss-term dicts.
        config: :class:`TrainConfig` or a dict validated into one.
        train_data: a map-style dataset (or a DataLoader, whose dataset and collate_fn are reused:
            kdforge owns the sampler so that order depends only on (seed, epoch)).
        eval_data: dataset or DataLoader for :meth:`evaluate`.
        collate_fn: batch collation (default: torch's).
        extra_modules: learnable modules of the method (projectors...): optimised with the student,
            checkpointed separately, passed to the task as ``extras``.
        callbacks: extra :class:`Callback` objects.
        eval_fn: ``eval_fn(student) -> dict`` of extra eval metrics (prefixed ``eval/``).
        on_policy: :class:`OnPolicyConfig` (or dict): GKD, as the first batch transform; needs a
            causal-LM task and a teacher that can score new samples.
        generate_fn: generation backend for GKD (default :class:`~kdforge.train.onpolicy.HFGenerator`).
        transforms: further :class:`~kdforge.train.transforms.BatchTransform` objects, applied in order.
        sampler: a sampler replacing the default :class:`EpochSampler` (see :mod:`kdforge.train.stream`).
        run_config: the full job config; written to ``RUN_DIR/config.yaml``.
        accelerator: an existing ``accelerate.Accelerator`` (default: one built from ``config``).
        teacher_device: ``"auto"`` places the teacher on the accelerator's device (unless the
            source was given its own device), None leaves it where it is, anything else moves it there.
        vocab_policy: how a teacher's vocabulary meets the student's (``"exact"`` or
            ``"shared_prefix"``, see :func:`kdforge.teachers.vocab.align_signal`).
        num_workers: DataLoader worker processes.
        optimizer_factory: ``f(param_groups) -> Optimizer`` replacing the default AdamW (groups
            carry ``weight_decay``: ``config.weight_decay`` for matrices, 0 for biases/norms; the
            factory sets ``lr`` and the rest).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Any = None,
        *,
        task: Task,
        objective: Objective | Sequence[LossTerm | Mapping[str, Any]],
        config: TrainConfig | Mapping[str, Any],
        train_data: Dataset | DataLoader,
        eval_data: Dataset | DataLoader | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        extra_modules: Mapping[str, nn.Module] | None = None,
        callbacks: Iterable[Callback] = (),
        eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
        on_policy: OnPolicyConfig | Mapping[str, Any] | None = None,
        generate_fn: GenerateFn | None = None,
        transforms: Iterable[BatchTransform] = (),
        sampler: Any = None,
        run_config: BaseModel | Mapping[str, Any] | None = None,
        accelerator: Any = None,
        teacher_device: str | torch.device | None = "auto",
        vocab_policy: str = "exact",
        num_workers: int = 0,
        optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
    ) -> None:
        self.config = config if isinstance(config, TrainConfig) else validate(TrainConfig, dict(config), source="train config")
        self.objective = objective if isinstance(objective, Objective) else Objective(objective)
        self.task = self._check_task(task)
        self.eval_fn, self.num_workers, self.vocab_policy = eval_fn, num_workers, vocab_policy
        self.run_dir = Path(self.config.output_dir) if self.config.output_dir else None
        self.teacher = teacher
        self.teacher_source: TeacherSource | None = as_source(teacher)
        self.transforms: list[BatchTransform] = self._transforms(on_policy, generate_fn, transforms)
        self.accelerator = accelerator or self._make_accelerator()
        check_process_group(self.accelerator)  # launched processes that formed no group would each train alone
        refuse_meta(student, "student")
        self._setup_teacher(student, teacher_device)
        if self.objective.feature_terms:  # bind() returns the same modules on a repeat call
            extra_modules = {**self.objective.bind(student, self.teacher_source), **dict(extra_modules or {})}
        self._setup_optimization(student, dict(extra_modules or {}), optimizer_factory)
        self._setup_data(train_data, eval_data, collate_fn, sampler)
        self._setup_callbacks(callbacks, run_config)
        self._layout: Any = None  # the batch layout last validated (keys, dtypes, ranks)
        self._largest: dict[str, tuple[int, ...]] = {}  # the largest shape seen per batch key
        self._value_checks = True  # the losses check values (host reads) on this micro-batch

    # -- setup -------------------------------------------------------------------------------
    def _check_task(self, task: Task) -> Task:
        if not isinstance(task, Task):
            raise ConfigError(f"task must be a kdforge Task, got {type(task).__name__}",
                              "pass ClassificationTask() or CausalLMTask()")
        missing = [n for n in self.objective.task_terms if n not in task.term_names]
        if missing:
            raise ConfigError(
                f"objective terms {missing} have source 'task', but {type(task).__name__} computes "
                f"{list(task.term_names) or 'no extra terms'}",
                "use a task that provides them, or make them registered losses (source: loss)",
            )
        return task

    def _transforms(self, on_policy: Any, generate_fn: GenerateFn | None,
                    extra: Iterable[BatchTransform]) -> list[BatchTransform]:
        chain: list[BatchTransform] = []
        if on_policy is not None:
            op = on_policy if isinstance(on_policy, OnPolicyConfig) else validate(OnPolicyConfig, dict(on_policy), source="on_policy")
            if not isinstance(self.task, CausalLMTask):
                raise ConfigError("on-policy distillation works with CausalLMTask only", "use CausalLMTask()")
            if self.teacher_source is None or not self.teacher_source.scores_new_samples:
                raise ConfigError("on-policy distillation needs an online teacher module to score student samples",
                                  "pass teacher= (a cached top-k signal cannot score new samples)")
            chain.append(OnPolicyTransform(op, generate_fn, seed=self.config.seed))
        return [*chain, *extra]

    @property
    def on_policy(self) -> Any:
        """The GKD batcher when on-policy distillation is on (the first transform), else None."""
        first = self.transforms[0] if self.transforms else None
        return first.batcher if isinstance(first, OnPolicyTransform) else None

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator

        kwargs: dict[str, Any] = {"mixed_precision": resolve_mixed_precision(self.config.mixed_precision)}
        if needs_cpu_process_group():  # torchrun-style launch on a CPU-only machine: join a gloo group
            kwargs["cpu"] = True
        kwargs.update(tracking.accelerator_kwargs(self.config.log_with, self.run_dir))  # ConfigError if not installed
        return new_accelerator(Accelerator, kwargs)

    def _setup_teacher(self, student: nn.Module, teacher_device: Any) -> None:
        """Freeze the source's modules and place them (the teacher is never prepared/wrapped)."""
        source = self.teacher_source
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
            source.place(self.accelerator.device)
        elif teacher_device is not None:
            for module in source.modules():
                module.to(teacher_device)

    def _setup_optimization(self, student: nn.Module, extra_modules: dict[str, nn.Module],
                            optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None) -> None:
        """Optimizer over the student's and the method's trainable parameters; accelerate prepares them."""
        self._extra_names = list(extra_modules)
        extras = list(extra_modules.values())
        groups = param_groups([student, *extras], self.config.weight_decay)
        if optimizer_factory is not None:
            optimizer = optimizer_factory(groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)
        # only modules with trainable parameters are prepared (DDP refuses a module without any, e.g. feature
        # terms whose projectors are all identities); the others just move to the device
        learned = [any(p.requires_grad for p in m.parameters()) for m in extras]
        self.student, *prepared, self.optimizer = self.accelerator.prepare(
            student, *[m for m, t in zip(extras, learned) if t], optimizer)
        ready = iter(prepared)
        self.extras: dict[str, nn.Module] = {name: next(ready) if t else m.to(self.accelerator.device)
                                             for name, m, t in zip(self._extra_names, extras, learned)}
        if self.config.save_every and wrapper_of(self.student) == "DeepSpeedEngine":
            # ZeRO partitions the optimizer state inside the engine: a checkpoint of rank 0's view
            # would resume with the wrong moments. Refuse before training, not at the first save.
            raise CheckpointError(
                "save_every is set, but kdforge checkpoints cannot save DeepSpeed ZeRO's partitioned "
                "optimizer state (a resume would be silently wrong)",
                "use FSDP for a sharded, resumable run (configs/accelerate/fsdp_8gpu.yaml), or set "
                "save_every: null under DeepSpeed",
            )

    def _setup_data(self, train_data: Any, eval_data: Any, collate_fn: Any, sampler: Any) -> None:
        """Data (kdforge owns the default sampler: order = f(seed, epoch), resumable mid-epoch)."""
        acc, cfg = self.accelerator, self.config
        dataset, self.collate_fn = dataset_of(train_data, collate_fn, "train_data")
        self.train_dataset = dataset
        self.eval_data = eval_data
        self.sampler = sampler if sampler is not None else EpochSampler(
            len(dataset), seed=cfg.seed, shuffle=True, num_replicas=acc.num_processes, rank=acc.process_index)
        self.state = TrainerState(run_dir=self.run_dir, is_main_process=acc.is_main_process)
        self.stream = BatchStream(dataset, self.collate_fn, self.sampler, batch_size=cfg.batch_size, seed=cfg.seed,
                                  num_workers=self.num_workers, device=acc.device, state=self.state)
        self.batches_per_epoch = self.stream.batches_per_epoch
        max_steps = cfg.max_steps if cfg.max_steps is not None else math.ceil(
            cfg.epochs * self.batches_per_epoch / cfg.grad_accum_steps)
        self.state.max_steps, self.state.batches_per_epoch = max_steps, self.batches_per_epoch
        self.empty_batches = EmptyBatches(cfg.empty_start_batches, self.batches_per_epoch,
                                          f"the training data ({type(dataset).__name__}, {len(dataset)} examples)")
        self.finite_guard = FiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite_skips)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._torch_optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, max_steps))
        self.schedules = self.objective.schedules(max_steps)
        if eval_data is None and cfg.eval_every:
            logger.warning("eval_every=%d is set but no eval_data was given: periodic evaluation is off",
                           cfg.eval_every)

    def _setup_callbacks(self, callbacks: Iterable[Callback], run_config: Any) -> None:
        # User callbacks run first, so metrics they add to a record (e.g. the teacher-hacking
        # monitor's flags) reach the progress bar and metrics.jsonl written by the built-ins.
        self.callbacks: list[Callback] = list(callbacks)
        self._jsonl: JsonlLogger | None = None
        if tracking.progress_enabled(self.config.progress):
            self.callbacks.append(ProgressBar())
        if self.run_dir is not None:
            self._jsonl = JsonlLogger(self.run_dir / "metrics.jsonl")
            self.callbacks.append(self._jsonl)
        self.context = TrainingContext(self)
        for cb in self.callbacks:
            cb.context = self.context
        if self.run_dir is not None and run_config is not None and self.accelerator.is_main_process:
            data = run_config.model_dump(mode="json") if isinstance(run_config, BaseModel) else dict(run_config)
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))

    # -- small helpers -------------------------------------------------------------------------
    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if skip:
            for model in (self.student, *self.extras.values()):
                stack.enter_context(self.accelerator.no_sync(model))
        return stack

    @property
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # -- the step ------------------------------------------------------------------------------
    def task_output(self, batch: Mapping[str, Any], *, chunked: bool | None = None) -> TaskOutput:
        """The student's outputs on ``batch`` joined with the teacher signal (and feature terms)."""
        source = pick_source(self.teacher_source, self.task, batch)
        if chunked is None:
            chunked = self.objective.use_chunked(self.task, source, self.student)
        self._value_checks = True
        if type(self.task).forward is not Task.forward:
            # a task that extends forward() (its own extra terms) gets the teacher it was given
            out = self.task.forward(self.student, self.teacher if source is self.teacher_source else source, batch,
                                    extras=self.extras, chunked=chunked)
        else:
            layout = _layout_of(batch)
            check = _grew(batch, self._largest) or layout != self._layout
            out = attach_teacher(self.task, self.student, source, batch, extras=self.extras, chunked=chunked,
                                 validate=check, vocab_policy=self.vocab_policy)
            self._layout = layout
            self._value_checks = check  # a validated layout: the losses read no values back
        return out

    def compute_loss(self, batch: Mapping[str, Any], normalizer: float) -> ObjectiveValue:
        """The objective on one micro-batch, normalised by ``normalizer`` real positions (all
        micro-batches of the step, all processes); the scheduled values of this step applied."""
        out = self.task_output(batch)
        if out.teacher is None and self.objective.needs_teacher:
            raise ConfigError(
                f"the objective {self.objective!r} needs a teacher signal, but there is no teacher "
                "module and the batch carries no cached teacher signal",
                "pass teacher=, add the cached teacher keys to the batches, or use only cross_entropy",
            )
        with value_checks(self._value_checks):  # off after the first batch of a layout: no host reads
            return self.objective(out, normalizer, values=self.schedules.current(self.state.step),
                                  check_finite=False)

    def next_micro_batches(self) -> list[Mapping[str, Any]]:
        """The step's ``grad_accum_steps`` micro-batches, each through the transform chain."""
        micro = []
        self._micro_positions: list[str] = []
        student = self.accelerator.unwrap_model(self.student)
        for m in range(self.config.grad_accum_steps):
            self._micro_positions.append(f"epoch {self.state.epoch}, batch {self.state.batch_in_epoch}")
            batch = self.stream.next()
            ctx = StepContext(step=self.state.step, micro=m, student=student, teacher=self.teacher_source)
            for transform in self.transforms:
                batch = transform(batch, ctx)
            micro.append(batch)
        return micro

    def training_step(self) -> dict[str, Any] | None:
        """One optimizer step; returns its raw metrics (``loss``, ``loss/<term>``, ``positions``...),
        with ``nonfinite_skipped: True`` when ``on_nonfinite: skip`` dropped the update, or None when
        every micro-batch was empty (no update; the step does not count). See
        :mod:`kdforge.train.guards`."""
        acc, cfg = self.accelerator, self.config
        micro = self.next_micro_batches()
        where = getattr(self, "_micro_positions", [])
        local = torch.stack([count_positions(self.task, b).to(acc.device).reshape(()).long() for b in micro])
        counts = [int(c) for c in acc.reduce(local, "sum").tolist()]  # the one read before the forward passes
        total = sum(counts)
        keep = self.empty_batches.observe(counts, self.state.positions_seen, where)
        if total == 0:
            return None
        last = max(i for i, k in enumerate(keep) if k)  # gradients are synchronised on the last kept one
        self.student.train()
        for module in self.extras.values():
            module.train()
        loss_sum = torch.zeros((), device=acc.device)
        term_sums: dict[str, torch.Tensor] = {}
        micro_totals: list[torch.Tensor] = []
        for i, batch in enumerate(micro):
            if not keep[i]:
                continue
            with self._no_sync(i < last):
                try:
                    value = self.compute_loss(batch, total)
                except NonFiniteError as exc:  # a loss's own check (NaN logits...): name where, or skip
                    self.finite_guard.raised(exc, step=self.state.step + 1, micro=i,
                                             position=where[i] if i < len(where) else "",
                                             processes=acc.num_processes)
                    self.optimizer.zero_grad(set_to_none=True)
                    self._layout = None  # the next micro-batch runs the losses' own (diagnosing) checks again
                    return {"loss": torch.full((), float("nan"), device=acc.device), "positions": 0,
                            "nonfinite_skipped": True}
                # DDP averages gradients over processes; the loss is already a global mean.
                acc.backward(value.total * acc.num_processes)
            micro_totals.append(value.total.detach())
            loss_sum += value.total.detach()
            for key, v in value.terms.items():
                term_sums[key] = term_sums.get(key, 0.0) + v
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self._trainable(), cfg.max_grad_norm)
        checked_norm = None
        if getattr(acc, "scaler", None) is None:  # under fp16 the grad scaler handles overflowing gradients
            checked_norm = grad_norm if torch.is_tensor(grad_norm) else grad_norm_of(self._trainable())
        scheduled = self.schedules.current(self.state.step)
        weights = {t.key: float(t.current(scheduled)[0]) for t in self.objective.terms}
        kept_where = [w for w, k in zip(where, keep) if k]
        if not self.finite_guard.check(acc, micro_totals=micro_totals, terms=term_sums, weights=weights,
                                       grad_norm=checked_norm, step=self.state.step + 1, positions=kept_where):
            self.optimizer.zero_grad(set_to_none=True)  # weights, moments and LR schedule stay as they were
            self._layout = None  # the next micro-batch runs the losses' own (diagnosing) checks again
            return {"loss": loss_sum, "positions": 0, "nonfinite_skipped": True}
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher_source is not None:
            self.teacher_source.on_step_end(acc.unwrap_model(self.student), self.state.step + 1)
        stats: dict[str, Any] = {"loss": loss_sum, "positions": total}
        stats.update({f"loss/{k}": v for k, v in term_sums.items()})
        stats.update(self.schedules.log_values(self.state.step))
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
        return stats

    # -- training ----------------------------------------------------------------------------
    def train(self, resume: bool | str | Path = False) -> TrainerState:
        """Train to ``max_steps`` (or ``epochs``); return the final :class:`TrainerState`.

        Every kdforge log record of the training is also appended to ``RUN_DIR/train.log``
        (:func:`kdforge.train.tracking.log_to_file`; main process).

        Args:
            resume: False = fresh run; True = continue from the newest checkpoint under
                ``RUN_DIR/checkpoints`` (a fresh start when there is none); a path = that checkpoint.
        """
        log_file = self.run_dir / "train.log" if self.run_dir is not None else None
        with tracking.log_to_file(log_file, enabled=self.accelerator.is_main_process):
            return self._train(resume)

    def _train(self, resume: bool | str | Path) -> TrainerState:
        from accelerate.utils import set_seed

        set_seed(self.config.seed)
        resumed = self._resume(resume) if resume else False
        self._begin(resumed)
        state, acc = self.state, self.accelerator
        start = time.perf_counter()
        window = _Window()
        last_eval_step = last_save_step = -1
        try:
            while state.step < state.max_steps and not state.should_stop:
                step_start = time.perf_counter()
                stats = self.training_step()
                if stats is None:  # every micro-batch was empty: no update, not a step
                    continue
                state.step += 1
                positions = stats.pop("positions")  # global count (all processes)
                skipped = stats.pop("nonfinite_skipped", False)
                state.step_metrics = dict(stats)
                state.positions_seen += positions
                if not skipped:
                    window.add(stats, positions, time.perf_counter() - step_start)
                    if not isinstance(self.schedules, NoSchedules):
                        self.schedules.observe(self._global_losses(state.step_metrics))
                logs = None
                if window.steps and (state.step % self.config.log_every == 0 or state.step == state.max_steps):
                    logs = self._train_logs(window.values, window.steps, window.positions, window.time, start)
                    window = _Window()
                    state.last_logs = logs
                    logger.info("step %d/%d %s", state.step, state.max_steps,
                                " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k.startswith("loss")))
                    if getattr(acc, "trackers", None):
                        acc.log({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=state.step)
                for cb in self.callbacks:
                    cb.on_step_end(state, logs)
                done = state.step >= state.max_steps or state.should_stop
                if self._due(self.config.eval_every, done) and self.eval_data is not None:
                    self._evaluate_and_report(start)
                    last_eval_step = state.step
                if self._due(self.config.save_every, done) and self.run_dir is not None:
                    self.save_checkpoint()
                    last_save_step = state.step
            if self.config.eval_every and self.eval_data is not None and last_eval_step != state.step:
                self._evaluate_and_report(start)
            if self.config.save_every and self.run_dir is not None and last_save_step != state.step \
                    and state.step > 0:
                self.save_checkpoint()
            self.finite_guard.report_zero_terms()  # a run shorter than the guard's window
            for cb in self.callbacks:
                cb.on_train_end(state)
        finally:
            for cb in self.callbacks:
                if isinstance(cb, ProgressBar):
                    cb.on_train_end(state)
            if getattr(acc, "trackers", None):
                acc.end_training()
        return state

    def _global_losses(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """This step's ``loss``/``loss/<term>`` summed over processes (each holds its share)."""
        keys = sorted(k for k in metrics if k == "loss" or k.startswith("loss/"))
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).to(self.accelerator.device)
                              for k in keys])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, "sum")
        return dict(zip(keys, values.tolist()))

    def _due(self, every: int | None, done: bool) -> bool:
        return bool(every) and (self.state.step % every == 0 or done)  # type: ignore[operator]

    def _begin(self, resumed: bool) -> None:
        state, acc = self.state, self.accelerator
        if not resumed and state.step == 0 and self.run_dir is not None:
            if self._jsonl is not None:
                self._jsonl.resume_step = 0  # a fresh run starts a fresh metrics.jsonl
            if latest_checkpoint(self.run_dir / "checkpoints") is not None:
                logger.warning("%s already holds checkpoints of an earlier run; this fresh run will replace "
                               "and prune them (use train(resume=True) to continue that run instead)",
                               self.run_dir / "checkpoints")
        if self.config.log_with and getattr(acc, "log_with", None):
            tracking.start_trackers(acc, project=self.config.project,
                                    run_name=tracking.run_name_of(self.run_dir, self.config.run_name),
                                    hparams=self.config.model_dump(mode="json"))
        for cb in self.callbacks:
            cb.on_train_begin(state)

    def _train_logs(self, window: dict[str, Any], steps: int, positions: int, elapsed: float,
                    start: float) -> dict[str, Any]:
        acc = self.accelerator
        keys = sorted(window)
        values = torch.stack([torch.as_tensor(window[k], dtype=torch.float32).to(acc.device) for k in keys])
        if acc.num_processes > 1:
            values = acc.reduce(values, "sum")
            # grad_norm and scheduled values are identical on all processes: undo the sum
            for i, k in enumerate(keys):
                if k == "grad_norm" or k.startswith("sched/"):
                    values[i] /= acc.num_processes
        logs: dict[str, Any] = {"step": self.state.step, "split": "train", "epoch": round(self.state.epoch_float, 4),
                                "time": round(time.perf_counter() - start, 3)}
        for k, v in zip(keys, values.tolist()):
            logs[k] = v / steps
        logs["lr"] = self.scheduler.get_last_lr()[0]
        logs[f"{self.task.unit}_per_s"] = positions / max(elapsed, 1e-9)
        return logs

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, data: Dataset | DataLoader | None = None) -> dict[str, float]:
        """Objective and fidelity on ``data`` (default: ``eval_data``), no grad (see
        :func:`kdforge.train.evaluation.evaluate`)."""
        return evaluation.evaluate(self, data)

    def _evaluate_and_report(self, start: float) -> dict[str, Any]:
        metrics = self.evaluate()
        record = {"step": self.state.step, "split": "eval", "epoch": round(self.state.epoch_float, 4),
                  "time": round(time.perf_counter() - start, 3), **metrics}
        self.state.last_eval = record
        logger.info("eval step %d %s", self.state.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                                  if isinstance(v, float)))
        if getattr(self.accelerator, "trackers", None):
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=self.state.step)
        for cb in self.callbacks:
            cb.on_evaluate(self.state, record)
        return record

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        if self.run_dir is None:
            raise ConfigError("checkpointing needs an output directory", "set output_dir in the train config")
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write ``RUN_DIR/checkpoints/step-N`` atomically (all processes must call this)."""
        return persistence.save_checkpoint(self)

    def _trainer_state_dict(self) -> dict[str, Any]:
        return persistence.trainer_state_dict(self)

    def _resume(self, resume: bool | str | Path) -> bool:
        """Load a checkpoint; return False when there is none (fresh start)."""
        return persistence.resume(self, resume)

    # -- export ------------------------------------------------------------------------------
    def save_student(self, path: str | Path) -> Path:
        """Save the trained student: ``save_pretrained`` for HF models, else ``model.safetensors``."""
        from kdforge.train.checkpoint import state_dict_to_bytes

        path = Path(path)
        acc = self.accelerator
        model = acc.unwrap_model(self.student)
        state = acc.get_state_dict(self.student)
        if acc.is_main_process:
            if hasattr(model, "save_pretrained"):
                model.save_pretrained(path, state_dict=state)
            else:
                from kdforge.io import write_bytes_atomic

                write_bytes_atomic(path / "model.safetensors", state_dict_to_bytes(state))
        acc.wait_for_everyone()
        return path

    @property
    def unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)


class _Window:
    """Metrics summed over the optimizer steps since the last log."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.steps, self.positions, self.time = 0, 0, 0.0

    def add(self, stats: Mapping[str, Any], positions: int, seconds: float) -> None:
        for key, value in stats.items():
            self.values[key] = self.values.get(key, 0.0) + value
        self.steps += 1
        self.positions += positions
        self.time += seconds


def _layout_of(batch: Mapping[str, Any]) -> tuple[Any, ...]:
    """What must stay equal for a batch to skip re-validation: keys, dtypes and ranks (shapes are
    compared separately: a batch larger than any seen is validated again)."""
    return tuple((k, v.dtype, v.ndim) if torch.is_tensor(v) else (k, type(v).__name__)
                 for k, v in sorted(batch.items(), key=lambda kv: kv[0]))


def _grew(batch: Mapping[str, Any], largest: dict[str, tuple[int, ...]]) -> bool:
    """True (and ``largest`` updated) when a tensor of ``batch`` is larger than seen before in a dim."""
    grew = False
    for k, v in batch.items():
        if torch.is_tensor(v):
            seen = largest.get(k)
            shape = tuple(v.shape)
            if seen is None or len(seen) != len(shape) or any(a > b for a, b in zip(shape, seen)):
                largest[k] = shape if seen is None or len(seen) != len(shape) else tuple(map(max, shape, seen))
                grew = True
    return grew
