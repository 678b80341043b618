"""One :class:`LossSpec` per loss: the function and everything the library needs to know about it.

A loss is a pure function ``fn(student_logits, teacher, *, mask, labels, reduction, temperature,
**params) -> Tensor`` plus its *declared* needs and abilities. The trainer, the chunked LM-head
path, the CLI listing and the fidelity metrics read them from the spec instead of guessing from
names or signatures:

=====================  ==========================================================================
field                  meaning (who reads it)
=====================  ==========================================================================
``name``               the config name in :data:`~kdforge.losses.LOSSES`
``fn``                 the pure function; ``spec(...)`` forwards to it
``description``        one line for ``kdforge losses``
``paper``              the reference it implements
``params_model``       strict pydantic model of the configurable keyword-only parameters (the
                       ones the trainer does not set itself: every keyword-only parameter but
                       ``mask``, ``labels``, ``reduction``); generated from ``fn``'s signature
                       and type hints unless given. :meth:`LossSpec.validate_params` uses it.
``needs_teacher``      False for a loss that ignores the teacher signal (``cross_entropy``)
``needs_labels``       True when ``labels`` are required (``dkd``, ``cross_entropy``); a chunked
                       ``"mean"`` then counts labelled positions only
``sparse_ok``          accepts a :class:`~kdforge.losses.signal.SparseTeacher` (top-k)
``linear_in_teacher``  linear in the teacher distribution ``p``, so a sampled-tail teacher (an
                       unbiased estimate of ``p``) gives an unbiased gradient (``forward_kl``);
                       :func:`kdforge.losses._core.distill` refuses a sampled teacher otherwise
``kernel``             ``kernel(params) -> FusedKernel | None``: the closed-form value + gradient
                       of one chunk for these (full, defaults filled) parameters, None where the
                       closed form does not apply (the chunked path then runs ``fn`` under
                       autograd); None for a loss without one
``default_temperature``  ``fn``'s own default ``temperature`` (DKD: 4), read from the signature
=====================  ==========================================================================

Adding a loss is one function and one decorator line (``docs/losses.md``, "How to add a loss")::

    @register_loss("my_kl", paper="Me et al. 2027", sparse_ok=True)
    def my_kl(student_logits, teacher, *, gamma: float = 0.5, mask=None, temperature=1.0,
              reduction="mean", labels=None): ...
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from kdforge.errors import ConfigError
from kdforge.losses.closed_form import FusedKernel
from kdforge.losses.registry import LOSSES
from kdforge.losses.signal import SparseTeacher

__all__ = ["SET_BY_TRAINER", "KernelFactory", "LossSpec", "loss_spec", "register_loss"]

#: keyword arguments the trainer passes to every loss itself (never configurable through params)
SET_BY_TRAINER = frozenset({"mask", "labels", "reduction"})

#: ``factory(params) -> FusedKernel | None`` with ``params`` every configurable parameter (defaults
#: filled in); None for parameter values the closed form does not cover.
KernelFactory = Callable[[dict[str, Any]], FusedKernel | None]


def _params_model(name: str, fn: Callable[..., Any]) -> type[BaseModel]:
    """Strict pydantic model of ``fn``'s configurable keyword-only parameters."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is validated as Any
        hints = {}
    fields: dict[str, Any] = {}
    extra = "forbid"
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = "allow"
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in SET_BY_TRAINER:
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    config = ConfigDict(extra=extra, strict=True, arbitrary_types_allowed=True)
    return create_model(f"{name}_params", __config__=config, **fields)


