"""Callbacks: small hooks around the training loop, and the state they see.

A callback overrides any of ``on_train_begin``, ``on_step_end``, ``on_evaluate``, ``on_save``,
``on_train_end``. It may stop training by setting ``state.should_stop = True``. Callbacks with
state that must survive a resume implement ``state_dict``/``load_state_dict`` (saved inside each
checkpoint's ``trainer_state.json``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdforge.errors import ConfigError
from kdforge.io import os_errors, write_text_atomic

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """What callbacks see: progress counters and the latest metrics.

    Attributes:
        step: optimizer steps done.
        max_steps: planned optimizer steps.
        epoch: current epoch (integer part) and ``batch_in_epoch`` the next micro-batch index.
        positions_seen: real positions (tokens/samples) trained on, all processes.
        run_dir: the run folder, or None.
        is_main_process: True on the process that writes files.
        step_metrics: this optimizer step's raw metrics (local share of each ``loss/<term>``),
            set before ``on_step_end`` on every step, not only on logging steps.
        last_logs / last_eval: latest train log and eval metrics.
        should_stop: set to True (e.g. by early stopping) to end training after this step.
    """

    step: int = 0
    max_steps: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    batches_per_epoch: int = 0
    positions_seen: int = 0
    run_dir: Path | None = None
    is_main_process: bool = True
    step_metrics: dict[str, Any] = field(default_factory=dict)
    last_logs: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)
    should_stop: bool = False

    @property
    def epoch_float(self) -> float:
        if not self.batches_per_epoch:
            return float(self.epoch)
        return self.epoch + self.batch_in_epoch / self.batches_per_epoch

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir) if self.run_dir else None
        return data


class TrainingContext:
    """What a callback may read and change besides the state: the trainer and its parts.

    Attributes (live views of the trainer): ``trainer``, ``objective``, ``state``,
    ``teacher_source``, ``schedules`` (the objective's scheduled values), ``optimizer``.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    @property
    def objective(self) -> Any:
        return self.trainer.objective

    @property
    def state(self) -> TrainerState:
        return self.trainer.state

    @property
    def teacher_source(self) -> Any:
        return self.trainer.teacher_source

    @property
    def schedules(self) -> Any:
        return self.trainer.schedules

    @property
    def optimizer(self) -> Any:
        return self.trainer.optimizer


class Callback:
    """Base class: every hook is a no-op. The trainer sets :attr:`context` before training."""

    #: the :class:`TrainingContext` of the trainer this callback is attached to
    context: TrainingContext | None = None

    def on_train_begin(self, state: TrainerState) -> None: ...

    def on_step_end(self, state: TrainerState, logs: dict[str, Any] | None) -> None:
        """After each optimizer step; ``logs`` is the train log dict on logging steps, else None."""

    def on_evaluate(self, state: TrainerState, metrics: dict[str, Any]) -> None: ...

    def on_save(self, state: TrainerState, path: Path) -> None: ...

    def on_train_end(self, state: TrainerState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class JsonlLogger(Callback):
    """Append train logs and eval metrics to ``metrics.jsonl`` (format: ``docs/run-format.md``).

    On resume, lines logged after the resumed checkpoint's step are dropped first, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.resume_step: int | None = None

    def on_train_begin(self, state: TrainerState) -> None:
        if not state.is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= self.resume_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue  # a torn last line from a crash
            write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def _write(self, state: TrainerState, record: dict[str, Any]) -> None:
        if not state.is_main_process:
            return
        with os_errors("appending to", self.path), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")
            fh.flush()

    def on_step_end(self, state: TrainerState, logs: dict[str, Any] | None) -> None:
        if logs is not None:
            self._write(state, logs)

    def on_evaluate(self, state: TrainerState, metrics: dict[str, Any]) -> None:
        self._write(state, metrics)


class EarlyStopping(Callback):
    """Stop when an eval metric has not improved for ``patience`` evaluations.

    Args:
        metric: key in the eval metrics, e.g. ``"eval/loss"`` or ``"eval/kl_to_teacher"``.
        mode: ``"min"`` or ``"max"``.
        patience: evaluations without improvement before stopping.
        min_delta: smallest change counted as an improvement.
    """

    def __init__(self, metric: str = "eval/loss", mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}", "pick one")
        if patience < 1:
            raise ConfigError(f"EarlyStopping patience must be >= 1, got {patience}", "use 1 or more")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def on_evaluate(self, state: TrainerState, metrics: dict[str, Any]) -> None:
        if self.metric not in metrics:
            raise ConfigError(
                f"early stopping watches {self.metric!r}, which evaluation does not report",
                f"choose one of: {', '.join(sorted(k for k in metrics if k.startswith('eval/')))}",
            )
        value = float(metrics[self.metric])
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.best_step, self.bad_evals = value, state.step, 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                logger.info("early stopping at step %d: %s has not improved on %.6g (step %s) for %d evals",
                            state.step, self.metric, self.best, self.best_step, self.bad_evals)
                state.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))


class ProgressBar(Callback):
    """A tqdm progress bar over optimizer steps showing the latest loss (main process only)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def on_train_begin(self, state: TrainerState) -> None:
        if state.is_main_process:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.step, desc="distill", unit="step",
                             dynamic_ncols=True)

    def on_step_end(self, state: TrainerState, logs: dict[str, Any] | None) -> None:
        if self._bar is None:
            return
        self._bar.update(state.step - self._bar.n)
        if logs and "loss" in logs:
            self._bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

    def on_evaluate(self, state: TrainerState, metrics: dict[str, Any]) -> None:
        if self._bar is not None and "eval/loss" in metrics:
            self._bar.write(f"step {state.step}: eval/loss {metrics['eval/loss']:.4g}")

    def on_train_end(self, state: TrainerState) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out
