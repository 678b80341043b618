"""Report figures (matplotlib, Agg backend): trade-off, training curves, reliability, breakdowns.

Each builder returns a ``Figure`` or ``None`` when the run has nothing to draw; :func:`encode`
turns a figure into inline SVG (text kept as text, so it is crisp and searchable) and PNG (for
the Markdown report).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from kdforge.eval.report import fmt  # noqa: E402
from kdforge.eval.report.runs import ModelEntry, RunData  # noqa: E402

ROLE_COLORS = {"teacher": "#334155", "baseline": "#d97706"}
STUDENT_COLORS = ["#2563eb", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#9333ea", "#ea580c"]
MAX_CURVE_PANELS = 12
MAX_RELIABILITY_PANELS = 6
MAX_BREAKDOWN_CATEGORIES = 30

_RC = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#94a3b8",
    "axes.labelcolor": "#334155",
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlecolor": "#0f172a",
    "axes.grid": True,
    "grid.color": "#e2e8f0",
    "grid.linewidth": 0.8,
    "xtick.color": "#475569",
    "ytick.color": "#475569",
    "legend.frameon": False,
    "svg.fonttype": "none",
    "svg.hashsalt": "kdforge",
}


def model_colors(models: list[ModelEntry]) -> dict[str, str]:
    colors, i = {}, 0
    for m in models:
        if m.role in ROLE_COLORS:
            colors[m.name] = ROLE_COLORS[m.role]
        else:
            colors[m.name] = STUDENT_COLORS[i % len(STUDENT_COLORS)]
            i += 1
    return colors


def encode(fig: Figure) -> tuple[str, bytes]:
    """``(svg_text, png_bytes)`` of a figure; the figure is closed afterwards."""
    with plt.rc_context(_RC):
        s = io.StringIO()
        fig.savefig(s, format="svg", bbox_inches="tight")
        b = io.BytesIO()
        fig.savefig(b, format="png", dpi=144, bbox_inches="tight")
    plt.close(fig)
    svg = s.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog/doctype for inline use
    return svg, b.getvalue()


def _figure(nrows: int, ncols: int, w: float, h: float) -> tuple[Figure, Any]:
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    return fig, axes


def _apply_rc(fig: Figure) -> None:
    fig.set_facecolor("white")


def tradeoff_figure(run: RunData) -> tuple[Figure, str] | None:
    """Primary metric vs latency (else size, else params), one point per model, log x axis."""
    if not run.primary_metric:
        return None
    for x_key in ("latency_ms", "size_mb", "params"):
        pts = [m for m in run.models if m.value(x_key) and m.value(run.primary_metric) is not None]
        if len(pts) >= 2:
            break
    else:
        return None
    y_key = run.primary_metric
    colors = model_colors(run.models)
    with plt.rc_context(_RC):
        fig, axes = _figure(1, 1, 6.4, 3.8)
        ax = axes[0][0]
        scale = 100.0 if fmt.is_fraction(y_key) and "ece" not in y_key and all(
            0 <= (m.value(y_key) or 0) <= 1 for m in pts) else 1.0
        ys_all = [m.value(y_key) * scale for m in pts]
        min_gap = 0.06 * ((max(ys_all) - min(ys_all)) or 1.0)
        placed: list[tuple[float, float]] = []  # (log10 x, label y) of labels already drawn
        for m in sorted(pts, key=lambda m: m.value(y_key)):
            x, y = m.value(x_key), m.value(y_key) * scale
            std = m.std(y_key)
            marker = {"teacher": "*", "baseline": "s", "reference": "D"}.get(m.role, "o")
            size = 12 if m.role == "teacher" else 8
            ax.errorbar([x], [y], yerr=[std * scale] if std else None, fmt=marker, ms=size,
                        color=colors[m.name], ecolor=colors[m.name], elinewidth=1, capsize=3, zorder=3)
            label_y = y
            for lx, ly in placed:  # labels of points at about the same x must not overlap
                if abs(lx - math.log10(x)) < 0.3 and label_y - ly < min_gap:
                    label_y = ly + min_gap
            placed.append((math.log10(x), label_y))
            ax.annotate(m.name, (x, y), xytext=(x * 1.12, label_y), fontsize=8.5, va="center",
                        color=colors[m.name],
                        arrowprops={"arrowstyle": "-", "color": colors[m.name], "lw": 0.6}
                        if label_y != y else None)
        ax.set_xscale("log")
        xs = [m.value(x_key) for m in pts]
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 1.8, hi * 2.6)
        ax.set_xlabel({"latency_ms": "latency (ms, log scale)", "size_mb": "size on disk (MB, log scale)",
                       "params": "parameters (log scale)"}[x_key])
        ax.set_ylabel(fmt.label(y_key) + (" (%)" if scale == 100 else ""))
        better = "↓ better" if fmt.lower_is_better(y_key) else "↑ better"
        ax.set_title(f"{better}   ← cheaper", loc="left", fontsize=8.5, color="#64748b",
                     fontweight="normal")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt.fmt_tick(v)))
        narrow = hi / lo < 30  # less than ~1.5 decades: label the 2s and 5s too

        def minor(v: float, _: object) -> str:
            lead = round(v / 10 ** math.floor(math.log10(v)))
            return fmt.fmt_tick(v) if narrow and lead in (2, 5) else ""

        ax.xaxis.set_minor_formatter(FuncFormatter(minor))
        ys = [m.value(y_key) for m in pts]
        if min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
            _plain_log_labels(ax.yaxis)
        fig.tight_layout()
    return fig, x_key


def _plain_log_labels(axis: Any) -> None:
    """``200``, ``1000`` instead of ``2×10^2``, ``10^3`` on a log axis."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt.fmt_tick(v)))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _mean_curve(histories: list[list[dict[str, Any]]], key: str, split: str | None):
    by_step: dict[int, list[float]] = defaultdict(list)
    for hist in histories:
        for r in hist:
            if split is not None and r.get("split", split) != split:
                continue
            v = r.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                by_step[int(r.get("step", 0))].append(float(v))
    steps = sorted(by_step)
    n = max((len(v) for v in by_step.values()), default=0)
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    lo = [min(by_step[s]) for s in steps]
    hi = [max(by_step[s]) for s in steps]
    return steps, mean, lo, hi, n


