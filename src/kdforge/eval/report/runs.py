"""Read run folders (``docs/run-format.md``) into plain data for the report.

A run folder has ``results.json`` (models with role, metrics, seeds, reliability, cost) and one
or more ``metrics.jsonl`` files (training curves), possibly nested per seed/method. A folder
without ``results.json`` (a training run still going, or a bare trainer run) still yields its
curves, one pseudo-model per ``metrics.jsonl`` found.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.errors import DataError

log = logging.getLogger(__name__)

#: ``reference``: a model scored for comparison that the run did not train (an off-the-shelf model,
#: the untrained student); like the teacher it is shown but never a contender for "best"
ROLES = ("teacher", "baseline", "student", "reference")
_MAX_DEPTH = 4


@dataclass
class ModelEntry:
    """One model row of a report."""

    name: str
    role: str
    metrics: dict[str, float] = field(default_factory=dict)
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    reliability: dict[str, list] | None = None
    breakdowns: dict[str, dict[str, float]] = field(default_factory=dict)
    histories: list[list[dict[str, Any]]] = field(default_factory=list)  # one per seed/run
    source: str = ""

    @property
    def n_seeds(self) -> int:
        return max(len(self.per_seed), 1)

    def value(self, key: str) -> float | None:
        """A finite metric (cost keys ``params``/``size_mb`` are folded into ``metrics``)."""
        v = self.metrics.get(key)
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return f if math.isfinite(f) else None

    def std(self, key: str) -> float | None:
        return self.value(f"{key}_std") if f"{key}_std" in self.metrics else None


@dataclass
class RunData:
    """One comparison: models sharing a primary metric."""

    title: str
    primary_metric: str | None
    higher_is_better: bool
    models: list[ModelEntry]
    recipe: str | None = None
    created: str | None = None
    sources: list[str] = field(default_factory=list)
    #: the ``compare`` recipe's ``leaderboard.json`` of each source folder that has one
    leaderboards: list[dict[str, Any]] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a torn last line (crash mid-write) is skipped."""
    out = []
    with path.open(encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: skipping a torn last line", path)
                continue
            raise DataError(f"{path} line {i + 1} is not valid JSON", "fix or delete that line") from None
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _find_metrics_files(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.rglob("metrics.jsonl")):
        rel = path.relative_to(root)
        if len(rel.parts) - 1 <= _MAX_DEPTH and not any(p.startswith(".") for p in rel.parts):
            found.append(path)
    return found


def _histories_for(root: Path, run_dir: Any) -> list[list[dict[str, Any]]]:
    if run_dir is None:
        return []
    dirs = run_dir if isinstance(run_dir, list) else [run_dir]
    out = []
    for d in dirs:
        base = (root / str(d)).resolve()
        files = [base / "metrics.jsonl"] if (base / "metrics.jsonl").exists() else _find_metrics_files(base) if base.is_dir() else []
        if not files:
            log.warning("%s: run_dir %s has no metrics.jsonl; no curves for it", root, d)
        out.extend(read_jsonl(f) for f in files)
    return out


def _as_float_dict(d: Any) -> dict[str, float]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[str(k)] = float(v)
    return out


def _breakdowns(model: dict[str, Any], classes: list[str] | None = None) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    raw = model.get("breakdowns")
    if isinstance(raw, dict):
        for name, table in raw.items():
            vals = _as_float_dict(table)
            if vals:
                out[str(name)] = vals
    for key in ("per_class", "per_domain"):
        vals = _as_float_dict(model.get(key))
        if vals:
            out.setdefault(key.replace("_", " "), vals)
    pca = model.get("per_class_accuracy")
    if pca is None and isinstance(model.get("metrics"), dict):
        pca = model["metrics"].get("per_class_accuracy")
    if isinstance(pca, list) and pca:
        names = model.get("class_names") or classes or [str(i) for i in range(len(pca))]
        out.setdefault("per class accuracy", {
            str(n): float(v) for n, v in zip(names, pca)
            if isinstance(v, int | float) and math.isfinite(float(v))
        })
    return out


def load_run(run_dir: str | Path) -> RunData:
    """Load one run folder: ``results.json`` + curves, or curves only."""
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"run folder {root} does not exist", "pass the output folder of `kdforge run` or `kdforge eval`")
    res_path = root / "results.json"
    if not res_path.exists():
        files = _find_metrics_files(root)
        if not files:
            raise DataError(
                f"{root} has neither results.json nor any metrics.jsonl",
                "point kdforge report at a run folder (see docs/run-format.md)",
            )
        models = []
        for f in files:
            rel = f.parent.relative_to(root)
            name = root.name if str(rel) == "." else str(rel)
            models.append(ModelEntry(name=name, role="student", histories=[read_jsonl(f)], source=root.name))
        return RunData(title=root.name, primary_metric=None, higher_is_better=True, models=models,
                       sources=[str(root)])
    try:
        res = json.loads(res_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{res_path} is not valid JSON ({exc.msg})", "re-run the job or fix the file") from exc
    if not isinstance(res, dict) or not isinstance(res.get("models"), list):
        raise DataError(f"{res_path} has no 'models' list", "write results.json as described in docs/run-format.md")
    classes = [str(c) for c in res["classes"]] if isinstance(res.get("classes"), list) else None
    models = []
    for i, m in enumerate(res["models"]):
        if not isinstance(m, dict) or "name" not in m:
            raise DataError(f"{res_path}: model #{i} has no 'name'", "give every model a name and a role")
        role = str(m.get("role", "student"))
        if role not in ROLES:
            log.warning("%s: model %s has unknown role %r; shown as a student", res_path, m["name"], role)
            role = "student"
        metrics = _as_float_dict(m.get("metrics"))
        for key in ("params", "size_mb", "latency_ms"):
            if key not in metrics and isinstance(m.get(key), int | float):
                metrics[key] = float(m[key])
        models.append(ModelEntry(
            name=str(m["name"]), role=role, metrics=metrics,
            per_seed=[s for s in m.get("per_seed", []) or [] if isinstance(s, dict)],
            reliability=m.get("reliability") if isinstance(m.get("reliability"), dict) else None,
            breakdowns=_breakdowns(m, classes), histories=_histories_for(root, m.get("run_dir")),
            source=root.name,
        ))
    if not any(mdl.histories for mdl in models) and (root / "metrics.jsonl").exists():
        # a single-model run keeps its curves at the top level
        target = next((mdl for mdl in models if mdl.role == "student"), models[0] if models else None)
        if target is not None:
            target.histories = [read_jsonl(root / "metrics.jsonl")]
    primary = res.get("primary_metric")
    return RunData(
        title=str(res.get("title") or res.get("recipe") or root.name),
        primary_metric=str(primary) if primary else None,
        higher_is_better=bool(res.get("higher_is_better", True)),
        models=models, recipe=res.get("recipe"), created=res.get("created"), sources=[str(root)],
        leaderboards=_leaderboard(root),
    )


def _leaderboard(root: Path) -> list[dict[str, Any]]:
    """``[leaderboard.json]`` of a ``compare`` run folder, ``[]`` without one (or an unreadable one)."""
    path = root / "leaderboard.json"
    if not path.exists():
        return []
    try:
        lb = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; the report leaves the leaderboard out", path)
        return []
    return [lb] if isinstance(lb, dict) and isinstance(lb.get("rows"), list) else []


def merge_runs(runs: list[RunData]) -> list[RunData]:
    """Group runs by primary metric: runs measured the same way become one comparison.

    Duplicate model names across folders get the folder name appended; a teacher that appears
    in several folders with identical metrics is kept once.
    """
    groups: dict[Any, RunData] = {}
    for run in runs:
        key = (run.primary_metric, run.higher_is_better) if run.primary_metric else ("__curves__", id(run))
        if key not in groups:
            groups[key] = RunData(run.title, run.primary_metric, run.higher_is_better, [], run.recipe,
                                  run.created, [])
        g = groups[key]
        if g.sources:
            g.title = f"{g.title} + {run.title}" if run.title not in g.title else g.title
        g.sources.extend(run.sources)
        g.leaderboards.extend(run.leaderboards)
        for m in run.models:
            clash = next((x for x in g.models if x.name == m.name), None)
            if clash is not None and clash.role == m.role == "teacher" and clash.metrics == m.metrics:
                continue
            if clash is not None:
                m.name = f"{m.name} ({m.source})"
            g.models.append(m)
    out = list(groups.values())
    for g in out:
        g.models.sort(key=lambda m: ROLES.index(m.role))
    return out
