"""Where a run's progress goes besides ``metrics.jsonl``: experiment trackers, ``train.log`` and
the progress bar.

* **Trackers** (``train.log_with``): any tracker ``accelerate`` integrates — ``tensorboard``
  (the ``tracking`` extra), ``wandb``, ``mlflow``, ``comet_ml``, ``aim``, ``clearml``,
  ``dvclive``, ``swanlab``, ``trackio`` — named in the config; a tracker that is not installed
  is a :class:`~kdforge.errors.ConfigError` naming the package to install (accelerate itself
  would skip it silently). ``train.project`` names the project (wandb project, mlflow experiment,
  the TensorBoard sub-folder; default ``kdforge``), ``train.run_name`` the run (default: the run
  folder's last two parts, e.g. ``kd-top-64/seed-0``). TensorBoard writes into
  ``RUN_DIR/tensorboard/<project>/``.
* **train.log**: :func:`log_to_file` copies every ``kdforge`` log record of a block into a file
  (``RUN_DIR/train.log`` for a :class:`~kdforge.train.Distiller` run, ``OUT/train.log`` for a
  whole ``kdforge run``), appended across resumes.
* **Progress bars**: ``train.progress: auto`` (the default) shows them when stderr is a terminal
  and no CI is detected (``CI``, ``GITHUB_ACTIONS``... set); ``true``/``false`` force it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdforge.errors import ConfigError

__all__ = ["TRACKER_PACKAGES", "accelerator_kwargs", "log_to_file", "progress_enabled", "run_name_of",
           "start_trackers", "tracker_problems", "trackers_of"]

#: tracker name -> (pip package, accelerate's availability check name)
TRACKER_PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard (pip install 'kdforge[tracking]')",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}

DEFAULT_PROJECT = "kdforge"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CI_VARS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TF_BUILD", "CIRCLECI")


def trackers_of(log_with: str | Sequence[str] | None) -> list[str]:
    """``log_with`` as a list of tracker names (a single name, a list, or nothing)."""
    if not log_with:
        return []
    return [log_with] if isinstance(log_with, str) else list(log_with)


def tracker_problems(log_with: str | Sequence[str] | None) -> list[tuple[str, str]]:
    """``(problem, fix)`` for every tracker of ``log_with`` that is unknown or not installed."""
    import accelerate.utils as au

    out = []
    for name in trackers_of(log_with):
        if name not in TRACKER_PACKAGES:
            import difflib

            close = difflib.get_close_matches(name, list(TRACKER_PACKAGES), n=1)
            out.append((f"unknown tracker {name!r}",
                        f"{f'did you mean {close[0]!r}? ' if close else ''}choose from: {', '.join(TRACKER_PACKAGES)}"))
        elif not getattr(au, f"is_{name}_available", lambda: False)():
            out.append((f"tracker {name!r} is not installed", f"pip install {TRACKER_PACKAGES[name]}, or remove it "
                                                               "from train.log_with"))
    return out


def accelerator_kwargs(log_with: str | Sequence[str] | None, run_dir: Path | None) -> dict[str, Any]:
    """The ``Accelerator`` keyword arguments of ``log_with`` (``{}`` when it is empty).

    Raises:
        ConfigError: a tracker is unknown or not installed, or a file-based tracker has no run folder.
    """
    names = trackers_of(log_with)
    if not names:
        return {}
    bad = tracker_problems(names)
    if bad:
        raise ConfigError("; ".join(p for p, _ in bad), "; ".join(f for _, f in bad))
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import ProjectConfiguration

    if run_dir is None:
        local = [n for n in names if LOGGER_TYPE_TO_CLASS[n].requires_logging_directory]
        if local:
            raise ConfigError(f"tracker(s) {local} write files into the run folder, and there is none",
                              "set train.output_dir (a recipe sets it for every run), or drop them from log_with")
        return {"log_with": names}

    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"))}


def run_name_of(run_dir: Path | None, run_name: str | None = None) -> str | None:
    """``run_name``, else the run folder's last two parts (``kd-top-64/seed-0``)."""
    if run_name:
        return run_name
    if run_dir is None:
        return None
    parts = Path(run_dir).parts[-2:]
    return "/".join(parts)


def start_trackers(accelerator: Any, *, project: str | None, run_name: str | None,
                   hparams: dict[str, Any]) -> None:
    """``accelerator.init_trackers`` with the project, the run name (wandb ``name``, mlflow
    ``run_name``) and the hyper-parameters (flat: non-scalars as strings)."""
    flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()}
    init = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}} if run_name else {}
    accelerator.init_trackers(project or DEFAULT_PROJECT, config=flat, init_kwargs=init)


def progress_enabled(progress: bool | str, stream: Any = None) -> bool:
    """``True``/``False`` as given; ``"auto"``: stderr is a terminal and no CI variable is set."""
    if progress != "auto":
        return bool(progress)
    stream = sys.stderr if stream is None else stream
    if any(os.environ.get(v) for v in _CI_VARS):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextmanager
def log_to_file(path: Path | None, *, enabled: bool = True, logger_name: str = "kdforge") -> Iterator[None]:
    """Copy every ``logger_name`` record at INFO and above into ``path`` (appended) inside the block.

    The logger's level is lowered to INFO for the block when it was higher (the Python API
    without ``logging.basicConfig``), so the file always has the step lines. Nothing happens when
    ``path`` is None or ``enabled`` is False (the non-main processes of a launch).
    """
    if path is None or not enabled:
        yield
        return
    logger = logging.getLogger(logger_name)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
