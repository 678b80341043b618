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
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdforge.config import validate
from kdforge.distributed import check_process_group
from kdforge.errors import ConfigError, NonFiniteError
from kdforge.losses import value_checks
from kdforge.teachers.sources import TeacherSource, as_source
from kdforge.train import distiller_setup as setup
from kdforge.train import evaluation, persistence, reporting, tracking
from kdforge.train.callbacks import (
    Callback,
    ProgressBar,
    TrainerState,
)
from kdforge.train.checkpoint import (
    latest_checkpoint,
)
from kdforge.train.config import TrainConfig
from kdforge.train.guards import grad_norm_of
from kdforge.train.objective import LossTerm, NoSchedules, Objective, ObjectiveValue
from kdforge.train.onpolicy import GenerateFn, OnPolicyConfig
from kdforge.train.optim import (
    lr_lambda,
    refuse_meta,
    resolve_mixed_precision,
)
from kdforge.train.tasks import (
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

    # set in __init__ by kdforge.train.distiller_setup (with optimizer, scheduler, stream, sampler...)
    student: nn.Module
    extras: dict[str, nn.Module]
    state: TrainerState
    callbacks: list[Callback]

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
        self.task = setup.check_task(self.objective, task)
        self.eval_fn, self.num_workers, self.vocab_policy = eval_fn, num_workers, vocab_policy
        self.run_dir = Path(self.config.output_dir) if self.config.output_dir else None
        self.teacher = teacher
        self.teacher_source: TeacherSource | None = as_source(teacher)
        self.transforms: list[BatchTransform] = setup.transform_chain(self, on_policy, generate_fn, transforms)
        self.accelerator = accelerator or self._make_accelerator()
        check_process_group(self.accelerator)  # launched processes that formed no group would each train alone
        refuse_meta(student, "student")
        setup.setup_teacher(self, student, teacher_device)
        if self.objective.feature_terms:  # bind() returns the same modules on a repeat call
            extra_modules = {**self.objective.bind(student, self.teacher_source), **dict(extra_modules or {})}
        setup.setup_optimization(self, student, dict(extra_modules or {}), optimizer_factory)
        setup.setup_data(self, train_data, eval_data, collate_fn, sampler)
        setup.setup_callbacks(self, callbacks, run_config)
        self._layout: Any = None  # the batch layout last validated (keys, dtypes, ranks)
        self._largest: dict[str, tuple[int, ...]] = {}  # the largest shape seen per batch key
        self._value_checks = True  # the losses check values (host reads) on this micro-batch

    @property
    def on_policy(self) -> Any:
        """The GKD batcher when on-policy distillation is on (the first transform), else None."""
        first = self.transforms[0] if self.transforms else None
        return first.batcher if isinstance(first, OnPolicyTransform) else None

    def _make_accelerator(self) -> Any:
        return setup.make_accelerator(self)

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
        window = reporting.Window()
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
                        self.schedules.observe(reporting.global_losses(self, state.step_metrics))
                logs = None
                if window.steps and (state.step % self.config.log_every == 0 or state.step == state.max_steps):
                    logs = reporting.train_logs(self, window, start)
                    window = reporting.Window()
                    state.last_logs = logs
                    logger.info("step %d/%d %s", state.step, state.max_steps,
                                " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k.startswith("loss")))
                    if getattr(acc, "trackers", None):
                        acc.log({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=state.step)
                for cb in self.callbacks:
                    cb.on_step_end(state, logs)
                done = state.step >= state.max_steps or state.should_stop
                if self._due(self.config.eval_every, done) and self.eval_data is not None:
                    reporting.evaluate_and_report(self, start)
                    last_eval_step = state.step
                if self._due(self.config.save_every, done) and self.run_dir is not None:
                    self.save_checkpoint()
                    last_save_step = state.step
            if self.config.eval_every and self.eval_data is not None and last_eval_step != state.step:
                reporting.evaluate_and_report(self, start)
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

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, data: Dataset | DataLoader | None = None) -> dict[str, float]:
        """Objective and fidelity on ``data`` (default: ``eval_data``), no grad (see
        :func:`kdforge.train.evaluation.evaluate`)."""
        return evaluation.evaluate(self, data)

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
        return persistence.save_student(self, path)

    @property
    def unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)


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
