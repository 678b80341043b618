"""Training configuration for :class:`~kdforge.train.Distiller`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kdforge.config import StrictModel, format_validation_error
from kdforge.errors import ConfigError

SchedulerName = Literal["constant", "linear", "cosine"]


class _FriendlyMeta(type(StrictModel)):  # type: ignore[misc]
    """Turns a ValidationError of a *direct* construction into a ConfigError, and maps positional
    arguments to the fields named in the class's ``_positional`` (e.g. ``LossTerm("kd", 1.0)``).

    Done in the metaclass, not in ``__init__``: pydantic calls a model that defines ``__init__``
    through that ``__init__`` when it validates it nested inside another config (``train:`` or
    ``methods[].objective[]`` of a recipe), and a ConfigError raised there would be wrapped as a
    "Value error" that loses the dotted key path (``train.lr``). So these models define no
    ``__init__``.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        names: tuple[str, ...] = getattr(cls, "_positional", ())
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes at most {len(names)} positional arguments ({len(args)} given)")
        for field_name, value in zip(names, args):
            if field_name in kwargs:
                raise TypeError(f"{cls.__name__}() got multiple values for argument {field_name!r}")
            if value is not None:
                kwargs[field_name] = value
        try:
            return super().__call__(**kwargs)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, cls.__name__),
                              "fix the keys listed above (docs/training.md lists them)") from None


class FriendlyModel(StrictModel, metaclass=_FriendlyMeta):
    """A StrictModel whose direct construction (``TrainConfig(lr="fast")``) raises a readable
    :class:`~kdforge.errors.ConfigError` instead of pydantic's ``ValidationError``; nested in
    another config it reports its errors under their full dotted path (``train.lr``)."""


class TrainConfig(FriendlyModel):
    """Hyper-parameters of one distillation run (validated; unknown keys are rejected).

    Exactly one of ``max_steps`` / ``epochs`` sets the length; a step is one *optimizer* step, i.e.
    ``grad_accum_steps`` micro-batches of ``batch_size`` examples on each process.
    """

    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train for")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (if no max_steps)")
    batch_size: int = Field(8, ge=1, description="micro-batch size per process")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: SchedulerName = "linear"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global grad norm; null = off")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1, description="evaluate every N steps (and at the end)")
    save_every: int | None = Field(None, ge=1, description="checkpoint every N steps (and at the end)")
    keep_last: int | None = Field(2, ge=1, description="checkpoints to keep; null = all")
    output_dir: str | None = Field(None, description="RUN_DIR; null = nothing written to disk")
    progress: bool | Literal["auto"] = Field(
        "auto", description="progress bar: auto = on a terminal, off in CI and when output is not a TTY")
    log_with: list[str] = Field(default_factory=list, description=(
        "experiment trackers (through accelerate): tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, "
        "swanlab, trackio; a single name or a list (docs/training.md)"))
    project: str | None = Field(None, description="tracker project (wandb project, mlflow experiment); null = kdforge")
    run_name: str | None = Field(None, description="tracker run name; null = the run folder's last two parts")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/Inf loss or gradient: stop with an error naming the term, step and batch, "
        "or skip that update")
    max_nonfinite_skips: int = Field(8, ge=1, description="with on_nonfinite: skip, stop after this many "
                                     "non-finite steps in a row")
    empty_start_batches: int | None = Field(
        32, ge=1, description="stop with a DataError when the first N micro-batches hold no real position "
        "(all labels ignored / masks false); null = only a whole empty epoch stops")

    @field_validator("log_with", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """One name or a list; every name one accelerate knows (installation is checked at the start)."""
        from kdforge.train.tracking import TRACKER_PACKAGES, trackers_of

        if value is None or isinstance(value, str | list | tuple):
            names = trackers_of(value)
            unknown = [n for n in names if not isinstance(n, str) or n not in TRACKER_PACKAGES]
            if unknown:
                raise ValueError(f"unknown tracker {unknown[0]!r}; choose from: {', '.join(TRACKER_PACKAGES)}")
            return names
        return value

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of max_steps or epochs")
        return self
