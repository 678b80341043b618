"""Teacher-hacking monitor.

Tiapkin et al., "On Teacher Hacking in Language Model Distillation" (2025) show that a student
distilled on a fixed offline dataset can keep getting closer to the *teacher* while getting
further from the *ground truth* (an oracle distribution / held-out real data): the student
exploits the teacher's imperfections. The symptom during training is two curves moving apart:

* distance to the teacher (e.g. ``eval/kl_to_teacher`` on a held-out set) keeps **falling**;
* distance to the oracle (e.g. held-out ``eval/nll`` / ``eval/perplexity`` on real data)
  **rises**.

:func:`detect_teacher_hacking` is a pure detector over a metrics history (the ``split ==
"eval"`` records of ``metrics.jsonl``). At every evaluation it fits a least-squares line to the
last ``window + 1`` points of each curve and takes the fitted change over the window, relative
to the curve's mean level (perplexity is compared in log space, i.e. as NLL). It flags the
evaluation when

    teacher_change < -teacher_tolerance   and   oracle_change > tolerance.

:class:`TeacherHackingMonitor` does the same incrementally, and :class:`TeacherHackingCallback`
plugs it into :mod:`kdforge.train`: it logs a warning and writes ``eval/teacher_hacking`` (1.0
or 0.0) plus the two fitted changes into the evaluation metrics, so they land in
``metrics.jsonl`` and in ``kdforge report``. The remedy the paper recommends is more diverse /
on-policy data (GKD's student-generated batches) or stopping at the oracle's best step, which
the monitor reports as ``best_oracle_step``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kdforge.errors import ConfigError
from kdforge.train.callbacks import Callback, TrainerState

log = logging.getLogger(__name__)

#: Candidate metric names, first present wins, when the keys are not given explicitly.
TEACHER_KEYS: tuple[str, ...] = ("eval/kl_to_teacher", "eval/js_to_teacher", "eval/kl_from_teacher")
ORACLE_KEYS: tuple[str, ...] = ("eval/nll", "eval/perplexity", "eval/ce", "eval/loss/ce")
FLAG_KEY = "eval/teacher_hacking"

__all__ = [
    "FLAG_KEY",
    "ORACLE_KEYS",
    "TEACHER_KEYS",
    "HackingCheck",
    "TeacherHackingCallback",
    "TeacherHackingMonitor",
    "detect_teacher_hacking",
]


@dataclass(frozen=True)
class HackingCheck:
    """The verdict at one evaluation.

    Attributes:
        step: the evaluation's step.
        flagged: True when teacher distance falls while oracle distance rises (see module doc).
        teacher_change: fitted relative change of the teacher distance over the window.
        oracle_change: fitted relative change of the oracle distance over the window.
        teacher_value / oracle_value: the raw values at this step.
    """

    step: int
    flagged: bool
    teacher_change: float
    oracle_change: float
    teacher_value: float
    oracle_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fitted_relative_change(values: Sequence[float]) -> float:
    """Least-squares slope over equally spaced points times their span, over the mean level."""
    n = len(values)
    if n < 2:
        return 0.0
    xs = range(n)
    mx = (n - 1) / 2.0
    my = sum(values) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, values)) / sxx
    scale = max(abs(my), 1e-12)
    return slope * (n - 1) / scale


def _pick(keys: Sequence[str], record: Mapping[str, Any]) -> str | None:
    return next((k for k in keys if _finite(record.get(k)) is not None), None)


@dataclass
class TeacherHackingMonitor:
    """Incremental detector: call :meth:`update` after every evaluation.

    Args:
        teacher_key: metric of the distance to the teacher (default: first of
            :data:`TEACHER_KEYS` present).
        oracle_key: metric of the distance to the ground truth (default: first of
            :data:`ORACLE_KEYS` present). A ``perplexity`` key is compared in log space.
        window: evaluations spanned by the trend (the fit uses ``window + 1`` points).
        tolerance: minimal relative rise of the oracle distance over the window (0.01 = 1%).
        teacher_tolerance: minimal relative fall of the teacher distance over the window.
    """

    teacher_key: str | None = None
    oracle_key: str | None = None
    window: int = 3
    tolerance: float = 0.01
    teacher_tolerance: float = 0.0
    steps: list[int] = field(default_factory=list)
    teacher_values: list[float] = field(default_factory=list)
    oracle_values: list[float] = field(default_factory=list)
    checks: list[HackingCheck] = field(default_factory=list)
    _warned_missing: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"window must be >= 1 evaluation, got {self.window}", "use e.g. window=3")
        if self.tolerance < 0 or self.teacher_tolerance < 0:
            raise ConfigError("tolerances must be >= 0", "use e.g. tolerance=0.01 (1%)")

    def _keys(self, metrics: Mapping[str, Any]) -> tuple[str | None, str | None]:
        return (self.teacher_key or _pick(TEACHER_KEYS, metrics),
                self.oracle_key or _pick(ORACLE_KEYS, metrics))

    def update(self, step: int, metrics: Mapping[str, Any]) -> HackingCheck | None:
        """Add one evaluation; return its verdict (None when the metrics lack either curve)."""
        t_key, o_key = self._keys(metrics)
        t_val = _finite(metrics.get(t_key)) if t_key else None
        o_val = _finite(metrics.get(o_key)) if o_key else None
        if t_val is None or o_val is None:
            if not self._warned_missing:
                self._warned_missing = True
                log.warning(
                    "teacher-hacking monitor: evaluation at step %d has no %s; it needs a distance "
                    "to the teacher (%s) and to the ground truth (%s) on held-out data",
                    step,
                    "teacher distance" if t_val is None else "oracle distance",
                    self.teacher_key or "/".join(TEACHER_KEYS),
                    self.oracle_key or "/".join(ORACLE_KEYS),
                )
            return None
        if self.teacher_key is None:
            self.teacher_key = t_key
        if self.oracle_key is None:
            self.oracle_key = o_key
        if o_key and "perplexity" in o_key:
            o_val = math.log(max(o_val, 1e-300))
        self.steps.append(int(step))
        self.teacher_values.append(t_val)
        self.oracle_values.append(o_val)
        w = self.window + 1
        if len(self.steps) < w:
            t_change = o_change = 0.0
            flagged = False
        else:
            t_change = _fitted_relative_change(self.teacher_values[-w:])
            o_change = _fitted_relative_change(self.oracle_values[-w:])
            flagged = t_change < -self.teacher_tolerance and o_change > self.tolerance
        check = HackingCheck(int(step), flagged, t_change, o_change, t_val,
                             float(metrics[o_key]) if o_key else o_val)
        self.checks.append(check)
        return check

    @property
    def onset_step(self) -> int | None:
        """Step of the first flagged evaluation, or None."""
        return next((c.step for c in self.checks if c.flagged), None)

    @property
    def best_oracle_step(self) -> int | None:
        """Step with the lowest oracle distance so far (a safe early-stopping point)."""
        if not self.oracle_values:
            return None
        i = min(range(len(self.oracle_values)), key=self.oracle_values.__getitem__)
        return self.steps[i]

    def summary(self) -> dict[str, Any]:
        return {
            "teacher_key": self.teacher_key,
            "oracle_key": self.oracle_key,
            "flagged_steps": [c.step for c in self.checks if c.flagged],
            "onset_step": self.onset_step,
            "best_oracle_step": self.best_oracle_step,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher_key": self.teacher_key,
            "oracle_key": self.oracle_key,
            "steps": list(self.steps),
            "teacher_values": list(self.teacher_values),
            "oracle_values": list(self.oracle_values),
            "checks": [c.to_dict() for c in self.checks],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.teacher_key = state.get("teacher_key", self.teacher_key)
        self.oracle_key = state.get("oracle_key", self.oracle_key)
        self.steps = [int(s) for s in state.get("steps", [])]
        self.teacher_values = [float(v) for v in state.get("teacher_values", [])]
        self.oracle_values = [float(v) for v in state.get("oracle_values", [])]
        self.checks = [HackingCheck(**c) for c in state.get("checks", [])]


def detect_teacher_hacking(
    history: Iterable[Mapping[str, Any]],
    *,
    teacher_key: str | None = None,
    oracle_key: str | None = None,
    window: int = 3,
    tolerance: float = 0.01,
    teacher_tolerance: float = 0.0,
) -> list[HackingCheck]:
    """Run the detector over a metrics history (e.g. the lines of ``metrics.jsonl``).

    Records with ``split`` other than ``"eval"`` and records missing either curve are skipped;
    the rest are processed in step order. Returns one :class:`HackingCheck` per evaluation.

    Example:
        >>> hist = [{"step": s, "split": "eval", "eval/kl_to_teacher": 2.0 - 0.1 * s,
        ...          "eval/nll": 3.0 - 0.1 * s if s <= 4 else 2.6 + 0.05 * (s - 4)}
        ...         for s in range(10)]
        >>> [c.step for c in detect_teacher_hacking(hist) if c.flagged][:1]
        [7]
    """
    records = [r for r in history if r.get("split", "eval") == "eval"]
    records.sort(key=lambda r: int(r.get("step", 0)))
    mon = TeacherHackingMonitor(teacher_key, oracle_key, window, tolerance, teacher_tolerance)
    mon._warned_missing = True  # a history often mixes eval records without these keys
    out = []
    for r in records:
        check = mon.update(int(r.get("step", 0)), r)
        if check is not None:
            out.append(check)
    return out


class TeacherHackingCallback(Callback):
    """Trainer callback: runs :class:`TeacherHackingMonitor` on every evaluation.

    Adds ``eval/teacher_hacking`` (1.0 when flagged, else 0.0),
    ``eval/teacher_hacking/teacher_change`` and ``eval/teacher_hacking/oracle_change`` to the
    evaluation metrics (place it before the metrics logger so they are written), and logs a
    warning naming the step, both curves and the oracle's best step. With ``stop=True`` it also
    ends training at the first flag (``state.should_stop``).
    """

    def __init__(self, monitor: TeacherHackingMonitor | None = None, *, stop: bool = False) -> None:
        self.monitor = monitor or TeacherHackingMonitor()
        self.stop = stop

    def on_evaluate(self, state: TrainerState, metrics: dict[str, Any]) -> None:
        check = self.monitor.update(state.step, metrics)
        if check is None:
            return
        metrics[FLAG_KEY] = 1.0 if check.flagged else 0.0
        metrics[f"{FLAG_KEY}/teacher_change"] = check.teacher_change
        metrics[f"{FLAG_KEY}/oracle_change"] = check.oracle_change
        if check.flagged:
            log.warning(
                "possible teacher hacking at step %d: %s fell %.1f%% while %s rose %.1f%% over the "
                "last %d evaluations; the student is fitting the teacher's errors. Best %s so far at "
                "step %s. Consider on-policy/more diverse data (e.g. GKD lambda > 0) or stopping there.",
                check.step, self.monitor.teacher_key, -100 * check.teacher_change,
                self.monitor.oracle_key, 100 * check.oracle_change, self.monitor.window,
                self.monitor.oracle_key, self.monitor.best_oracle_step,
            )
            if self.stop:
                state.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)
