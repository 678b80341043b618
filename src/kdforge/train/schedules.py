"""Scheduled values: a loss weight or a loss parameter that follows a schedule over training.

Declared in YAML on a loss term (``docs/schedules.md``)::

    - name: dkd
      weight: {schedule: warmup, value: 1.0, warmup_steps: 200}   # DKD's warm-up of its weight
      params: {beta: 8.0}
    - name: taid
      weight: 1.0
      params:
        t: {schedule: taid_adaptive, t_start: 0.4, t_end: 1.0}     # TAID's adaptive interpolation

A :class:`Schedule` gives ``value(step, max_steps)``: ``step`` counts the optimizer steps already
done, so the value used *during* the first step is ``value(0, S)``. An adaptive schedule also
``observe``\\ s each step's metrics and carries a state (``state_dict``/``load_state_dict``, JSON-safe,
so a resume is bit-exact). Each schedule has a strict pydantic config (:class:`ScheduleConfig`,
tagged by its ``schedule`` key) validated when the YAML is read, with did-you-mean messages.

:class:`ScheduledValues` holds the schedules of one objective by path (``"<term key>.weight"``,
``"<term key>.params.<name>"``). The trainer reads :meth:`ScheduledValues.current` every
optimizer step and passes the values to the loss call (no objective is mutated), logs them as
``sched/<path>``, lets the schedules observe the step's (globally reduced) losses, and saves
``state_dict()`` in every checkpoint.

Adding a schedule is one class (a nested ``Config`` model and ``value``) plus one
``@SCHEDULES.register("name", "formula")`` line.
"""

from __future__ import annotations

import bisect
import difflib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from numbers import Integral, Real
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import GetJsonSchemaHandler, JsonSchemaValue
from pydantic_core import PydanticCustomError

from kdforge.config import StrictModel
from kdforge.errors import CheckpointError, ConfigError
from kdforge.registry import Registry

log = logging.getLogger(__name__)

__all__ = [
    "SCHEDULES", "Constant", "Cosine", "Linear", "Piecewise", "Position", "Schedule", "ScheduleConfig",
    "ScheduledFloat", "ScheduledValues", "TAIDAdaptive", "Warmup", "build_schedule", "is_scheduled",
    "parse_scheduled", "resolve_position",
]


# -- positions: a step count or a fraction of the run ----------------------------------------------