def _ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def curve_keys(run: RunData) -> list[tuple[str, str]]:
    """``(key, split)`` pairs to plot: train loss terms first, then eval metrics."""
    train, evals = set(), set()
    for m in run.models:
        for hist in m.histories:
            for r in hist:
                split = r.get("split", "train")
                for k, v in r.items():
                    if not isinstance(v, int | float) or isinstance(v, bool):
                        continue
                    if split == "train" and (k == "loss" or k.startswith("loss/")):
                        train.add(k)
                    elif split == "eval" and k.startswith("eval/") and not k.startswith("eval/teacher_hacking"):
                        evals.add(k)
    primary = f"eval/{run.primary_metric}" if run.primary_metric else None
    ev = sorted(evals, key=lambda k: (k != primary, k))
    tr = sorted(train, key=lambda k: (k != "loss", k))
    return ([(k, "train") for k in tr] + [(k, "eval") for k in ev])[:MAX_CURVE_PANELS]


def curves_figure(run: RunData, hacking_onsets: dict[str, int] | None = None) -> Figure | None:
    """Small multiples: one panel per loss term / eval metric, one line per model (seed mean,
    min-max band across seeds); a dashed red line marks a teacher-hacking onset."""
    keys = curve_keys(run)
    models = [m for m in run.models if m.histories]
    if not keys or not models:
        return None
    colors = model_colors(run.models)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    with plt.rc_context(_RC):
        fig, axes = _figure(nrows, ncols, 3.7, 2.6)
        for i, (key, split) in enumerate(keys):
            ax = axes[i // ncols][i % ncols]
            for m in models:
                steps, mean, lo, hi, n = _mean_curve(m.histories, key, split)
                if not steps:
                    continue
                c = colors[m.name]
                if split == "train" and len(steps) > 40:
                    ax.plot(steps, mean, color=c, alpha=0.18, lw=0.8)
                    ax.plot(steps, _ema(mean, 2 / (1 + len(steps) / 20)), color=c, lw=1.6, label=m.name)
                else:
                    ax.plot(steps, mean, color=c, lw=1.6, marker="o" if len(steps) < 15 else None,
                            ms=3, label=m.name)
                if n > 1:
                    ax.fill_between(steps, lo, hi, color=c, alpha=0.15, lw=0)
                if hacking_onsets and m.name in hacking_onsets and split == "eval":
                    ax.axvline(hacking_onsets[m.name], color="#dc2626", ls="--", lw=1)
            title = key if split == "eval" else f"train {key}"
            ax.set_title(title, loc="left", fontsize=9.5)
            ax.set_xlabel("step", fontsize=8)
            if fmt.lower_is_better(key) and key.split("/")[-1] in ("perplexity",):
                ax.set_yscale("log")
                _plain_log_labels(ax.yaxis)
        for j in range(len(keys), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        handles, labels = [], []
        for ax_row in axes:
            for ax in ax_row:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in labels:
                        handles.append(h)
                        labels.append(lab)
        ncol = min(len(labels), 4)
        legend_in = 0.22 * math.ceil(len(labels) / ncol) + 0.1  # legend height in inches
        fig_h = fig.get_size_inches()[1]
        fig.tight_layout(rect=(0, 0, 1, 1 - legend_in / fig_h))
        fig.legend(handles, labels, loc="upper center", ncol=ncol, bbox_to_anchor=(0.5, 1.0),
                   fontsize=8.5)
    return fig


def reliability_figure(run: RunData) -> Figure | None:
    """Reliability diagram per model: accuracy per confidence bin vs the diagonal; bar width
    proportional to nothing, bar opacity to the bin's share of samples."""
    models = [m for m in run.models if m.reliability and m.reliability.get("bin_accuracy")][:MAX_RELIABILITY_PANELS]
    if not models:
        return None
    colors = model_colors(run.models)
    ncols = min(3, len(models))
    nrows = math.ceil(len(models) / ncols)
    with plt.rc_context(_RC):
        fig, axes = _figure(nrows, ncols, 3.0, 3.0)
        for i, m in enumerate(models):
            ax = axes[i // ncols][i % ncols]
            rel = m.reliability or {}
            acc = rel.get("bin_accuracy") or []
            conf = rel.get("bin_confidence") or []
            cnt = rel.get("bin_count") or [1] * len(acc)
            nb = len(acc)
            total = max(sum(c or 0 for c in cnt), 1)
            width = 1.0 / nb
            for b in range(nb):
                if acc[b] is None or not cnt[b]:
                    continue
                share = (cnt[b] or 0) / total
                ax.bar(b * width, acc[b], width=width, align="edge", color=colors[m.name],
                       alpha=0.35 + 0.65 * min(1.0, share * nb / 2), edgecolor="white", lw=0.5)
                if b < len(conf) and conf[b] is not None:
                    ax.plot([b * width, (b + 1) * width], [conf[b], conf[b]], color="#0f172a", lw=0.8)
            ax.plot([0, 1], [0, 1], ls="--", color="#94a3b8", lw=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
            ece = m.value("ece")
            ax.set_title(m.name + (f"\nECE {ece:.3f}" if ece is not None else ""), loc="left", fontsize=9)
            ax.set_xlabel("confidence", fontsize=8)
            if i % ncols == 0:
                ax.set_ylabel("accuracy", fontsize=8)
        for j in range(len(models), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        fig.tight_layout()
    return fig


def breakdown_figure(run: RunData, name: str) -> Figure | None:
    """Grouped bars: one group per category, one bar per model."""
    models = [m for m in run.models if name in m.breakdowns]
    cats: list[str] = []
    for m in models:
        cats += [c for c in m.breakdowns[name] if c not in cats]
    if not models or not cats or len(cats) > MAX_BREAKDOWN_CATEGORIES:
        return None
    colors = model_colors(run.models)
    all_vals = [v for m in models for v in m.breakdowns[name].values()]
    scale = 100.0 if all(0 <= v <= 1 for v in all_vals) else 1.0
    with plt.rc_context(_RC):
        fig, axes = _figure(1, 1, max(5.0, 0.55 * len(cats) * max(1, len(models)) ** 0.5 + 2), 3.0)
        ax = axes[0][0]
        w = 0.8 / len(models)
        for j, m in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * w for i in range(len(cats))]
            ys = [m.breakdowns[name].get(c, math.nan) * scale for c in cats]
            ax.bar(xs, ys, width=w, color=colors[m.name], label=m.name)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30 if len(cats) > 6 else 0, ha="right" if len(cats) > 6 else "center")
        if scale == 100:
            lo = min(all_vals) * 100
            ax.set_ylim(max(0, lo - 10), 100)
        ax.legend(fontsize=8, ncol=min(4, len(models)), loc="lower left", bbox_to_anchor=(0.0, 1.01),
                  borderaxespad=0.0)
        fig.tight_layout()
    return fig


def run_images(run: RunData) -> list[tuple[str, str, bytes]]:
    """PNG images a run saved beside its students (``students/<method>/seed-<k>/*_grid.png``, e.g.
    HARD's augmentation grids), the lowest seed per method: ``(method folder, file name, bytes)``."""
    out: list[tuple[str, str, bytes]] = []
    for source in run.sources:
        students = Path(source) / "students"
        if not students.is_dir():
            continue
        for method in sorted(p for p in students.iterdir() if p.is_dir()):
            seeds = sorted((p for p in method.glob("seed-*") if p.is_dir()),
                           key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else 0)
            for seed in seeds[:1]:
                out += [(method.name, img.name, img.read_bytes()) for img in sorted(seed.glob("*_grid.png"))]
    return out


def png_as_svg(png: bytes) -> str:
    """An inline ``<svg>`` that shows ``png`` at its pixel size (for the HTML's SVG-only figures)."""
    import base64
    import struct

    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    data = base64.b64encode(png).decode("ascii")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><image width="{width}" height="{height}" '
            f'href="data:image/png;base64,{data}"/></svg>')
