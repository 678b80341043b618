"""Recipe ``compare``: one leaderboard of distillation methods, paired over seeds.

``kdforge run configs/compare_fashion_mnist.yaml`` runs :mod:`kdforge.recipes.fashion_mnist`
(every method trains the *same* student initialisation on the *same* batch order for a given seed:
``torch.manual_seed(seed)`` before building the student, the sampler seeded by ``seed``; only the
objective and the teacher source differ) and then ranks the methods in one table:

* the metric's mean ± std over seeds;
* the **paired** difference to the labels-only baseline and to plain KD: per seed
  ``d_s = m_method(s) - m_ref(s)``, their mean ± std, wins/losses/ties and the exact two-sided
  **sign test** ``p = min(1, 2 * sum_{i <= min(W, L)} C(W + L, i) / 2^(W + L))`` (ties dropped).
  With ``n`` seeds the smallest attainable p is ``2 / 2^n`` (0.25 for 3 seeds, 0.0625 for 5): the
  sign test needs many seeds to call anything significant, which is the honest reading of few runs;
* the cost: process CPU seconds per optimizer step (a regime's teacher-side work included: a
  mutual peer's forward and backward, born-again's earlier generations) and the peak resident
  memory while the student trained (:class:`~kdforge.recipes.fashion_mnist.CostMeter`);
* ECE (15 bins).

Written next to the recipe's own files: ``leaderboard.json``, ``leaderboard.md`` and
``leaderboard.png`` (paired differences to the baseline, one dot per seed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.config import StrictModel
from kdforge.recipes import RECIPES, Recipe
from kdforge.recipes.fashion_mnist import FashionMnistConfig, FashionMnistKD

log = logging.getLogger(__name__)

__all__ = ["CompareConfig", "CompareSettings", "leaderboard", "leaderboard_markdown", "paired", "sign_test"]

RECIPE_NAME = "compare"


class CompareSettings(StrictModel):
    """What the leaderboard compares against."""

    baseline: str | None = Field(None, description="the labels-only method (null: the method with role baseline)")
    reference: str | None = Field(
        None, description="the plain-KD method (null: the first method of forward_kl + cross_entropy terms and no "
        "teacher block)")
    metric: Literal["accuracy", "agreement", "ece", "nll", "kl_to_teacher"] = Field(
        "accuracy", description="the ranked metric (per seed)")


class CompareConfig(FashionMnistConfig):
    """``fashion_mnist_kd``'s config plus the ``compare`` block."""

    compare: CompareSettings = Field(default_factory=CompareSettings)

    @model_validator(mode="after")
    def _known_names(self) -> CompareConfig:
        names = [m.name for m in self.methods]
        for key in ("baseline", "reference"):
            value = getattr(self.compare, key)
            if value is not None and value not in names:
                raise ValueError(f"compare.{key}: no method named {value!r} (methods: {', '.join(names)})")
        return self


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value for ``wins`` vs ``losses`` (ties already dropped); 1.0 for none."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)


