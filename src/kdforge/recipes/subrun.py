"""One layer for recipes that run several named, resumable sub-runs and write one results folder.

A recipe (``llm_kd``, ``fashion_mnist_kd``) compares several ways of training a student: a teacher
to train once, then one sub-run per (method, seed). Everything that is *how*, not *what*, lives
here, once:

* :class:`RecipeRun` — the run folder and the launch group: rank 0 creates ``RUN_DIR`` and writes
  ``config.yaml``; :meth:`RecipeRun.decide` makes a decision on rank 0 and shares it (every rank
  then takes the same branch); :meth:`RecipeRun.publish` writes ``results.json``, ``results.md``
  and the plots on rank 0 (a plot never fails a finished run); the other ranks
  :meth:`RecipeRun.wait_for_results` and return what rank 0 wrote.
* :class:`SubRun` — one named unit of work with a config fingerprint:

  - :meth:`SubRun.reuse` returns the completion record of a sub-run that finished earlier under
    the same fingerprint, with intact weights (their SHA-256 is checked), else None;
  - :meth:`SubRun.prepare` readies its folder for a (re)start: drops a stale record and, on
    resume, checkpoints written under another fingerprint (``fingerprint.txt`` says which);
  - :meth:`SubRun.finish` writes the record **last** (it is the commit marker):
    ``{"fingerprint", "weights", "weights_sha256", ...the recipe's fields}``;
  - :meth:`SubRun.load_weights` loads a finished sub-run's weights into a fresh model.

* :func:`train_student` — ``distiller.train(resume=...)`` plus the FSDP/DDP-safe gather of the
  trained student into a plain module on rank 0 (:func:`gather_student`).

On-disk formats are those the recipes wrote before this layer (``subrun.json`` for ``llm_kd``,
``result.json`` / ``teacher.json`` for ``fashion_mnist_kd``), so existing run folders still resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from kdforge.distributed import broadcast_from_main
from kdforge.io import (
    ensure_dir,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

SUBRUN_RECORD = "subrun.json"
FINGERPRINT_FILE = "fingerprint.txt"


# --------------------------------------------------------------------------------------------
# small pure helpers


def fingerprint(key: Any, length: int = 20) -> str:
    """The first ``length`` hex digits of ``sha256(json.dumps(key, sort_keys=True))``.

    ``key`` holds everything that determines a sub-run's result (not where it is written); values
    JSON cannot encode are hashed as ``str(value)``.
    """
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:length]


def config_key(model: BaseModel, **kwargs: Any) -> dict[str, Any]:
    """``model`` as a fingerprint key: its JSON dump *without the fields left at their defaults*.

    A field added to a config class in a later version (with a default that keeps the old
    behaviour) therefore leaves every existing fingerprint unchanged, and ``--resume`` still
    reuses the sub-runs trained before the upgrade. The price: changing a field's *default* in
    the code does not retrain old sub-runs — a default that changes results must come with a new
    field name or a bump of the key. ``kwargs`` go to ``model_dump`` (``exclude=...``).
    """
    return model.model_dump(mode="json", exclude_defaults=True, **kwargs)


def slug(name: str) -> str:
    """A folder name for a method name: lower case, runs of other characters become ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "method"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """``timings[key]`` = seconds the ``with`` body took."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - t0


#: what a run leaves in its folder before it has finished or checkpointed anything: rewritten by
#: the next run (``metrics.jsonl`` of a run without checkpoints restarts with it; ``train.log`` is appended to)
START_LEFTOVERS = frozenset({"config.yaml", FINGERPRINT_FILE, "metrics.jsonl", "train.log", "checkpoints", "report"})
#: a teacher cache (reused by the next run when its settings match, refused with a CacheError when not)
CACHE_MANIFEST = "manifest.json"


def finished_work(output_dir: str | Path) -> list[str]:
    """What in ``output_dir`` an earlier run finished or can resume from: everything but the
    leftovers of a start that failed before its first checkpoint (:data:`START_LEFTOVERS`, teacher
    caches, hidden files, empty folders). Paths relative to ``output_dir``, sorted.

    ``kdforge run`` without ``--resume`` replaces a folder holding only such leftovers (a corrected
    rerun after an early failure), and refuses one with finished work.
    """
    root = Path(output_dir)
    found: list[str] = []

    def visit(folder: Path) -> None:
        if (folder / CACHE_MANIFEST).is_file() or folder.name == "report":
            return
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if entry.name == "checkpoints":
                    if any(p.is_dir() and re.fullmatch(r"step-\d+", p.name) for p in entry.iterdir()):
                        found.append(str(entry.relative_to(root)))
                    continue
                visit(entry)
            elif entry.name not in START_LEFTOVERS:
                found.append(str(entry.relative_to(root)))

    if root.is_dir():
        visit(root)
    return found


# --------------------------------------------------------------------------------------------
# the run folder and its launch group


@dataclass
class RecipeRun:
    """``RUN_DIR`` of one recipe run and the processes that run it.

    Every process of a launch builds one (:meth:`start`); rank 0 is the one that writes.
    """

    out: Path
    group: Any = None  # a kdforge.teachers.cache.parallel.BuildGroup; one process when None

    def __post_init__(self) -> None:
        if self.group is None:
            from kdforge.teachers.cache.parallel import BuildGroup

            self.group = BuildGroup()

    @classmethod
    def start(cls, recipe: str, config: Any, output_dir: str | Path, *, record_output_dir: bool = False) -> RecipeRun:
        """Join the launch group; rank 0 creates ``output_dir`` and writes ``config.yaml``
        (``{"recipe": recipe, **config}``; with ``record_output_dir`` its ``output_dir`` is the real one)."""
        from kdforge.teachers.cache.parallel import join_launch_group

        run = cls(Path(output_dir), join_launch_group())
        if run.main:
            ensure_dir(run.out)
            saved = {"recipe": recipe, **config.model_dump(mode="json")}
            if record_output_dir:
                saved["output_dir"] = str(run.out)
            write_text_atomic(run.out / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
        return run

    @property
    def main(self) -> bool:
        return self.group.rank == 0

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def barrier(self) -> None:
        self.group.barrier()

    def decide(self, decision: Callable[[], Any]) -> Any:
        """``decision()`` evaluated on rank 0 and shared with every rank (same branch everywhere)."""
        return broadcast_from_main(decision() if self.main else None)

    def subrun(self, label: str, folder: str | Path, key: Any, *, length: int = 20,
               record: str = SUBRUN_RECORD) -> SubRun:
        """The sub-run ``RUN_DIR/folder`` whose fingerprint is that of ``key``."""
        path = self.out / folder
        return SubRun(self, label, path, fingerprint(key, length), path / record)

    def publish(self, results: dict[str, Any], markdown: str,
                plots: Sequence[Callable[[], Any]] = (), extra: Mapping[str, str] | None = None) -> None:
        """Rank 0 writes ``results.json``, ``results.md``, the ``extra`` text files and the plots
        (a failing plot is logged, never raised); then every rank passes a barrier."""
        if self.main:
            write_json_atomic(self.out / "results.json", results)
            write_text_atomic(self.out / "results.md", markdown)
            for name, text in (extra or {}).items():
                write_text_atomic(self.out / name, text)
            for plot in plots:
                try:
                    plot()
                except Exception as exc:  # a plot must never fail a finished run
                    log.warning("could not write the plot: %s", exc)
        self.barrier()  # the other ranks read results.json after this

    def wait_for_results(self) -> dict[str, Any]:
        """On a rank other than 0: wait for :meth:`publish`, return the results rank 0 wrote."""
        self.barrier()
        return json.loads((self.out / "results.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# one sub-run


@dataclass
class SubRun:
    """One named, resumable unit of a recipe run.

    Attributes:
        run: the recipe run it belongs to.
        label: how logs name it, e.g. ``"'KD top-64', seed 0"``.
        dir: its training folder (``metrics.jsonl``, ``checkpoints/``, ``fingerprint.txt``).
        fingerprint: hash of everything that determines its result.
        record: its completion record (usually ``dir/subrun.json``); weights named in it are
            relative to the record's folder.
    """

    run: RecipeRun
    label: str
    dir: Path
    fingerprint: str
    record: Path = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.record is None:
            self.record = self.dir / SUBRUN_RECORD

    # -- reuse ---------------------------------------------------------------------------------
    def reuse(self, enabled: bool = True) -> dict[str, Any] | None:
        """The record of this sub-run if it finished earlier under the same fingerprint with
        intact weights (rank 0 checks, every rank gets its answer), else None."""
        record = self.run.decide(lambda: self.read_finished() if enabled else None)
        if record is not None:
            log.info("resume: %s finished earlier (%s); not retrained", self.label, self.dir)
        return record

    def read_finished(self) -> dict[str, Any] | None:
        """The record if this sub-run finished under its fingerprint with intact weights, else None
        (this process reads the files; see :meth:`reuse` for the decision shared by all ranks)."""
        record = read_json(self.record)
        if record is None:
            return None
        if record.get("fingerprint") != self.fingerprint:
            log.info("resume: %s was trained with another config; retraining it", self.record.parent)
            return None
        if "weights" in record or "weights_sha256" in record:
            weights = self.record.parent / str(record.get("weights", ""))
            if not weights.is_file() or sha256_file(weights) != record.get("weights_sha256"):
                log.warning("resume: the weights of %s are missing or do not match their checksum; retraining it",
                            self.record.parent)
                return None
        return record

    # -- (re)start -----------------------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        """Make :attr:`dir` ready for a sub-run about to (re)start; every rank calls this.

        Rank 0 drops a stale completion record and, on resume, checkpoints written under another
        fingerprint (continuing them would mix two runs), then records the fingerprint; every rank
        then sees the same checkpoints before the Distiller looks for one.
        """
        if self.run.main:
            ensure_dir(self.dir)
            self.record.unlink(missing_ok=True)
            marker = self.dir / FINGERPRINT_FILE
            old = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
            if resume and old != self.fingerprint and (self.dir / "checkpoints").exists():
                log.warning("resume: the checkpoints in %s were written by another config; starting this sub-run "
                            "over", self.dir)
                shutil.rmtree(self.dir / "checkpoints")
            write_text_atomic(marker, self.fingerprint + "\n")
        self.run.barrier()

    # -- completion ----------------------------------------------------------------------------
    def finish(self, fields: Mapping[str, Any], *, weights: str,
               model: torch.nn.Module | None = None) -> dict[str, Any] | None:
        """Rank 0 records this sub-run as finished; returns the record there (None elsewhere).

        ``weights`` (relative to the record's folder) is the student file; with ``model`` it is
        written here first (``state_dict`` as safetensors), else it must exist already. The record
        ``{"fingerprint", "weights", "weights_sha256", **fields}`` is written last. No barrier:
        the caller decides when the other ranks may read it.
        """
        if not self.run.main:
            return None
        from kdforge.train.checkpoint import state_dict_to_bytes

        path = self.record.parent / weights
        if model is not None:
            write_bytes_atomic(path, state_dict_to_bytes(model.state_dict()))
        record = {"fingerprint": self.fingerprint, "weights": weights, "weights_sha256": sha256_file(path),
                  **fields}
        write_json_atomic(self.record, record)
        return record

    def load_weights(self, record: Mapping[str, Any], model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (a fresh copy of the student) holding the weights ``record`` names, in eval mode.

        Keys absent from the file must be tied to a loaded tensor (``save_pretrained`` stores a
        tied LM head once).
        """
        from kdforge.errors import CheckpointError
        from kdforge.train.checkpoint import state_dict_from_bytes

        path = self.record.parent / record["weights"]
        result = model.load_state_dict(state_dict_from_bytes(path.read_bytes()), strict=False)
        state = model.state_dict()
        loaded = {state[k].data_ptr() for k in state if k not in set(result.missing_keys)}
        untied = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
        if untied or result.unexpected_keys:
            raise CheckpointError(f"{path} does not fit the student of this config (missing {untied[:3]}, "
                                  f"unexpected {list(result.unexpected_keys)[:3]})",
                                  f"delete {self.record} to retrain this sub-run")
        return model.eval()


# --------------------------------------------------------------------------------------------
# training a student and gathering it


def gather_student(distiller: Any, empty: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """The trained student as a plain module in eval mode, for rank 0's evaluation.

    Under DDP (or one process) that is the unwrapped student itself, on every rank. Under FSDP its
    parameters are shards that only a collective forward can use, so the full weights are gathered
    (every rank must call this) into ``empty()`` on rank 0; other ranks get None.
    """
    from kdforge.train.checkpoint import is_fully_sharded

    acc = distiller.accelerator
    if not is_fully_sharded(distiller.student):
        return acc.unwrap_model(distiller.student).eval()
    state = acc.get_state_dict(distiller.student)  # collective: every rank joins the gather
    if not acc.is_main_process:
        return None
    model = empty()
    model.load_state_dict(state)
    return model.eval()


@dataclass
class TrainedStudent:
    """What :func:`train_student` returns: the final trainer state, the plain trained student
    (None on ranks other than 0 under FSDP) and the training wall time."""

    state: Any
    model: torch.nn.Module | None
    seconds: float


def train_student(distiller: Any, *, resume: bool, empty: Callable[[], torch.nn.Module]) -> TrainedStudent:
    """``distiller.train(resume=resume)`` then :func:`gather_student`; every rank calls this."""
    t0 = time.perf_counter()
    state = distiller.train(resume=resume)
    seconds = time.perf_counter() - t0
    return TrainedStudent(state, gather_student(distiller, empty), seconds)


def copy_of(template: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """A factory of deep copies of ``template`` (the ``empty`` of :func:`gather_student`)."""
    return lambda: copy.deepcopy(template)