def _position(value: Any) -> int | float:
    """An ``int >= 0`` is a step count; a ``float`` in ``[0, 1]`` is a fraction of the run."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError("a position is a step count (an integer >= 0) or a fraction of the run (0.0 to 1.0)")
    if isinstance(value, Integral):
        if value < 0:
            raise ValueError("a step count must be >= 0")
        return int(value)
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        if math.isfinite(value) and value > 1.0 and value == int(value):
            raise ValueError(f"a float position is a fraction of the run in [0, 1]; for step {int(value)} "
                             f"write the integer {int(value)}")
        raise ValueError("a float position is a fraction of the run in [0, 1] (write an integer for a step count)")
    return value


#: A point of the run: ``int`` = a step count, ``float`` in ``[0, 1]`` = a fraction of ``max_steps``
#: (``1`` is step 1, ``1.0`` is the end of the run).
Position = Annotated[int | float, PlainValidator(_position), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "number", "minimum": 0, "maximum": 1}]})]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def resolve_position(position: int | float, max_steps: int) -> float:
    """The step a :data:`Position` stands for in a run of ``max_steps`` steps (may be fractional)."""
    return float(position) if isinstance(position, int) else position * max_steps


# -- configs ---------------------------------------------------------------------------------------

class ScheduleConfig(StrictModel):
    """Base of every schedule's config: ``{schedule: KIND, **params}`` (immutable, unknown keys rejected).

    Validating the base class (``ScheduleConfig.model_validate(data)``, or a field typed
    ``ScheduleConfig``/:data:`ScheduledFloat`) dispatches on ``schedule`` to the registered
    schedule's own ``Config``; an unknown kind or key is reported with the closest known name.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), frozen=True)

    schedule: str = Field(description="the schedule's registered name (kdforge.train.schedules.SCHEDULES)")

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value the schedule can take (for range checks of a weight or a param)."""
        raise NotImplementedError

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch(cls, data: Any, handler: Any) -> Any:
        if cls is not ScheduleConfig:
            return handler(data)
        if isinstance(data, ScheduleConfig):
            return data
        if not isinstance(data, Mapping):
            raise _validation_error([_custom("schedule_type", "a schedule is a mapping {schedule: KIND, ...}",
                                             (), data)])
        name = data.get("schedule")
        if name is None:
            raise _validation_error([_custom("missing", f"key 'schedule' is missing (name one of: {_known()})",
                                             ("schedule",), dict(data))])
        if not isinstance(name, str) or name not in SCHEDULES:
            close = difflib.get_close_matches(str(name), SCHEDULES.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _validation_error([_custom("unknown_schedule", f"unknown schedule {name!r}{hint}; known: {_known()}",
                                             ("schedule",), dict(data))])
        model = SCHEDULES.get(name).Config
        try:
            return model.model_validate(dict(data))
        except ValidationError as exc:  # re-raised with the hints of the concrete model
            raise _validation_error([_friendly(e, model, dict(data)) for e in exc.errors()]) from None

    def __repr_name__(self) -> str:
        return f"ScheduleConfig[{self.schedule}]"


def _known() -> str:
    return ", ".join(SCHEDULES.names())


def _custom(kind: str, message: str, loc: tuple[Any, ...], data: Any) -> dict[str, Any]:
    return {"type": PydanticCustomError(kind, "{message}", {"message": message}), "loc": loc, "input": data}


def _validation_error(errors: list[dict[str, Any]]) -> ValidationError:
    return ValidationError.from_exception_data("ScheduleConfig", errors)  # type: ignore[arg-type]


def _friendly(err: Any, model: type[ScheduleConfig], data: dict[str, Any]) -> dict[str, Any]:
    """A schedule's own validation error, with the did-you-mean of its model for an unknown key
    (kdforge.config's formatter would look the key up on the base class)."""
    if err["type"] == "extra_forbidden":
        known = sorted(model.model_fields)
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
        return _custom("unknown_key", f"unknown key{hint}", err["loc"], data)
    return _custom(err["type"], str(err["msg"]), err["loc"], err.get("input"))


def _number_or_schedule(value: Any) -> float | ScheduleConfig:
    if isinstance(value, ScheduleConfig):
        return value
    if isinstance(value, Mapping):
        return ScheduleConfig.model_validate(value)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError("expected a finite number or a schedule {schedule: KIND, ...}")
    return float(value)


class _ScheduleJsonSchema:
    """JSON Schema of "a number or a schedule": one strict object per schedule registered when the
    schema is generated (so a schedule added by a plug-in module is listed too)."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        members: list[JsonSchemaValue] = [{"type": "number"}]
        for name in SCHEDULES.names():
            member = dict(handler(SCHEDULES.get(name).Config.__pydantic_core_schema__))
            member["title"] = f"schedule: {name}"
            member["required"] = ["schedule", *[k for k in member.get("required", []) if k != "schedule"]]
            member["description"] = SCHEDULES.describe(name)
            members.append(member)
        return {"anyOf": members}


#: A pydantic field type: a plain number, or a schedule's config (``{schedule: KIND, ...}``).
#: Errors inside a schedule keep their dotted path (``objective.0.weight.warmup_steps``); it dumps
#: a schedule whole, and its JSON Schema lists every registered schedule.
ScheduledFloat = Annotated[float | ScheduleConfig, PlainValidator(_number_or_schedule),
                           PlainSerializer(lambda v: v.model_dump() if isinstance(v, ScheduleConfig) else v),
                           _ScheduleJsonSchema()]


# -- schedules -------------------------------------------------------------------------------------

SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


class Schedule(ABC):
    """Base of every schedule: ``value(step, max_steps)`` (+ ``observe`` and state if it adapts).

    Build one from its config (``Linear(Linear.Config(start=1.0, end=0.0))``), from keyword
    arguments (``Linear(start=1.0, end=0.0)``), or from the YAML mapping with
    :func:`build_schedule`. Subclasses define a nested ``Config`` (a :class:`ScheduleConfig` with
    ``schedule: Literal["<its registered name>"] = "<its registered name>"``) and ``value``.
    """

    Config: ClassVar[type[ScheduleConfig]]

    def __init__(self, config: ScheduleConfig | None = None, /, **params: Any) -> None:
        if config is None:
            config = _validated(self.Config, params)
        elif params:
            raise TypeError(f"{type(self).__name__}() takes a config or keyword parameters, not both")
        elif not isinstance(config, self.Config):
            raise ConfigError(f"{type(self).__name__} got a {type(config).__name__} config",
                              f"pass a {type(self).__name__}.Config, or use build_schedule(config)")
        self.config = config
        self.term_key: str | None = None

    @property
    def name(self) -> str:
        return self.config.schedule

    @abstractmethod
    def value(self, step: int, max_steps: int) -> float:
        """The value to use during optimizer step ``step`` (0-based: steps already done) of a run
        of ``max_steps`` steps."""

    def bind(self, term_key: str) -> None:
        """Called by :class:`ScheduledValues` with the key of the loss term that owns the schedule."""
        self.term_key = term_key

    def check_run(self, max_steps: int) -> None:
        """Raise :class:`~kdforge.errors.ConfigError` if the schedule cannot run ``max_steps`` steps
        (positions out of order once fractions are resolved). Called before training."""
        return None

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """See the metrics of the optimizer step just done (adaptive schedules); default: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """A JSON-safe state that :meth:`load_state_dict` restores bit for bit; ``{}`` if stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise CheckpointError(f"schedule {self.name!r} is stateless, but the checkpoint holds a state "
                                  f"({', '.join(state)})", "resume with the schedules the run was saved with")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump(exclude={"schedule"}).items())
        return f"{type(self).__name__}({params})"


def _validated(model: type[ScheduleConfig], params: Mapping[str, Any]) -> ScheduleConfig:
    data = {"schedule": model.model_fields["schedule"].default, **params}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [_friendly(e, model, data) for e in exc.errors()]
        raise ConfigError(*_problem_and_fix(_validation_error(errors), data.get("schedule"))) from None


def _problem_and_fix(exc: ValidationError, kind: Any) -> tuple[str, str]:
    """One line naming every problem (``schedule 'warmup': warmup_stps: unknown key (did you mean ...)``)."""
    known_kind = isinstance(kind, str) and kind in SCHEDULES
    problems = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if msg == "Field required":
            msg = "required key is missing"
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or err["type"] == "missing" else f" (got {got!r})"
        loc = ".".join(str(x) for x in err["loc"])
        bare = loc == "" or (loc == "schedule" and not known_kind)
        problems.append(f"{msg}{shown}" if bare else f"{loc}: {msg}{shown}")
    if known_kind:
        keys = ", ".join(k for k in SCHEDULES.get(kind).Config.model_fields if k != "schedule")
        return f"schedule {kind!r}: {'; '.join(problems)}", f"{kind!r} takes: {keys} (docs/schedules.md)"
    return "; ".join(problems), f"write {{schedule: KIND, ...}} with KIND one of: {_known()} (docs/schedules.md)"


def _lerp(start: float, end: float, p: float) -> float:
    """``start + (end - start) * p`` for ``p`` in ``[0, 1]``: exact at both ends, never outside them."""
    if p <= 0.0:
        return start
    if p >= 1.0:
        return end
    return min(max(start + (end - start) * p, min(start, end)), max(start, end))


class _Span(ScheduleConfig):
    """``start`` -> ``end`` between the positions ``begin`` and ``stop``."""

    start: FiniteFloat = Field(description="value up to `begin`")
    end: FiniteFloat = Field(description="value from `stop` on")
    begin: Position = Field(0, description="where the change starts: a step (int) or a fraction of the run")
    stop: Position = Field(1.0, description="where it ends: a step (int) or a fraction of the run (1.0 = the end)")

    @model_validator(mode="after")
    def _ordered(self) -> _Span:
        if type(self.begin) is type(self.stop) and self.stop < self.begin:
            raise ValueError(f"stop={self.stop!r} comes before begin={self.begin!r}")
        return self

    def bounds(self) -> tuple[float, float]:
        return min(self.start, self.end), max(self.start, self.end)


class _SpanSchedule(Schedule):
    config: _Span

    def progress(self, step: int, max_steps: int) -> float:
        """``clip((step - begin) / (stop - begin), 0, 1)``; a step function at ``begin`` if ``stop == begin``."""
        begin = resolve_position(self.config.begin, max_steps)
        stop = resolve_position(self.config.stop, max_steps)
        if stop <= begin:
            return 1.0 if step >= begin else 0.0
        return min(max((step - begin) / (stop - begin), 0.0), 1.0)

    def check_run(self, max_steps: int) -> None:
        begin = resolve_position(self.config.begin, max_steps)
        stop = resolve_position(self.config.stop, max_steps)
        if stop < begin:
            raise ConfigError(f"schedule {self.name!r}: stop={self.config.stop!r} (step {stop:g}) comes before "
                              f"begin={self.config.begin!r} (step {begin:g}) in a run of {max_steps} steps",
                              "choose stop >= begin (an int is a step, a float in [0, 1] a fraction of the run)")


@SCHEDULES.register("constant", "value, at every step")
class Constant(Schedule):
    """``v(s) = value``. What a plain number means; useful to name a value in logs."""

    class Config(ScheduleConfig):
        schedule: Literal["constant"] = "constant"
        value: FiniteFloat

        def bounds(self) -> tuple[float, float]:
            return self.value, self.value

    config: Config

    def value(self, step: int, max_steps: int) -> float:
        return self.config.value


@SCHEDULES.register("linear", "start + (end - start) * clip((s - begin) / (stop - begin), 0, 1)")
class Linear(_SpanSchedule):
    """``v(s) = start + (end - start) * p(s)``, ``p(s) = clip((s - begin) / (stop - begin), 0, 1)``.

    ``start`` up to ``begin``, ``end`` from ``stop`` on (exactly), a straight line between.
    """

    class Config(_Span):
        schedule: Literal["linear"] = "linear"

    def value(self, step: int, max_steps: int) -> float:
        return _lerp(self.config.start, self.config.end, self.progress(step, max_steps))


@SCHEDULES.register("cosine", "end + (start - end) * (1 + cos(pi * p)) / 2, p as for linear")
class Cosine(_SpanSchedule):
    """``v(s) = end + (start - end) * (1 + cos(pi * p(s))) / 2``, ``p`` as for :class:`Linear`
    (half a cosine wave from ``start`` to ``end``, as in SGDR's annealing, Loshchilov & Hutter 2017)."""

    class Config(_Span):
        schedule: Literal["cosine"] = "cosine"

    def value(self, step: int, max_steps: int) -> float:
        p = self.progress(step, max_steps)
        if p <= 0.0 or p >= 1.0:
            return _lerp(self.config.start, self.config.end, p)
        return _lerp(self.config.start, self.config.end, 0.5 * (1.0 - math.cos(math.pi * p)))


@SCHEDULES.register("warmup", "value * min(1, (s + 1) / warmup_steps): a linear ramp from 0, then constant (DKD)")
class Warmup(Schedule):
    """``v(s) = value * min(1, (s + 1) / W)`` with ``W`` = ``warmup_steps`` (``v = value`` if ``W = 0``).

    The ramp of DKD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022), which warms its
    loss weight up linearly over the first 20 epochs; the ``s + 1`` matches kdforge's learning-rate
    warm-up (``train.warmup_steps``): the first step gets ``value / W``, step ``W - 1`` the full value.
    """

    class Config(ScheduleConfig):
        schedule: Literal["warmup"] = "warmup"
        value: FiniteFloat = Field(description="the value after the warm-up")
        warmup_steps: Position = Field(description="length of the ramp: steps (int) or a fraction of the run")

        def bounds(self) -> tuple[float, float]:
            return min(0.0, self.value), max(0.0, self.value)

    config: Config

    def value(self, step: int, max_steps: int) -> float:
        warmup = resolve_position(self.config.warmup_steps, max_steps)
        if step + 1 >= warmup:
            return self.config.value
        return self.config.value * ((step + 1) / warmup)


@SCHEDULES.register("piecewise", "values[i] where i = number of boundaries <= s (piecewise constant)")
class Piecewise(Schedule):
    """``v(s) = values[i]``, ``i = #{j : boundaries[j] <= s}``: ``values[0]`` before the first
    boundary, ``values[j + 1]`` from boundary ``j`` on (like a multi-step decay of a weight)."""

    class Config(ScheduleConfig):
        schedule: Literal["piecewise"] = "piecewise"
        values: list[FiniteFloat] = Field(min_length=1, description="one more value than boundaries")
        boundaries: list[Position] = Field(default_factory=list,
                                           description="non-decreasing steps (ints) or fractions (floats), not mixed")

        @model_validator(mode="after")
        def _shape(self) -> Piecewise.Config:
            if len(self.values) != len(self.boundaries) + 1:
                raise ValueError(f"{len(self.values)} values need {len(self.values) - 1} boundaries, "
                                 f"got {len(self.boundaries)}")
            if len({type(b) for b in self.boundaries}) > 1:
                raise ValueError("boundaries mix steps (ints) and fractions (floats): use one kind")
            if any(b < a for a, b in zip(self.boundaries, self.boundaries[1:])):
                raise ValueError(f"boundaries must not decrease, got {self.boundaries}")
            return self

        def bounds(self) -> tuple[float, float]:
            return min(self.values), max(self.values)

    config: Config

    def value(self, step: int, max_steps: int) -> float:
        edges = [resolve_position(b, max_steps) for b in self.config.boundaries]
        return self.config.values[bisect.bisect_right(edges, step)]


@SCHEDULES.register("taid_adaptive", "TAID's t (Shing et al. 2025): linear floor t_start->t_end + adaptive rise")
class TAIDAdaptive(Schedule):
    """TAID's interpolation coefficient ``t`` (Shing et al., "TAID", ICLR 2025, Algorithm 1).

    An adapter of :class:`kdforge.losses.taid.TAIDSchedule`, which owns the rule: with the relative
    change ``delta = (J_prev - J) / J_prev`` of the observed loss ``J`` smoothed by momentum
    ``m <- beta m + (1 - beta) delta``,
    ``t <- min(t_end, max(t_linear(n), t + alpha sigmoid(m) (1 - t)))`` after ``n`` observed
    steps, ``t_linear(n) = t_start + (t_end - t_start) min(1, n / max_steps)``. ``mode: linear``
    keeps only the floor. ``value`` is the current ``t`` (``t_start`` before any observation);
    each :meth:`observe` advances it by one step. ``J`` is ``metrics[metric]``, by default
    ``loss/<key of the term that owns the schedule>`` (the trainer passes the value summed over
    processes, so every rank moves ``t`` alike). A non-finite ``J`` leaves ``t`` where it is.
    """

    class Config(ScheduleConfig):
        schedule: Literal["taid_adaptive"] = "taid_adaptive"
        t_start: float = Field(0.4, ge=0.0, le=1.0, description="initial t (paper: 0.4)")
        t_end: float = Field(1.0, ge=0.0, le=1.0, description="final t (1.0: plain forward KL)")
        mode: Literal["adaptive", "linear"] = "adaptive"
        alpha: float = Field(5e-4, ge=0.0, le=1.0, description="adaptive step size (paper: 5e-4)")
        beta: float = Field(0.99, ge=0.0, le=1.0, description="momentum of the relative loss change (paper: 0.99)")
        metric: str | None = Field(None, description="metric observed; default loss/<the owning term's key>")

        @model_validator(mode="after")
        def _rises(self) -> TAIDAdaptive.Config:
            if self.t_start > self.t_end:
                raise ValueError(f"t_start={self.t_start} > t_end={self.t_end}: t must rise")
            return self

        def bounds(self) -> tuple[float, float]:
            return self.t_start, self.t_end

    config: Config

    def __init__(self, config: ScheduleConfig | None = None, /, **params: Any) -> None:
        super().__init__(config, **params)
        self.inner: Any = None  # the TAIDSchedule, made at the first value() (it needs max_steps)
        self._pending: dict[str, Any] | None = None

    @property
    def metric(self) -> str | None:
        if self.config.metric is not None:
            return self.config.metric
        return None if self.term_key is None else f"loss/{self.term_key}"

    def _ensure(self, max_steps: int) -> Any:
        if self.inner is None:
            from kdforge.losses.taid import TAIDSchedule

            c = self.config
            self.inner = TAIDSchedule(int(max_steps), t_start=c.t_start, t_end=c.t_end, mode=c.mode,
                                      alpha=c.alpha, beta=c.beta)
            if self._pending is not None:
                self.inner.load_state_dict(self._pending)
                self._pending = None
        elif self.inner.total_steps != max_steps and not getattr(self, "_warned", False):
            self._warned = True
            log.warning("taid_adaptive: the schedule spans %d steps (set at its first step), the run now has %d",
                        self.inner.total_steps, max_steps)
        return self.inner

    def value(self, step: int, max_steps: int) -> float:
        return float(self._ensure(max_steps).t)

    def observe(self, metrics: Mapping[str, Any]) -> None:
        if self.inner is None:
            raise ConfigError("taid_adaptive.observe() was called before value()",
                              "read value(step, max_steps) for the step first, then observe its metrics")
        if self.config.mode == "linear":
            self.inner.step(None)
            return
        key = self.metric
        if key is None:
            raise ConfigError("taid_adaptive does not know which loss to observe",
                              "set `metric: loss/<term>` or hold the schedule in a ScheduledValues")
        if key not in metrics:
            raise ConfigError(f"taid_adaptive observes {key!r}, absent from the step's metrics "
                              f"({', '.join(sorted(metrics)) or 'none'})",
                              "keep the term in the objective, or set `metric:` to a logged loss")
        self.inner.step(float(metrics[key]))

    def state_dict(self) -> dict[str, Any]:
        if self.inner is None:
            return {} if self._pending is None else dict(self._pending)
        return {"total_steps": self.inner.total_steps, **self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        state = dict(state)
        total = state.pop("total_steps", None)
        if self.inner is None and total is not None:
            self._ensure(int(total))
        if self.inner is None:
            self._pending = state
        else:
            self.inner.load_state_dict(state)


# -- building --------------------------------------------------------------------------------------

def build_schedule(config: ScheduleConfig | Mapping[str, Any]) -> Schedule:
    """A schedule from its config or its YAML mapping ``{schedule: KIND, **params}``.

    Raises:
        ConfigError: unknown kind or key (with the closest known name), a missing or bad value.
    """
    if not isinstance(config, ScheduleConfig):
        if not isinstance(config, Mapping):
            raise ConfigError(f"a schedule is a mapping {{schedule: KIND, ...}}, got {type(config).__name__}",
                              f"KIND is one of: {_known()} (docs/schedules.md)")
        try:
            config = ScheduleConfig.model_validate(dict(config))
        except ValidationError as exc:
            raise ConfigError(*_problem_and_fix(exc, config.get("schedule"))) from None
    cls = SCHEDULES.get(config.schedule)
    return cls(config)


def is_scheduled(value: Any) -> bool:
    """True for a schedule (``{schedule: ...}``, a :class:`ScheduleConfig`, a :class:`Schedule`)."""
    return isinstance(value, Schedule | ScheduleConfig) or (isinstance(value, Mapping) and "schedule" in value)


def parse_scheduled(value: Any) -> float | Schedule:
    """A plain number stays that number; a schedule (mapping, config or object) becomes a :class:`Schedule`.

    Raises:
        ConfigError: anything else (a string, a list, a bool, a non-finite number), or a bad schedule.
    """
    if isinstance(value, Schedule):
        return value
    if is_scheduled(value):
        return build_schedule(value)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ConfigError(f"expected a number or a schedule, got {value!r}",
                          f"write a finite number or {{schedule: KIND, ...}} with KIND one of: {_known()}")
    return value  # type: ignore[return-value]


# -- the schedules of one objective ----------------------------------------------------------------

def _split_path(path: str) -> str:
    """The term key of ``"<key>.weight"`` or ``"<key>.params.<name>"``."""
    if isinstance(path, str):
        if path.endswith(".weight") and len(path) > len(".weight"):
            return path[: -len(".weight")]
        key, sep, name = path.rpartition(".params.")
        if sep and key and name:
            return key
    raise ConfigError(f"bad scheduled-value path {path!r}", "write '<term key>.weight' or '<term key>.params.<name>'")


class ScheduledValues:
    """The schedules of one objective, by path; what the trainer applies, logs and checkpoints.

    Args:
        schedules: ``{path: schedule}`` with paths ``"<term key>.weight"`` or
            ``"<term key>.params.<name>"`` and each schedule a :class:`Schedule`, a
            :class:`ScheduleConfig` or its YAML mapping.
        max_steps: the run's length, used when :meth:`current` is called without one; given
            here, each schedule is checked against it at once (:meth:`Schedule.check_run`).

    Nothing here touches an objective: read :meth:`current` each optimizer step and pass the values
    to the loss call, then :meth:`observe` the step's metrics (the same on every process).
    """

    def __init__(self, schedules: Mapping[str, Schedule | ScheduleConfig | Mapping[str, Any]] | None = None, *,
                 max_steps: int | None = None) -> None:
        self.max_steps = None if max_steps is None else _check_max_steps(max_steps)
        self._schedules: dict[str, Schedule] = {}
        for path, schedule in (schedules or {}).items():
            self.add(path, schedule)

    @classmethod
    def from_terms(cls, terms: Iterable[tuple[str, Any, Mapping[str, Any]]], *,
                   max_steps: int | None = None) -> ScheduledValues:
        """The schedules among ``(term key, weight, params)`` triples, e.g. from the YAML terms; plain
        numbers and other params are skipped. The inputs are read, never modified."""
        values = cls(max_steps=max_steps)
        for key, weight, params in terms:
            if is_scheduled(weight):
                values.add(f"{key}.weight", weight)
            for name, param in (params or {}).items():
                if is_scheduled(param):
                    values.add(f"{key}.params.{name}", param)
        return values

    def add(self, path: str, schedule: Schedule | ScheduleConfig | Mapping[str, Any]) -> Schedule:
        """Hold ``schedule`` at ``path`` (built from a config/mapping if needed); returns it."""
        key = _split_path(path)
        if path in self._schedules:
            raise ConfigError(f"{path!r} is scheduled twice", "give each loss term a distinct label")
        if not isinstance(schedule, Schedule):
            try:
                schedule = build_schedule(schedule)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc.problem}", exc.fix) from None
        if any(s is schedule for s in self._schedules.values()):
            raise ConfigError(f"{path!r} reuses a schedule object held at another path",
                              "build one schedule per path (an adaptive one carries its own state)")
        schedule.bind(key)
        if self.max_steps is not None:
            schedule.check_run(self.max_steps)
        self._schedules[path] = schedule
        return schedule

    @property
    def paths(self) -> list[str]:
        return list(self._schedules)

    def __getitem__(self, path: str) -> Schedule:
        return self._schedules[path]

    def __contains__(self, path: object) -> bool:
        return path in self._schedules

    def __iter__(self) -> Iterator[str]:
        return iter(self._schedules)

    def __len__(self) -> int:
        return len(self._schedules)

    def __repr__(self) -> str:
        return f"ScheduledValues({self._schedules!r}, max_steps={self.max_steps})"

    def current(self, step: int, max_steps: int | None = None) -> dict[str, float]:
        """``{path: value}`` for optimizer step ``step`` (steps already done) of a run of ``max_steps``
        (default: the one given at construction)."""
        total = self._max_steps(max_steps)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an int >= 0 (optimizer steps done), got {step!r}",
                              "pass the trainer's step counter")
        return {path: float(s.value(step, total)) for path, s in self._schedules.items()}

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """Let each schedule see the metrics of the step just done (``loss/<term>`` etc.; global values)."""
        for path, schedule in self._schedules.items():
            try:
                schedule.observe(metrics)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc.problem}", exc.fix) from None

    def log_values(self, step: int, max_steps: int | None = None) -> dict[str, float]:
        """``{"sched/<path>": value}`` for step ``step``: the values the step used, for metrics.jsonl."""
        return {f"sched/{path}": v for path, v in self.current(step, max_steps).items()}

    def state_dict(self) -> dict[str, Any]:
        """``{path: {"schedule": kind, "state": ...}}`` (JSON-safe; floats round-trip exactly)."""
        return {path: {"schedule": s.name, "state": s.state_dict()} for path, s in self._schedules.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the saved paths and kinds must be the ones held.

        Raises:
            CheckpointError: a path missing or extra, or a schedule of another kind.
        """
        fix = "resume with the objective (and its schedules) the run was saved with, or start a fresh run"
        if set(state) != set(self._schedules):
            missing, extra = sorted(set(self._schedules) - set(state)), sorted(set(state) - set(self._schedules))
            raise CheckpointError("the checkpoint's scheduled values do not match this objective's"
                                  f"{f' (not saved: {missing})' if missing else ''}"
                                  f"{f' (saved, not scheduled now: {extra})' if extra else ''}", fix)
        for path, schedule in self._schedules.items():
            entry = state[path]
            if not isinstance(entry, Mapping) or "state" not in entry:
                raise CheckpointError(f"the checkpoint's schedule state at {path!r} is malformed: {entry!r}", fix)
            if entry.get("schedule") != schedule.name:
                raise CheckpointError(f"{path!r} was a {entry.get('schedule')!r} schedule when saved, "
                                      f"now it is {schedule.name!r}", fix)
        for path, schedule in self._schedules.items():
            schedule.load_state_dict(state[path]["state"])

    def _max_steps(self, max_steps: int | None) -> int:
        if max_steps is not None:
            return _check_max_steps(max_steps)
        if self.max_steps is None:
            raise ConfigError("the run length is unknown", "pass max_steps to current() or to ScheduledValues()")
        return self.max_steps


def _check_max_steps(max_steps: Any) -> int:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"max_steps must be a positive int, got {max_steps!r}",
                          "pass the number of optimizer steps of the run")
    return max_steps
