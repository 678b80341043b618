"""The :class:`Distiller` training loop (on Hugging Face ``accelerate``).

The loop is short because the work lives in small pieces: :class:`~kdforge.train.TrainConfig`
(hyper-parameters), :class:`~kdforge.train.Objective` (weighted registered losses),
a :class:`~kdforge.train.tasks.Task` (batch -> logits, labels, mask, teacher signal),
:mod:`~kdforge.train.checkpoint` (atomic, verified checkpoints), callbacks (logging, progress,
early stopping) and, optionally, :class:`~kdforge.train.onpolicy.OnPolicyBatcher` (GKD).

One optimizer step = ``grad_accum_steps`` micro-batches. Their real positions are counted first
and summed over processes (``N``); every loss term is a ``reduction="sum"`` value divided by
``N``, so the update equals one big batch exactly (see :mod:`kdforge.train.objective`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdforge.config import validate
from kdforge.distributed import check_process_group, needs_cpu_process_group, wrapper_of
from kdforge.errors import CheckpointError, ConfigError, DataError, DeviceError
from kdforge.io import write_text_atomic
from kdforge.train.callbacks import Callback, JsonlLogger, ProgressBar, TrainerState
from kdforge.train.checkpoint import (
    CheckpointWriter,
    LoadedCheckpoint,
    gather_optimizer_state,
    is_fully_sharded,
    latest_checkpoint,
    prune_checkpoints,
    restore_model_state,
    restore_optimizer_state,
)
from kdforge.train.config import TrainConfig
from kdforge.train.metrics import FIDELITY_SUM_KEYS, fidelity_sums
from kdforge.train.objective import LossTerm, Objective
from kdforge.train.onpolicy import GenerateFn, OnPolicyBatcher, OnPolicyConfig
from kdforge.train.sampler import EpochSampler
from kdforge.train.tasks import CausalLMTask, Task, module_device, teacher_module

logger = logging.getLogger(__name__)


def resolve_mixed_precision(requested: str) -> str:
    """``requested`` if this machine supports it, else ``"no"`` with a logged notice."""
    if requested == "fp16" and not torch.cuda.is_available():
        logger.warning("mixed_precision='fp16' needs a CUDA device; training in full precision instead")
        return "no"
    if requested == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU does not support bf16; training in full precision instead")
        return "no"
    return requested


def lr_lambda(scheduler: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s``: linear warm-up, then constant/linear/cosine."""

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant":
            return 1.0
        span = max(max_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        if scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def _new_accelerator(cls: Any, kwargs: dict[str, Any]) -> Any:
    """An ``Accelerator``; in a single process, a second one with another precision is allowed.

    accelerate keeps one process-wide state and refuses to change its mixed precision; a script or
    recipe that trains several models (teacher fp32, then students in bf16) hits that. Outside a
    distributed launch the state is only a cache, so it is reset and rebuilt.
    """
    try:
        return cls(**kwargs)
    except ValueError as exc:
        from accelerate.state import AcceleratorState, PartialState

        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise
        logger.info("re-initialising accelerate's process state for mixed_precision=%s", kwargs.get("mixed_precision"))
        AcceleratorState._reset_state()
        return cls(**kwargs)


def _refuse_meta(module: nn.Module, who: str) -> None:
    """A model on the ``meta`` device has shapes but no weights: nothing can train or run it."""
    meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise DeviceError(
            f"the {who} has {len(meta)} tensors on the 'meta' device (e.g. {meta[0]!r}): its weights were "
            "never loaded",
            f"load the {who} with real weights (from_pretrained without device_map='meta' / init_empty_weights, "
            "or to_empty() followed by load_state_dict) before passing it to Distiller",
        )


class Distiller:
    """Train a student to match a teacher (online module or cached signal) on a dataset.

    Args:
        student: the trainable model.
        teacher: a frozen teacher module (made ``eval()`` and ``requires_grad_(False)``; never
            prepared/wrapped by accelerate) or a wrapper holding one in ``.model`` (e.g.
            :class:`kdforge.teachers.OnlineTeacher`, called as is), or None when batches carry a cached teacher signal or
            the objective is labels-only.
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
        on_policy: :class:`OnPolicyConfig` (or dict) enabling GKD; needs a causal-LM task and an
            online teacher.
        generate_fn: generation backend for GKD (default :class:`~kdforge.train.onpolicy.HFGenerator`).
        run_config: the full job config; written to ``RUN_DIR/config.yaml``.
        accelerator: an existing ``accelerate.Accelerator`` (default: one built from ``config``).
        teacher_device: ``"auto"`` moves the teacher to the accelerator's device, None leaves it
            where it is, anything else is passed to ``teacher.to``.
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
        run_config: BaseModel | Mapping[str, Any] | None = None,
        accelerator: Any = None,
        teacher_device: str | torch.device | None = "auto",
        num_workers: int = 0,
        optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
    ) -> None:
        self.config = config if isinstance(config, TrainConfig) else validate(TrainConfig, dict(config), source="train config")
        self.objective = objective if isinstance(objective, Objective) else Objective(objective)
        if not isinstance(task, Task):
            raise ConfigError(f"task must be a kdforge Task, got {type(task).__name__}",
                              "pass ClassificationTask() or CausalLMTask()")
        self.task = task
        missing = [n for n in self.objective.task_terms if n not in task.term_names]
        if missing:
            raise ConfigError(
                f"objective terms {missing} have source 'task', but {type(task).__name__} computes "
                f"{list(task.term_names) or 'no extra terms'}",
                "use a task that provides them, or make them registered losses (source: loss)",
            )
        self.eval_fn = eval_fn
        self.run_dir = Path(self.config.output_dir) if self.config.output_dir else None
        self.num_workers = num_workers
        self.on_policy: OnPolicyBatcher | None = None
        if on_policy is not None:
            op = on_policy if isinstance(on_policy, OnPolicyConfig) else validate(OnPolicyConfig, dict(on_policy), source="on_policy")
            if not isinstance(task, CausalLMTask):
                raise ConfigError("on-policy distillation works with CausalLMTask only", "use CausalLMTask()")
            if teacher is None:
                raise ConfigError("on-policy distillation needs an online teacher module to score student samples",
                                  "pass teacher= (a cached top-k signal cannot score new samples)")
            self.on_policy = OnPolicyBatcher(op, generate_fn, seed=self.config.seed)

        self.accelerator = accelerator or self._make_accelerator()
        acc = self.accelerator
        # several launched processes that did not form one group would each train alone and
        # write to the same run folder: refuse (also for an accelerator built by the caller)
        check_process_group(acc)

        # Teacher: frozen, eval mode, never prepared.
        self.teacher = teacher
        _refuse_meta(student, "student")
        if teacher is not None:
            t_module = teacher_module(teacher)
            _refuse_meta(t_module, "teacher")
            t_module.requires_grad_(False)
            t_module.eval()
            if teacher_device == "auto":
                if module_device(t_module) != acc.device:
                    t_module.to(acc.device)
            elif teacher_device is not None:
                t_module.to(teacher_device)
            shared = {id(p) for p in t_module.parameters()} & {id(p) for p in student.parameters()}
            if shared:
                logger.warning("%d parameter tensors are shared by teacher and student; they are frozen "
                               "(the teacher is frozen) and not trained", len(shared))

        # Feature terms (hidden_mse, attention_kl, ...) own learnable projectors: bind them to this
        # student/teacher pair so they are optimised and checkpointed with the student. bind()
        # returns the same modules on a repeat call, so a caller that bound them already is fine.
        if self.objective.feature_terms:
            extra_modules = {**self.objective.bind(student, teacher), **dict(extra_modules or {})}

        # Optimizer over the student's and the method's trainable parameters only.
        self._extra_names = list(extra_modules or {})
        extras = list((extra_modules or {}).values())
        params = [p for m in (student, *extras) for p in m.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the student has no trainable parameters", "unfreeze some student parameters")
        seen: set[int] = set()
        decay, no_decay = [], []
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if optimizer_factory is not None:
            optimizer = optimizer_factory(groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)
        prepared = acc.prepare(student, *extras, optimizer)
        self.student, *prep_extras, self.optimizer = prepared
        self.extras: dict[str, nn.Module] = dict(zip(self._extra_names, prep_extras))
        if self.config.save_every and wrapper_of(self.student) == "DeepSpeedEngine":
            # ZeRO partitions the optimizer state inside the engine: a checkpoint of rank 0's view
            # would resume with the wrong moments. Refuse before training, not at the first save.
            raise CheckpointError(
                "save_every is set, but kdforge checkpoints cannot save DeepSpeed ZeRO's partitioned "
                "optimizer state (a resume would be silently wrong)",
                "use FSDP for a sharded, resumable run (configs/accelerate/fsdp_8gpu.yaml), or set "
                "save_every: null under DeepSpeed",
            )

        # Data (kdforge owns the sampler: order = f(seed, epoch), resumable mid-epoch).
        self.train_dataset, self.collate_fn = self._dataset_of(train_data, collate_fn, "train_data")
        self.eval_data = eval_data
        self.sampler = EpochSampler(len(self.train_dataset), seed=self.config.seed, shuffle=True,
                                    num_replicas=acc.num_processes, rank=acc.process_index)
        self.batches_per_epoch = math.ceil(self.sampler.per_rank / self.config.batch_size)
        if self.batches_per_epoch == 0:
            raise DataError("the training dataset is empty", "pass a dataset with at least one example")
        if self.config.max_steps is not None:
            max_steps = self.config.max_steps
        else:
            max_steps = math.ceil(self.config.epochs * self.batches_per_epoch / self.config.grad_accum_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            lr_lambda(self.config.scheduler, self.config.warmup_steps, max_steps),
        )
        if eval_data is None and self.config.eval_every:
            logger.warning("eval_every=%d is set but no eval_data was given: periodic evaluation is off",
                           self.config.eval_every)
        self.state = TrainerState(max_steps=max_steps, batches_per_epoch=self.batches_per_epoch,
                                  run_dir=self.run_dir, is_main_process=acc.is_main_process)
        self._iter: Iterator[Any] | None = None

        # User callbacks run first, so metrics they add to a record (e.g. the teacher-hacking
        # monitor's flags) reach the progress bar and metrics.jsonl written by the built-ins.
        self.callbacks: list[Callback] = list(callbacks)
        self._jsonl: JsonlLogger | None = None
        if self.config.progress:
            self.callbacks.append(ProgressBar())
        if self.run_dir is not None:
            self._jsonl = JsonlLogger(self.run_dir / "metrics.jsonl")
            self.callbacks.append(self._jsonl)
        if self.run_dir is not None and run_config is not None and acc.is_main_process:
            data = run_config.model_dump(mode="json") if isinstance(run_config, BaseModel) else dict(run_config)
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))

    # -- setup helpers -----------------------------------------------------------------------
    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator

        kwargs: dict[str, Any] = {"mixed_precision": resolve_mixed_precision(self.config.mixed_precision)}
        if needs_cpu_process_group():  # torchrun-style launch on a CPU-only machine: join a gloo group
            kwargs["cpu"] = True
        if self.config.log_with and self.run_dir is not None:
            kwargs.update(log_with=list(self.config.log_with), project_dir=str(self.run_dir))
        try:
            return _new_accelerator(Accelerator, kwargs)
        except (ImportError, ValueError) as exc:
            if "log_with" not in kwargs:
                raise
            logger.warning("trackers %s unavailable (%s); logging to metrics.jsonl only", self.config.log_with, exc)
            kwargs.pop("log_with")
            kwargs.pop("project_dir")
            return _new_accelerator(Accelerator, kwargs)

    @staticmethod
    def _dataset_of(data: Any, collate_fn: Any, what: str) -> tuple[Any, Any]:
        if isinstance(data, DataLoader):
            return data.dataset, collate_fn or data.collate_fn
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise DataError(f"{what} must be a map-style dataset (with __len__ and __getitem__) or a DataLoader, "
                            f"got {type(data).__name__}", "wrap an iterable in a list or a datasets.Dataset")
        return data, collate_fn

    def _loader(self, dataset: Any, sampler: EpochSampler, collate_fn: Any) -> DataLoader:
        # A private generator keeps the loader from drawing from the global torch RNG (exact resume).
        gen = torch.Generator()
        gen.manual_seed(self.config.seed)
        return DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler, collate_fn=collate_fn,
                          num_workers=self.num_workers, generator=gen)

    def _next_batch(self) -> Any:
        from accelerate.utils import send_to_device

        while True:
            if self._iter is None:
                self.sampler.set_epoch(self.state.epoch)
                self.sampler.set_start(self.state.batch_in_epoch * self.config.batch_size)
                self._iter = iter(self._loader(self.train_dataset, self.sampler, self.collate_fn))
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                continue
            self.state.batch_in_epoch += 1
            if self.state.batch_in_epoch >= self.batches_per_epoch:  # epoch done: position = next epoch
                self._iter = None
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
            return send_to_device(batch, self.accelerator.device)

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

    # -- training ----------------------------------------------------------------------------
    def train(self, resume: bool | str | Path = False) -> TrainerState:
        """Train to ``max_steps`` (or ``epochs``); return the final :class:`TrainerState`.

        Args:
            resume: False = fresh run; True = continue from the newest checkpoint under
                ``RUN_DIR/checkpoints`` (a fresh start when there is none); a path = that checkpoint.
        """
        from accelerate.utils import set_seed

        set_seed(self.config.seed)
        resumed = self._resume(resume) if resume else False
        state, acc = self.state, self.accelerator
        if not resumed and state.step == 0 and self.run_dir is not None:
            if self._jsonl is not None:
                self._jsonl.resume_step = 0  # a fresh run starts a fresh metrics.jsonl
            if latest_checkpoint(self.run_dir / "checkpoints") is not None:
                logger.warning("%s already holds checkpoints of an earlier run; this fresh run will replace "
                               "and prune them (use train(resume=True) to continue that run instead)",
                               self.run_dir / "checkpoints")
        if self.config.log_with and self.run_dir is not None and getattr(acc, "log_with", None):
            hparams = {k: v if isinstance(v, int | float | str | bool) else str(v)
                       for k, v in self.config.model_dump(mode="json").items()}
            acc.init_trackers("tensorboard", config=hparams)
        for cb in self.callbacks:
            cb.on_train_begin(state)
        start = time.perf_counter()
        window: dict[str, torch.Tensor] = {}
        window_steps, window_positions, window_time = 0, 0, 0.0  # throughput counts training steps only
        last_eval_step = last_save_step = -1
        try:
            while state.step < state.max_steps and not state.should_stop:
                step_start = time.perf_counter()
                stats = self._train_step()
                window_time += time.perf_counter() - step_start
                state.step += 1
                positions = stats.pop("positions")  # global count (all processes)
                state.step_metrics = dict(stats)
                state.positions_seen += positions
                window_positions += positions
                for key, value in stats.items():
                    window[key] = window.get(key, 0.0) + value
                window_steps += 1
                logs = None
                if state.step % self.config.log_every == 0 or state.step == state.max_steps:
                    logs = self._train_logs(window, window_steps, window_positions, window_time, start)
                    window, window_steps, window_positions, window_time = {}, 0, 0, 0.0
                    state.last_logs = logs
                    logger.info("step %d/%d %s", state.step, state.max_steps,
                                " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k.startswith("loss")))
                    if getattr(acc, "trackers", None):
                        acc.log({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=state.step)
                for cb in self.callbacks:
                    cb.on_step_end(state, logs)
                done = state.step >= state.max_steps or state.should_stop
                if self.config.eval_every and self.eval_data is not None and (
                        state.step % self.config.eval_every == 0 or done):
                    self._evaluate_and_report(start)
                    last_eval_step = state.step
                if self.config.save_every and self.run_dir is not None and (
                        state.step % self.config.save_every == 0 or done):
                    self.save_checkpoint()
                    last_save_step = state.step
            if self.config.eval_every and self.eval_data is not None and last_eval_step != state.step:
                self._evaluate_and_report(start)
            if self.config.save_every and self.run_dir is not None and last_save_step != state.step \
                    and state.step > 0:
                self.save_checkpoint()
            for cb in self.callbacks:
                cb.on_train_end(state)
        finally:
            for cb in self.callbacks:
                if isinstance(cb, ProgressBar):
                    cb.on_train_end(state)
            if getattr(acc, "trackers", None):
                acc.end_training()
        return state

    def _train_step(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.config
        micro = []
        for m in range(cfg.grad_accum_steps):
            batch = self._next_batch()
            if self.on_policy is not None:
                batch, _ = self.on_policy(batch, student=acc.unwrap_model(self.student), teacher=self.teacher,
                                          step=self.state.step, micro=m)
            micro.append(batch)
        local = sum(self.task.count(b) for b in micro)
        total = int(acc.reduce(torch.tensor(local, device=acc.device, dtype=torch.long), "sum").item())
        self.student.train()
        for module in self.extras.values():
            module.train()
        loss_sum = torch.zeros((), device=acc.device)
        term_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            with self._no_sync(i < len(micro) - 1):
                out = self.task.forward(self.student, self.teacher, batch, extras=self.extras,
                                        chunked=self.objective.chunked)
                if out.teacher is None and self.objective.needs_teacher:
                    raise ConfigError(
                        f"the objective {self.objective!r} needs a teacher signal, but there is no teacher "
                        "module and the batch carries no cached teacher signal",
                        "pass teacher=, add the cached teacher keys to the batches, or use only cross_entropy",
                    )
                value = self.objective(out, total)
                # DDP averages gradients over processes; the loss is already a global mean.
                acc.backward(value.total * acc.num_processes)
            loss_sum += value.total.detach()
            for key, v in value.terms.items():
                term_sums[key] = term_sums.get(key, 0.0) + v
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self._trainable(), cfg.max_grad_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, Any] = {"loss": loss_sum, "positions": total}
        stats.update({f"loss/{k}": v for k, v in term_sums.items()})
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
        return stats

    def _train_logs(self, window: dict[str, Any], steps: int, positions: int, elapsed: float,
                    start: float) -> dict[str, Any]:
        acc = self.accelerator
        keys = sorted(window)
        values = torch.stack([torch.as_tensor(window[k], dtype=torch.float32).to(acc.device) for k in keys])
        if acc.num_processes > 1:
            values = acc.reduce(values, "sum")
            # grad_norm is identical on all processes: undo the sum
            if "grad_norm" in keys:
                values[keys.index("grad_norm")] /= acc.num_processes
        logs: dict[str, Any] = {"step": self.state.step, "split": "train", "epoch": round(self.state.epoch_float, 4),
                                "time": round(time.perf_counter() - start, 3)}
        for k, v in zip(keys, values.tolist()):
            logs[k] = v / steps
        logs["lr"] = self.scheduler.get_last_lr()[0]
        logs[f"{self.task.unit}_per_s"] = positions / max(elapsed, 1e-9)
        return logs

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, data: Dataset | DataLoader | None = None) -> dict[str, float]:
        """Objective and fidelity on ``data`` (default: ``eval_data``), no grad.

        Returns ``eval/loss``, ``eval/loss/<term>``, ``eval/agreement`` (top-1 agreement with the
        teacher), ``eval/kl_to_teacher`` (``KL(p_teacher || q_student)`` at T=1),
        ``eval/kl_from_teacher`` (``KL(q || p)``), ``eval/js_to_teacher``, ``eval/nll`` and
        ``eval/perplexity`` (causal LMs) or ``eval/accuracy`` (classification), each averaged over
        real positions of all processes, plus ``eval_fn``'s metrics.
        """
        data = self.eval_data if data is None else data
        if data is None:
            raise ConfigError("evaluate() needs eval data", "pass eval_data= to Distiller or data= to evaluate()")
        acc = self.accelerator
        dataset, collate = self._dataset_of(data, self.collate_fn, "eval_data")
        sampler = EpochSampler(len(dataset), shuffle=False, num_replicas=acc.num_processes, rank=acc.process_index)
        loader = self._loader(dataset, sampler, collate)
        keys = ["count", *[f"term:{k}" for k in self.objective.keys], *FIDELITY_SUM_KEYS, "nll", "nll_count",
                "correct"]
        sums = torch.zeros(len(keys), dtype=torch.float64, device=acc.device)
        present: set[str] = set()
        training = self.student.training
        self.student.eval()
        from accelerate.utils import send_to_device

        with torch.no_grad():
            for batch in loader:
                batch = send_to_device(batch, acc.device)
                out = self.task.forward(self.student, self.teacher, batch, extras=self.extras)
                stats: dict[str, torch.Tensor] = {}
                if out.teacher is not None or not self.objective.needs_teacher:
                    value = self.objective(out, 1.0)  # sums, divided once below
                    stats.update({f"term:{k}": v for k, v in value.terms.items()})
                stats.update(fidelity_sums(out.student_logits, out.teacher, out.mask, out.labels))
                for k, v in stats.items():
                    sums[keys.index(k)] += v.double().to(acc.device)
                    present.add(k)
        self.student.train(training)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, "sum")
        s = dict(zip(keys, sums.tolist()))
        count = max(s["count"], 1.0)
        metrics: dict[str, float] = {}
        term_keys = [k for k in self.objective.keys if f"term:{k}" in present]
        if term_keys:
            metrics["eval/loss"] = sum(t.weight * s[f"term:{t.key}"] for t in self.objective.terms) / count
            for k in term_keys:
                metrics[f"eval/loss/{k}"] = s[f"term:{k}"] / count
        for key in FIDELITY_SUM_KEYS:
            if key in present:
                metrics[f"eval/{key}"] = s[key] / count
        if "nll" in present and s["nll_count"] > 0:
            nll = s["nll"] / s["nll_count"]
            metrics["eval/nll"] = nll
            if self.task.unit == "tokens":
                metrics["eval/perplexity"] = math.exp(min(nll, 700.0))
            else:
                metrics["eval/accuracy"] = s["correct"] / s["nll_count"]
        if self.eval_fn is not None:
            for k, v in dict(self.eval_fn(acc.unwrap_model(self.student))).items():
                metrics[k if k.startswith("eval/") else f"eval/{k}"] = v
        return metrics

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
        acc, state = self.accelerator, self.state
        writer = CheckpointWriter(self.checkpoint_root, state.step)
        if acc.is_main_process:
            writer.begin()
        acc.wait_for_everyone()
        writer.write_rng(acc.process_index)
        student_state = acc.get_state_dict(self.student)
        extras_state = {f"{name}.{k}": v for name, m in self.extras.items()
                        for k, v in acc.get_state_dict(m).items()}
        # Under FSDP the optimizer state is sharded: gather the full state (all ranks take part);
        # otherwise the main process's optimizer.state_dict() is the whole state.
        sharded = is_fully_sharded(self.student)
        if sharded and self.extras:
            raise CheckpointError(
                "checkpointing an FSDP-sharded student together with extra learnable modules (projectors) "
                "is not supported: their optimizer state cannot be gathered by the student's parameter names",
                "train methods with extra modules under DDP (configs/accelerate/ddp_8gpu.yaml), or set "
                "save_every: null",
            )
        optim_format, optim_state = "torch", None
        if sharded or acc.is_main_process:
            optim_format, optim_state = gather_optimizer_state(self.student, self._torch_optimizer)
        acc.wait_for_everyone()
        if acc.is_main_process:
            trainer_state = self._trainer_state_dict()
            trainer_state["optimizer_format"] = optim_format
            writer.write_main(student_state=student_state, extras_state=extras_state, optimizer=self.optimizer,
                              scheduler=self.scheduler, scaler=getattr(acc, "scaler", None),
                              trainer_state=trainer_state, optimizer_state=optim_state)
            writer.publish()
            prune_checkpoints(self.checkpoint_root, self.config.keep_last)
        acc.wait_for_everyone()
        for cb in self.callbacks:
            cb.on_save(state, writer.final)
        return writer.final

    def _trainer_state_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step, "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "max_steps": s.max_steps,
            "positions_seen": s.positions_seen, "seed": self.config.seed, "batch_size": self.config.batch_size,
            "grad_accum_steps": self.config.grad_accum_steps, "num_processes": self.accelerator.num_processes,
            "objective": self.objective.keys, "extras": self._extra_names,
            "callbacks": {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(self.callbacks)},
            "last_eval": s.last_eval,
            "last_logs": {k: v for k, v in (s.last_logs or {}).items() if isinstance(v, int | float | str)},
        }

    def _resume(self, resume: bool | str | Path) -> bool:
        """Load a checkpoint; return False when there is none (fresh start)."""
        path = Path(resume) if isinstance(resume, str | Path) else latest_checkpoint(self.checkpoint_root)
        if path is None:
            logger.info("no checkpoint under %s: starting a fresh run", self.checkpoint_root)
            return False
        ckpt = LoadedCheckpoint(path)
        ts = ckpt.trainer_state
        for key, mine in (("batch_size", self.config.batch_size), ("num_processes", self.accelerator.num_processes),
                          ("seed", self.config.seed)):
            if ts.get(key) != mine:
                raise CheckpointError(
                    f"checkpoint {path} was written with {key}={ts.get(key)}, this run has {key}={mine}; "
                    "the data position cannot be restored exactly",
                    f"resume with {key}={ts.get(key)}, or start a fresh run in a new output_dir",
                )
        acc = self.accelerator
        try:
            if is_fully_sharded(self.student):  # every rank keeps its shard of the full state
                restore_model_state(self.student, ckpt.student_state())
            else:
                acc.unwrap_model(self.student).load_state_dict(ckpt.student_state())
            extras_state = ckpt.extras_state() or {}
            for name, module in self.extras.items():
                prefix = f"{name}."
                acc.unwrap_model(module).load_state_dict(
                    {k[len(prefix):]: v for k, v in extras_state.items() if k.startswith(prefix)})
            restore_optimizer_state(self.student, self._torch_optimizer, ckpt.optimizer_state(),
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
            self.scheduler.load_state_dict(sched)
        scaler_state = ckpt.scaler_state()
        if scaler_state is not None and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(scaler_state)
        rng = ckpt.rng_state(acc.process_index)
        if rng is not None:
            from kdforge.train.checkpoint import set_rng_state

            set_rng_state(rng)
        s = self.state
        s.step, s.epoch, s.batch_in_epoch = int(ts["step"]), int(ts["epoch"]), int(ts["batch_in_epoch"])
        s.positions_seen = int(ts.get("positions_seen", 0))
        s.last_eval = ts.get("last_eval") or {}
        if ts.get("last_logs"):
            s.last_logs = ts["last_logs"]
        s.should_stop = False
        self._iter = None
        saved_cbs = ts.get("callbacks", {})
        for i, cb in enumerate(self.callbacks):
            key = f"{i}:{type(cb).__name__}"
            if key in saved_cbs:
                cb.load_state_dict(saved_cbs[key])
        if self._jsonl is not None:
            self._jsonl.resume_step = s.step
        logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, s.step, s.epoch, s.batch_in_epoch)
        return True

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
