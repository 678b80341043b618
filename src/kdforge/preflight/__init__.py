"""Pre-flight: find every problem of a recipe config before any training, and estimate what the
run will need (``kdforge run CONFIG --dry-run``, and the start of every ``kdforge run``).

Public API::

    from kdforge.preflight import preflight, Problem, PreflightError, Estimate

    report = preflight(recipe, config, output_dir)   # checks + estimate, nothing written
    report.raise_if_problems("recipe.yaml")          # one PreflightError listing all of them

A recipe's checks are :meth:`kdforge.recipes.Recipe.check` (default: the module registered for it
in :data:`CHECK_MODULES`, e.g. :mod:`kdforge.preflight.llm_kd`), built from the shared checkers of
:mod:`kdforge.preflight.checks`; its estimate is :meth:`kdforge.recipes.Recipe.estimate`
(:mod:`kdforge.preflight.estimate`). See ``docs/configs.md`` ("Dry run and pre-flight").
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.preflight.estimate import Estimate, Item, fmt_bytes
from kdforge.preflight.fits import check_fits
from kdforge.preflight.problems import PreflightError, Problem, Problems

log = logging.getLogger(__name__)

__all__ = ["CHECK_MODULES", "Estimate", "Item", "PreflightError", "PreflightReport", "Problem", "Problems",
           "checks_module", "fmt_bytes", "preflight"]

#: recipe name -> module with ``check(config, output_dir) -> list[Problem]`` and
#: ``estimate(config, output_dir) -> Estimate | None`` (imported on demand)
CHECK_MODULES: dict[str, str] = {
    "llm_kd": "kdforge.preflight.llm_kd",
    "fashion_mnist_kd": "kdforge.preflight.fashion_mnist",
    "pgkd": "kdforge.preflight.pgkd",
}


def checks_module(recipe_name: str | None) -> ModuleType | None:
    """The pre-flight module of a recipe, or None when it has none."""
    module = CHECK_MODULES.get(recipe_name or "")
    return importlib.import_module(module) if module else None


@dataclass
class PreflightReport:
    """What :func:`preflight` found: the problems (empty = good to go) and the estimate."""

    problems: list[Problem] = field(default_factory=list)
    estimate: Estimate | None = None

    def raise_if_problems(self, source: str = "config") -> None:
        if self.problems:
            raise PreflightError(self.problems, source)


def preflight(recipe: Any, config: Any, output_dir: Path, *, force: bool = False,
              probe: bool = False, extra: list[Problem] | None = None) -> PreflightReport:
    """Run a recipe's checks and estimate; nothing is trained or written.

    Args:
        recipe: a :class:`~kdforge.recipes.Recipe` instance.
        config: its validated config.
        output_dir: the run folder.
        force: do not turn "does not fit in memory/disk" into problems (``--force``).
        probe: time two optimizer steps (:meth:`Recipe.probe`) for the time estimate.
        extra: problems the caller found itself (e.g. a folder that already holds a run).
    """
    problems = Problems()
    problems.extend(list(extra or []))
    problems.extend(_guarded(problems, "check", lambda: recipe.check(config, output_dir)) or [])
    estimate = _guarded(problems, "estimate", lambda: recipe.estimate(config, output_dir))
    if estimate is not None and probe:
        estimate.step_seconds = _guarded(problems, "probe", lambda: recipe.probe(config))
    if estimate is not None and not force:
        check_fits(problems, estimate, output_dir)
    return PreflightReport(problems.items, estimate)


def _guarded(problems: Problems, what: str, fn: Any) -> Any:
    """A check that crashes on something unforeseen is logged and skipped, never blocks a run;
    a KdforgeError from it is a problem like any other."""
    try:
        return fn()
    except KdforgeError as exc:
        problems.add(what, exc.problem, exc.fix)
        return None
    except Exception as exc:  # noqa: BLE001 - a checker's bug must not stop a valid run
        log.warning("pre-flight %s skipped: %s: %s", what, type(exc).__name__, exc)
        log.debug("pre-flight %s traceback", what, exc_info=True)
        return None
