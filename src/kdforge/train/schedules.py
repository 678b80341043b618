"""Scheduled values: any loss weight or loss parameter can follow a schedule over training.

Declared in YAML on a loss term (``docs/schedules.md``)::

    - name: dkd
      weight: {schedule: warmup, value: 1.0, warmup_steps: 200}   # DKD's warm-up of its weight
    - name: taid
      weight: 1.0
      params:
        t: {schedule: taid_adaptive, t_start: 0.4, t_end: 1.0}     # TAID's adaptive interpolation

A :class:`Schedule` gives ``value(step)`` for optimizer step ``step`` of a run of ``max_steps``
(``step`` counts completed steps: the value used *during* step ``s`` is ``value(s)``); adaptive
schedules also ``observe`` each step's metrics. :class:`ScheduledValues` holds the schedules of one
objective by path (``"<term key>.weight"``, ``"<term key>.params.<name>"``); the trainer reads
``current(step)`` every step and passes the values to the loss call — no objective is mutated —
logs them as ``sched/<path>``, and checkpoints ``state_dict()`` so a resume is bit-exact.

Adding a schedule = one class with ``value``/``state_dict``/``load_state_dict`` (and ``observe``
if it adapts) plus one ``@SCHEDULES.register(...)`` line.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from kdforge.errors import ConfigError
from kdforge.registry import Registry

__all__ = ["SCHEDULES", "Schedule", "ScheduledValues", "build_schedule"]

SCHEDULES: Registry[type] = Registry("schedule")


class Schedule:
    """Base class: ``value(step)``; stateless unless it overrides ``observe`` and the state methods."""

    #: the loss-metric key an adaptive schedule observes (set by ScheduledValues), or None
    observes: str | None = None

    def __init__(self, max_steps: int, **params: Any) -> None:
        self.max_steps = max(int(max_steps), 1)

    def value(self, step: int) -> float:
        raise NotImplementedError

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """See the metrics of the step just done (adaptive schedules)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (nothing for a stateless schedule)."""

    def _at(self, x: int | float) -> float:
        """A step given as a count, or as a fraction of the run when 0 < x < 1."""
        return float(x) * self.max_steps if isinstance(x, float) and 0 < x < 1 else float(x)


def _progress(step: int, begin: float, end: float) -> float:
    if end <= begin:
        return 1.0 if step >= end else 0.0
    return min(max((step - begin) / (end - begin), 0.0), 1.0)


@SCHEDULES.register("constant", "value (the same every step)")
class Constant(Schedule):
    def __init__(self, max_steps: int, *, value: float) -> None:
        super().__init__(max_steps)
        self._value = float(value)

    def value(self, step: int) -> float:
        return self._value


@SCHEDULES.register("linear", "start + (end - start) * clip((s - begin) / (stop - begin), 0, 1)")
class Linear(Schedule):
    def __init__(self, max_steps: int, *, start: float, end: float, begin: float = 0, stop: float | None = None) -> None:
        super().__init__(max_steps)
        self.start, self.end = float(start), float(end)
        self.begin, self.stop = self._at(begin), self._at(stop) if stop is not None else float(self.max_steps)

    def value(self, step: int) -> float:
        return self.start + (self.end - self.start) * _progress(step, self.begin, self.stop)


@SCHEDULES.register("cosine", "end + (start - end) * (1 + cos(pi * progress)) / 2")
class Cosine(Linear):
    def value(self, step: int) -> float:
        p = _progress(step, self.begin, self.stop)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))


@SCHEDULES.register("warmup", "value * min(1, (s + 1) / warmup_steps): a linear ramp, then constant (DKD)")
class Warmup(Schedule):
    def __init__(self, max_steps: int, *, value: float, warmup_steps: int | float) -> None:
        super().__init__(max_steps)
        self._value, self.warmup = float(value), max(self._at(warmup_steps), 1.0)

    def value(self, step: int) -> float:
        return self._value * min(1.0, (step + 1) / self.warmup)


@SCHEDULES.register("taid_adaptive", "TAID's interpolation t (Shing et al. 2025): linear floor + adaptive rise")
class TAIDAdaptive(Schedule):
    """Wraps :class:`kdforge.losses.taid.TAIDSchedule` (``mode: adaptive`` or ``linear``); it
    observes the loss of the term it belongs to (``loss/<term key>``)."""

    def __init__(self, max_steps: int, *, t_start: float = 0.4, t_end: float = 1.0, mode: str = "adaptive",
                 alpha: float = 5e-4, beta: float = 0.99) -> None:
        super().__init__(max_steps)
        from kdforge.losses.taid import TAIDSchedule

        self.inner = TAIDSchedule(self.max_steps, t_start=t_start, t_end=t_end, mode=mode, alpha=alpha, beta=beta)

    def value(self, step: int) -> float:
        return self.inner.t

    def observe(self, metrics: Mapping[str, Any]) -> None:
        loss = metrics.get(self.observes) if self.observes else None
        self.inner.step(float(loss) if loss is not None else None)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(dict(state))


def build_schedule(spec: Mapping[str, Any], max_steps: int = 1) -> Schedule:
    """A schedule from its YAML form ``{schedule: KIND, **params}``; clear errors for a bad kind or key."""
    import inspect

    spec = dict(spec)
    kind = spec.pop("schedule", None)
    if kind not in SCHEDULES:
        close = difflib.get_close_matches(str(kind), SCHEDULES.names(), n=1)
        raise ConfigError(f"unknown schedule {kind!r}{f' (did you mean {close[0]!r}?)' if close else ''}",
                          f"use one of: {', '.join(SCHEDULES.names())}")
    cls = SCHEDULES.get(kind)
    takes = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    names = [p.name for p in takes]
    for key in spec:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"schedule {kind!r} has no parameter {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}",
                              f"it takes: {', '.join(names)}")
    missing = [p.name for p in takes if p.default is inspect.Parameter.empty and p.name not in spec]
    if missing:
        raise ConfigError(f"schedule {kind!r} needs {', '.join(missing)}", f"it takes: {', '.join(names)}")
    try:
        return cls(max_steps, **spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"schedule {kind!r}: {exc}", f"check its parameters ({', '.join(names)})") from None


class ScheduledValues:
    """The schedules of one objective by path; what the trainer applies, logs and checkpoints."""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], *, max_steps: int) -> None:
        self.schedules: dict[str, Schedule] = {}
        for path, spec in specs.items():
            schedule = build_schedule(spec, max_steps)
            schedule.observes = f"loss/{path.split('.', 1)[0]}"
            self.schedules[path] = schedule

    def current(self, step: int) -> dict[str, float]:
        return {path: s.value(step) for path, s in self.schedules.items()}

    def observe(self, metrics: Mapping[str, Any]) -> None:
        for schedule in self.schedules.values():
            schedule.observe(metrics)

    def log_values(self, step: int) -> dict[str, float]:
        import torch

        return {f"sched/{path}": torch.tensor(v) for path, v in self.current(step).items()}

    def state_dict(self) -> dict[str, Any]:
        return {path: s.state_dict() for path, s in self.schedules.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for path, s in self.schedules.items():
            if path in state:
                s.load_state_dict(state[path])
