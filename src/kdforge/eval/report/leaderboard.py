"""The ``compare`` recipe's paired leaderboard (``leaderboard.json``) as a report table.

Columns: rank, method, teacher source, the metric's mean ± std over seeds, the paired difference to
the labels-only baseline and to plain KD (mean ± std, wins/losses/ties, sign-test p), ECE, CPU
seconds per step and peak memory. Reads only the JSON (``docs/regimes.md`` describes it), so the
report does not depend on the recipe's code.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

__all__ = ["leaderboard_html", "leaderboard_markdown", "leaderboard_table"]

_PERCENT = {"accuracy", "agreement", "ece"}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _pair(d: Any, percent: bool) -> str:
    if not isinstance(d, Mapping) or _num(d.get("mean")) is None:
        return "–"
    k = 100.0 if percent else 1.0
    std = _num(d.get("std")) or 0.0
    p = _num(d.get("sign_p"))
    wlt = f"{d.get('wins', 0)}/{d.get('losses', 0)}/{d.get('ties', 0)}"
    return f"{d['mean'] * k:+.2f} ± {std * k:.2f} ({wlt}{f', p={p:.2f}' if p is not None else ''})"


def leaderboard_table(lb: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)`` of formatted cells for a ``leaderboard.json`` mapping (rows in its order)."""
    metric = str(lb.get("metric", "metric"))
    percent = metric in _PERCENT
    base, ref = lb.get("baseline"), lb.get("reference")
    seeds = lb.get("seeds") or []
    headers = ["#", "method", "teacher", f"{metric}{' %' if percent else ''} ({len(seeds)} seeds)",
               f"Δ vs {base} (W/L/T, sign p)", f"Δ vs {ref} (W/L/T, sign p)", "ECE %", "CPU ms/step",
               "peak RSS MB"]
    rows = []
    for i, r in enumerate(lb.get("rows") or [], 1):
        if not isinstance(r, Mapping):
            continue
        k = 100.0 if percent else 1.0
        mean, std = _num(r.get("mean")), _num(r.get("std")) or 0.0
        ece, ece_std = _num(r.get("ece")), _num(r.get("ece_std")) or 0.0
        cost = r.get("cost") if isinstance(r.get("cost"), Mapping) else {}
        step, rss = _num(cost.get("cpu_s_per_step")), _num(cost.get("peak_rss_mb"))
        rows.append([
            str(i), str(r.get("method", "?")), str(r.get("teacher", "")),
            "–" if mean is None else f"{mean * k:.2f} ± {std * k:.2f}",
            "–" if r.get("method") == base else _pair(r.get("vs_baseline"), percent),
            "–" if r.get("method") == ref else _pair(r.get("vs_reference"), percent),
            "–" if ece is None else f"{ece * 100:.2f} ± {ece_std * 100:.2f}",
            "–" if step is None else f"{step * 1000:.1f}",
            "–" if rss is None else f"{rss:.0f}",
        ])
    return headers, rows


def leaderboard_html(lb: Mapping[str, Any]) -> str:
    """The leaderboard as a sortable HTML table with a one-line note."""
    headers, rows = leaderboard_table(lb)
    e = html.escape
    head = "".join(f'<th scope="col">{e(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f'<td data-v="{e(c)}">{e(c)}</td>' for c in row) + "</tr>" for row in rows)
    note = ("Paired over seeds: every method trains the same student init on the same batches per seed. "
            "Δ: mean ± std of the per-seed differences; W/L/T: seeds won/lost/tied; p: exact two-sided sign test.")
    return (f'<div class="table-wrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div><p class=\"note\">{e(note)}</p>")


def leaderboard_markdown(lb: Mapping[str, Any]) -> list[str]:
    """The leaderboard as Markdown table lines."""
    headers, rows = leaderboard_table(lb)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return [*lines, ""]
