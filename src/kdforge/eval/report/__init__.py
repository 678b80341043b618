"""``kdforge report``: one self-contained HTML page (and a Markdown twin) from run folders.

Reads run folders in the layout of ``docs/run-format.md`` and renders, per comparison:

* a headline (best student vs the best baseline and the teacher on the primary metric, with
  compression and speed-up) and headline cards;
* a sortable summary table (mean ± std where seeds exist; best per column marked);
* the quality/cost trade-off plot (primary metric vs latency, else size, else parameters);
* training curves per loss term and eval metric (seed mean with a min-max band);
* reliability diagrams; per-class / per-domain breakdowns when present;
* a warning when the teacher-hacking monitor fires (logged flags, or the detector run on the
  eval curves).

The HTML inlines its CSS and its figures (SVG data URIs) and loads nothing from the network.

Example:
    >>> from kdforge.eval.report import build_report            # doctest: +SKIP
    >>> paths = build_report(["runs/fmnist"], "runs/fmnist/report")  # doctest: +SKIP
    >>> paths.html                                               # doctest: +SKIP
    PosixPath('runs/fmnist/report/report.html')
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdforge.errors import DataError
from kdforge.io import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["ReportPaths", "build_report", "load_run", "merge_runs"]


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    markdown: Path
    figures: list[Path]


def load_run(run_dir: str | Path):  # re-exported lazily to keep import light
    from kdforge.eval.report.runs import load_run as _load

    return _load(run_dir)


def merge_runs(runs):
    from kdforge.eval.report.runs import merge_runs as _merge

    return _merge(runs)


def _output_paths(run_dirs: Sequence[Path], out: str | Path | None) -> tuple[Path, Path, Path]:
    if out is None:
        base = run_dirs[0] / "report" if len(run_dirs) == 1 else Path("kdforge-report")
        return base / "report.html", base / "report.md", base / "figures"
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        return out, out.with_suffix(".md"), out.parent / f"{out.stem}_figures"
    return out / "report.html", out / "report.md", out / "figures"


def build_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, *,
                 title: str | None = None) -> ReportPaths:
    """Render ``report.html`` + ``report.md`` (+ PNG figures for the Markdown) from run folders.

    Args:
        run_dirs: one or more run folders. Folders that share a primary metric are merged into
            one comparison; others get their own section.
        out: output folder (default ``RUN_DIR/report`` for one run, ``./kdforge-report``
            otherwise) or a path ending in ``.html``.
        title: page title (default: the run titles).

    Raises:
        DataError: a folder is missing or holds neither ``results.json`` nor ``metrics.jsonl``.
    """
    from kdforge import __version__
    from kdforge.eval.report import figures as F
    from kdforge.eval.report.render import Figure, Section, render_html, render_markdown
    from kdforge.eval.report.runs import load_run as _load
    from kdforge.eval.report.runs import merge_runs as _merge
    from kdforge.eval.report.summary import hacking_onsets, headline

    if not run_dirs:
        raise DataError("no run folder given", "pass at least one RUN_DIR")
    dirs = [Path(d) for d in run_dirs]
    groups = _merge([_load(d) for d in dirs])
    html_path, md_path, fig_dir = _output_paths(dirs, out)
    sections: list[Section] = []
    for gi, run in enumerate(groups):
        onsets = hacking_onsets(run)
        sec = Section(run=run, headline=headline(run), onsets=onsets)
        tag = f"g{gi}-" if len(groups) > 1 else ""
        trade = F.tradeoff_figure(run)
        if trade is not None:
            fig, x_key = trade
            svg, png = F.encode(fig)
            x_word = {"latency_ms": "latency", "size_mb": "size on disk", "params": "parameter count"}[x_key]
            sec.figures.append(Figure(f"{tag}tradeoff", "Quality vs cost",
                                      f"{run.primary_metric} against {x_word}, one point per model "
                                      "(★ teacher, ■ baseline, ● students; bars: ± std over seeds).",
                                      svg, png, max_width=760))
        curves = F.curves_figure(run, onsets)
        if curves is not None:
            svg, png = F.encode(curves)
            sec.figures.append(Figure(f"{tag}curves", "Training curves",
                                      "Loss terms (train, smoothed when long) and evaluation metrics by "
                                      "optimizer step; shaded: min-max over seeds.", svg, png))
        n_rel = sum(1 for m in run.models if m.reliability)
        rel = F.reliability_figure(run)
        if rel is not None:
            svg, png = F.encode(rel)
            sec.figures.append(Figure(f"{tag}reliability", "Calibration (reliability diagrams)",
                                      "Accuracy per confidence bin (bars; darker = more samples), mean "
                                      "confidence per bin (black ticks) and perfect calibration (dashed).",
                                      svg, png, max_width=330 * min(3, n_rel)))
        names: list[str] = []
        for m in run.models:
            names += [n for n in m.breakdowns if n not in names]
        for bi, name in enumerate(names):
            bfig = F.breakdown_figure(run, name)
            if bfig is not None:
                svg, png = F.encode(bfig)
                sec.figures.append(Figure(f"breakdown-{tag}{bi}", name, f"{name} per model.", svg, png,
                                          max_width=860))
        for ii, (method, name, png) in enumerate(F.run_images(run)):  # e.g. HARD's augmentation grids
            sec.figures.append(Figure(f"{tag}image-{ii}", f"{method}: {name}",
                                      f"Saved by the run in students/{method}/ (first seed): originals above "
                                      "their augmentations.", F.png_as_svg(png), png, max_width=860))
        sections.append(sec)
    page_title = title or "kdforge report: " + " | ".join(g.title for g in groups)
    html = render_html(sections, title=page_title, version=__version__)
    fig_paths: dict[str, str] = {}
    written: list[Path] = []
    for sec in sections:
        for fig in sec.figures:
            p = fig_dir / f"{fig.slug}.png"
            write_bytes_atomic(p, fig.png)
            written.append(p)
            fig_paths[fig.slug] = p.relative_to(md_path.parent).as_posix() if p.is_relative_to(md_path.parent) else str(p)
    write_text_atomic(html_path, html)
    write_text_atomic(md_path, render_markdown(sections, title=page_title, figure_paths=fig_paths))
    for p in (html_path, md_path, *written):
        # atomic writes create 0600 temp files; a report is meant to be shared or served
        with contextlib.suppress(OSError):
            os.chmod(p, 0o644)
    log.info("report written to %s", html_path)
    return ReportPaths(html=html_path, markdown=md_path, figures=written)
