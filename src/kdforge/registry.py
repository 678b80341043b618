"""Name -> object registries used by configs and the CLI.

A registry maps an exact config name (``"forward_kl"``) to an object (a function, a class) and a
one-line description. Lookup is exact, never by substring; an unknown name raises a
:class:`~kdforge.errors.ConfigError` that lists the known names and suggests the closest one.

Example::

    LOSSES = Registry("loss")

    @LOSSES.register("forward_kl", "KL(p_teacher || q_student), Hinton KD")
    def forward_kl(...): ...

    fn = LOSSES.get("forward_kl")
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from kdforge.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    """A named collection of objects selectable from configs."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str | None = None, description: str = "") -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (default: its ``__name__``).

        The description defaults to the first line of the object's docstring.
        """

        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot infer a {self.kind} name for {obj!r}; pass name=")
            if key in self._entries and self._entries[key].obj is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            doc = description or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[key] = Entry(key, obj, doc)
            return obj

        return decorator

    def add(self, name: str, obj: T, description: str = "") -> T:
        """Register ``obj`` without decorator syntax."""
        return self.register(name, description)(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a plugin or a test's temporary entry); unknown names are an error."""
        if name not in self._entries:
            raise KeyError(f"{self.kind} {name!r} is not registered")
        del self._entries[name]

    def get(self, name: str) -> T:
        try:
            return self._entries[name].obj
        except KeyError:
            raise ConfigError(*self._unknown(name)) from None

    def describe(self, name: str) -> str:
        return self._entries[name].description

    def _unknown(self, name: str) -> tuple[str, str]:
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return (
            f"unknown {self.kind} {name!r}",
            f"{hint}choose one of: {', '.join(known) or '(none registered)'}",
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[k] for k in sorted(self._entries)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
