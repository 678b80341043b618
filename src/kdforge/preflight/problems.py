"""Problems found before training, collected and reported together.

A pre-flight check never stops at the first problem: each checker records what it finds in a
:class:`Problems` collector (one :class:`Problem` per finding, keyed by the config path it is
about), and the caller raises one :class:`PreflightError` listing all of them, so a user fixes
the whole config in one edit instead of one error per attempt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kdforge.errors import ConfigError, KdforgeError

__all__ = ["PreflightError", "Problem", "Problems"]


@dataclass(frozen=True)
class Problem:
    """One thing that would make the run fail (or waste its time), found without training.

    Attributes:
        key: the config path it is about (``methods.1.objective.0.params``, ``data.corpus``), or
            a name for what is not a key (``output_dir``, ``memory``).
        problem: what is wrong, one sentence.
        fix: what to do about it.
    """

    key: str
    problem: str
    fix: str | None = None

    def line(self) -> str:
        text = f"  - {self.key}: {self.problem}"
        return text + (f"\n      fix: {self.fix}" if self.fix else "")


class Problems:
    """A collector: checkers :meth:`add` findings, or run code under :meth:`catch` so a
    :class:`~kdforge.errors.KdforgeError` it raises becomes a finding instead of ending the check."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, key: str, problem: str, fix: str | None = None) -> None:
        self.items.append(Problem(key, problem, fix))

    def extend(self, problems: list[Problem]) -> None:
        self.items.extend(problems)

    @contextmanager
    def catch(self, key: str) -> Iterator[None]:
        """Record a KdforgeError raised in the block under ``key`` (and go on)."""
        try:
            yield
        except KdforgeError as exc:
            self.add(key, exc.problem, exc.fix)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.items)


class PreflightError(ConfigError):
    """Every problem the pre-flight check found, at once (``kdforge run --dry-run`` and the start
    of every run); nothing was trained or written.

    Attributes:
        problems: the :class:`Problem` list.
    """

    def __init__(self, problems: list[Problem], source: str = "config") -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''} found before training (nothing was run)"
        super().__init__("\n".join([head, *(p.line() for p in self.problems)]),
                         "fix each problem listed above, then check again with `kdforge run CONFIG --dry-run`")