def paired(values: Mapping[int, float], reference: Mapping[int, float], *, higher_is_better: bool = True
           ) -> dict[str, Any] | None:
    """Per-seed differences ``values[s] - reference[s]`` over the seeds both have, with the sign test."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    better = [d if higher_is_better else -d for d in diffs]
    wins, losses = sum(d > 0 for d in better), sum(d < 0 for d in better)
    return {"seeds": seeds, "diffs": diffs, "mean": statistics.fmean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "wins": wins, "losses": losses, "ties": len(diffs) - wins - losses, "sign_p": sign_test(wins, losses)}


def _is_plain_kd(model: Mapping[str, Any]) -> bool:
    return "teacher" not in model and "data" not in model and sorted(t["name"] for t in model.get("terms", [])) == ["cross_entropy",
                                                                                         "forward_kl"]


def leaderboard(results: Mapping[str, Any], settings: CompareSettings | None = None) -> dict[str, Any]:
    """The leaderboard of a ``fashion_mnist_kd`` results dict (see the module docstring)."""
    settings = settings or CompareSettings()
    metric = settings.metric
    higher = metric in ("accuracy", "agreement")
    students = [m for m in results["models"] if m["role"] != "teacher"]
    by_method = {m["method"]: m for m in students}
    baseline = settings.baseline or next((m["method"] for m in students if m["role"] == "baseline"), None)
    reference = settings.reference or next((m["method"] for m in students if _is_plain_kd(m)), None)

    def per_seed(m: Mapping[str, Any]) -> dict[int, float]:
        return {p["seed"]: p[metric] for p in m["per_seed"] if p.get(metric) is not None}

    rows = []
    for m in students:
        vals = per_seed(m)
        row: dict[str, Any] = {
            "method": m["method"], "role": m["role"], "teacher": (m.get("teacher") or {}).get("source", "cached"),
            "mean": statistics.fmean(vals.values()) if vals else math.nan,
            "std": statistics.stdev(vals.values()) if len(vals) > 1 else 0.0,
            "per_seed": vals, "ece": m["metrics"].get("ece"), "ece_std": m["metrics"].get("ece_std"),
            "cost": m.get("cost"),
        }
        for key, ref in (("vs_baseline", baseline), ("vs_reference", reference)):
            row[key] = (paired(vals, per_seed(by_method[ref]), higher_is_better=higher)
                        if ref is not None and ref != m["method"] else None)
        rows.append(row)
    rows.sort(key=lambda r: (-r["mean"] if higher else r["mean"]))
    return {"metric": metric, "higher_is_better": higher, "baseline": baseline, "reference": reference,
            "seeds": list(results.get("seeds", [])), "rows": rows}


def _pm(mean: float | None, std: float | None, scale: float, digits: int = 2, sign: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    return fmt.format(mean * scale) + ("" if std is None else f" ± {std * scale:.{digits}f}")


def _delta(p: Mapping[str, Any] | None, scale: float) -> str:
    if p is None:
        return "–"
    return f"{_pm(p['mean'], p['std'], scale, sign=True)} ({p['wins']}/{p['losses']}/{p['ties']}, p={p['sign_p']:.2f})"


def leaderboard_rows(board: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    scale = 100.0 if board["metric"] in ("accuracy", "agreement", "ece") else 1.0
    unit = " %" if scale == 100.0 else ""
    header = ["#", "method", "teacher", f"{board['metric']}{unit}", f"Δ vs {board['baseline'] or '–'} (W/L/T, sign p)",
              f"Δ vs {board['reference'] or '–'} (W/L/T, sign p)", "ECE %", "CPU s/step", "peak RSS MB"]
    rows = []
    for i, r in enumerate(board["rows"], 1):
        cost = r.get("cost") or {}
        rows.append([str(i), r["method"], r["teacher"], _pm(r["mean"], r["std"], scale),
                     _delta(r["vs_baseline"], scale), _delta(r["vs_reference"], scale),
                     _pm(r["ece"], r["ece_std"], 100.0),
                     f"{cost['cpu_s_per_step'] * 1000:.1f} ms" if cost else "–",
                     f"{cost['peak_rss_mb']:.0f}" if cost else "–"])
    return header, rows


def leaderboard_markdown(board: Mapping[str, Any]) -> str:
    header, rows = leaderboard_rows(board)
    seeds = board["seeds"]
    lines = [f"# Leaderboard ({board['metric']}, {len(seeds)} seeds: {', '.join(map(str, seeds))})", "",
             "Paired over seeds (same student init and batch order per seed). Δ: mean ± std of the per-seed "
             f"differences; W/L/T: seeds won/lost/tied; sign p: exact two-sided sign test (smallest possible with "
             f"{len(seeds)} seeds: {sign_test(len(seeds), 0):.3g}). CPU s/step: process CPU time per student "
             "optimizer step, teacher-side work of the regime included.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_leaderboard(board: Mapping[str, Any]) -> None:
    """The leaderboard on the console (rich): this is the recipe's CLI output."""
    from rich.console import Console
    from rich.table import Table

    header, rows = leaderboard_rows(board)
    table = Table(title=f"leaderboard: {board['metric']}, seeds {board['seeds']}")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (1, 2) else "right")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def plot_leaderboard(board: Mapping[str, Any], out: Path) -> list[Path]:
    """``leaderboard.png``: paired difference to the baseline per method (bar = mean, dots = seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdforge.io import atomic_write

    rows = [r for r in board["rows"] if r["vs_baseline"] is not None]
    scale = 100.0 if board["metric"] in ("accuracy", "agreement", "ece") else 1.0
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.45 * max(len(rows), 1)))
    for i, r in enumerate(rows):
        d = r["vs_baseline"]
        ax.barh(i, d["mean"] * scale, xerr=d["std"] * scale, color="tab:blue", alpha=0.6, capsize=4)
        ax.scatter([x * scale for x in d["diffs"]], [i] * len(d["diffs"]), color="black", s=12, zorder=3)
    ax.axvline(0.0, color="tab:gray", linestyle="--")
    ax.set_yticks(range(len(rows)), [r["method"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ {board['metric']} vs {board['baseline']}" + (" (points)" if scale == 100.0 else ""))
    ax.set_title(f"paired over {len(board['seeds'])} seeds")
    fig.tight_layout()
    path = out / "leaderboard.png"
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    return [path]


@RECIPES.register(RECIPE_NAME, "one paired leaderboard of methods over seeds (Fashion-MNIST students): Δ, sign test, cost")
class Compare(Recipe):
    """See the module docstring."""

    config_model = CompareConfig

    def run(self, config: CompareConfig, output_dir: Path) -> dict[str, Any]:
        from kdforge.io import write_text_atomic

        base = FashionMnistConfig.model_validate(
            {k: getattr(config, k) for k in FashionMnistConfig.model_fields})
        results = FashionMnistKD().run(base, output_dir)
        board = leaderboard(results, config.compare)
        out = Path(output_dir)
        if int(os.environ.get("RANK", "0")) == 0:  # rank 0 wrote the results: it writes the leaderboard too
            write_text_atomic(out / "leaderboard.json", json.dumps(board, indent=2, default=str) + "\n")
            write_text_atomic(out / "leaderboard.md", leaderboard_markdown(board))
            try:
                plot_leaderboard(board, out)
            except Exception as exc:  # noqa: BLE001 - a failing plot is a warning, never a failed run
                log.warning("leaderboard plot failed: %s", exc)
            print_leaderboard(board)
        return {**results, "leaderboard": board}