def _temperature_default(fn: Callable[..., Any]) -> float:
    param = inspect.signature(fn).parameters.get("temperature")
    if param is None or not isinstance(param.default, (int, float)) or isinstance(param.default, bool):
        return 1.0
    return float(param.default)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function and its declared needs (see the module docstring).

    Calling a spec calls its function, so ``LOSSES.get(name)(student_logits, teacher, ...)`` works
    as for a plain function; ``inspect.signature(spec)`` is the function's.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    description: str = ""
    paper: str = ""
    params_model: type[BaseModel] | None = None
    needs_teacher: bool = True
    needs_labels: bool = False
    sparse_ok: bool = True
    linear_in_teacher: bool = False
    kernel: KernelFactory | None = None
    default_temperature: float | None = None
    #: the loss is a sum of independent per-position terms (False: the positions of one call are
    #: coupled, e.g. in-batch relations; such a loss is never split into chunks of positions)
    separable: bool = True
    _takes: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.params_model is None:
            object.__setattr__(self, "params_model", _params_model(self.name, self.fn))
        if self.default_temperature is None:
            object.__setattr__(self, "default_temperature", _temperature_default(self.fn))
        if not self.description:
            doc = (getattr(self.fn, "__doc__", None) or "").strip().split("\n")[0]
            object.__setattr__(self, "description", doc)
        object.__setattr__(self, "_takes", tuple(sorted(self.params_model.model_fields)))
        object.__setattr__(self, "__signature__", inspect.signature(self.fn))
        object.__setattr__(self, "__doc__", self.fn.__doc__)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(*args, **kwargs)

    @property
    def param_names(self) -> tuple[str, ...]:
        """The configurable parameters, sorted."""
        return self._takes

    @property
    def param_defaults(self) -> dict[str, Any]:
        """``{parameter: default}`` of the configurable parameters that have one."""
        return {k: f.default for k, f in self.params_model.model_fields.items() if not f.is_required()}

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check configured ``params`` against :attr:`params_model`; returns the validated values
        of the given keys only (the function's own defaults stay in charge of the others).

        Raises:
            ConfigError (a ``ValueError``): an unknown parameter (with a did-you-mean
                suggestion and the list of what the loss takes), or a value of the wrong type.
        """
        params = dict(params)
        takes = self._takes
        if self.params_model.model_config.get("extra") != "allow":
            bad = sorted(set(params) - set(takes))
            if bad:
                close = difflib.get_close_matches(bad[0], takes, n=1)
                raise ConfigError(f"loss {self.name!r} has no parameter {bad[0]!r}"
                                  f"{f' (did you mean {close[0]!r}?)' if close else ''}; it takes: {', '.join(takes)}")
        try:
            model = self.params_model.model_validate(params)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'params'}: {e['msg']}"
                                 for e in exc.errors())
            raise ConfigError(f"loss {self.name!r} params: {problems} (it takes: {', '.join(takes)})") from None
        values = model.model_dump()
        return {k: values.get(k, params[k]) for k in params}

    def kernel_for(self, teacher: Any, params: Mapping[str, Any]) -> FusedKernel | None:
        """The closed-form chunk kernel computing ``self(..., **params)`` on a dense teacher, or None.

        None (the chunked path then runs the loss under autograd) for a loss without a closed
        form, no teacher, a :class:`~kdforge.losses.signal.SparseTeacher` (its divergence runs on
        ``k + 1`` buckets: only the student's log-softmax is vocabulary-sized), parameters that do
        not validate, and values the closed form does not cover (the autograd path then raises
        the usual error for invalid ones). A ``temperature`` in ``params`` is validated and
        otherwise ignored: the chunked path applies it around the kernel.
        """
        if self.kernel is None or teacher is None or isinstance(teacher, SparseTeacher):
            return None
        try:
            given = self.validate_params(params)
        except ValueError:
            return None
        return self.kernel({**self.param_defaults, **given})


def register_loss(
    name: str | None = None,
    *,
    description: str = "",
    paper: str = "",
    params_model: type[BaseModel] | None = None,
    needs_teacher: bool = True,
    needs_labels: bool = False,
    sparse_ok: bool = True,
    linear_in_teacher: bool = False,
    kernel: KernelFactory | None = None,
    default_temperature: float | None = None,
    separable: bool = True,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register ``fn`` as a :class:`LossSpec` in :data:`~kdforge.losses.LOSSES`.

    Returns ``fn`` unchanged (the module-level name stays a plain function). ``name`` defaults to
    ``fn.__name__``, ``description`` to the first line of its docstring; the other arguments are
    the spec's fields.
    """

    def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        spec = LossSpec(name or fn.__name__, fn, description, paper, params_model, needs_teacher, needs_labels,
                        sparse_ok, linear_in_teacher, kernel, default_temperature, separable)
        LOSSES.add(spec.name, spec, spec.description)
        return fn

    return decorator


def loss_spec(loss: str | LossSpec | Callable[..., torch.Tensor]) -> LossSpec:
    """The spec of a registered name, of a registered function, or of a spec itself.

    An unregistered callable gets a spec built from its signature (needs a teacher, no labels,
    no closed form), so the chunked path and the trainer treat it like any loss.

    Raises:
        ConfigError: an unknown name (with a did-you-mean suggestion).
    """
    if isinstance(loss, LossSpec):
        return loss
    if isinstance(loss, str):
        return LOSSES.get(loss)
    for entry in LOSSES.entries():
        if entry.obj.fn is loss:
            return entry.obj
    return LossSpec(getattr(loss, "__name__", "custom_loss"), loss)
