"""Validated configs (pydantic v2) and YAML loading with clear messages.

All kdforge configs derive from :class:`StrictModel`: unknown keys are rejected (a typo never
silently falls back to a default), types are checked, and a failure is reported as one
:class:`~kdforge.errors.ConfigError` listing every bad key by its dotted path, e.g.::

    configs/fmnist.yaml: 2 problems
      - student.hiden: unknown key (did you mean 'hidden'?)
      - train.lr: Input should be a valid number, unable to parse string as a number (got 'fast')
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kdforge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for configs: forbids unknown keys, validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with clear errors for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file not found: {p}",
            "check the path; bundled recipes live in the repository's configs/ folder",
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}", "fix the YAML syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p} must contain a mapping of keys to values, got {type(data).__name__}",
            "write the recipe as `key: value` lines",
        )
    return data


def validate(model: type[M], data: dict[str, Any], *, source: str = "config") -> M:
    """Validate ``data`` against ``model``; raise one readable ConfigError on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source), _FIX) from None


_FIX = ("edit the keys listed above; `kdforge run RECIPE.yaml --dry-run` prints every key with its "
        "value, and docs/configs.md explains how configs work")


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    errors = exc.errors()
    lines = [f"{source}: {len(errors)} problem{'s' if len(errors) != 1 else ''}"]
    for err in errors:
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else (
                f" (known keys: {', '.join(known)})" if known else ""
            )
            lines.append(f"  - {loc}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"  - {loc}: required key is missing")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"  - {loc}: {msg}{shown}")
    return "\n".join(lines)


def _known_keys(model: type[BaseModel], parent: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at ``parent``; empty if it cannot be resolved.

    Follows nested models, ``Optional``/``list``/``dict`` wrappers and tagged unions (pydantic
    puts the tag value in the error location, e.g. ``backend.openai.concurency``).
    """
    current: Any = model
    for part in parent:
        if _is_model(current):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
            continue
        members = _models_in(current)
        tagged = [m for m in members if _has_literal(m, part)] or _tagged(current, part)
        if len(tagged) == 1:  # ``part`` is a union tag: descend into that member
            current = tagged[0]
        elif len(members) == 1:  # list[Model] / dict[str, Model] / Optional[Model]: skip the index
            current = members[0]
        else:
            return []
    if not _is_model(current):
        members = _models_in(current)
        current = members[0] if len(members) == 1 else None
    return sorted(current.model_fields) if _is_model(current) else []


def _tagged(tp: Any, tag: Any) -> list[type[BaseModel]]:
    """The model of a callable-discriminated union member marked ``Tag(tag)`` (pydantic puts the tag
    in the error location), as a one-item list; empty if there is none."""
    for arg in typing.get_args(tp):
        if typing.get_origin(arg) is typing.Annotated:
            inner, *meta = typing.get_args(arg)
            if _is_model(inner) and any(getattr(m, "tag", None) == tag for m in meta):
                return [inner]
        found = _tagged(arg, tag)
        if found:
            return found
    return []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """Pydantic models inside a type annotation (unions, Annotated, containers)."""
    if _is_model(tp):
        return [tp]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(tp):
        for m in _models_in(arg):
            if m not in out:
                out.append(m)
    return out


def _has_literal(model: type[BaseModel], value: Any) -> bool:
    for field in model.model_fields.values():
        if typing.get_origin(field.annotation) is typing.Literal and value in typing.get_args(field.annotation):
            return True
    return False


def load_config(model: type[M], path: str | os.PathLike) -> M:
    """Read a YAML file and validate it against ``model``."""
    return validate(model, read_yaml(path), source=str(path))
