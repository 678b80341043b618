"""HTML and Markdown rendering of a report (self-contained: inline CSS, figures as data URIs)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
from dataclasses import dataclass, field

from kdforge.eval.report import fmt
from kdforge.eval.report.leaderboard import leaderboard_html, leaderboard_markdown
from kdforge.eval.report.runs import ModelEntry, RunData
from kdforge.eval.report.summary import Headline


@dataclass
class Figure:
    """One rendered figure of a section."""

    slug: str
    title: str
    caption: str
    svg: str
    png: bytes
    max_width: int | None = None  # CSS pixels; keeps small plots from being blown up


@dataclass
class Section:
    """Everything drawn for one comparison (one :class:`RunData`)."""

    run: RunData
    headline: Headline | None
    figures: list[Figure] = field(default_factory=list)
    onsets: dict[str, int] = field(default_factory=dict)


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def table_columns(run: RunData) -> tuple[list[str], list[str]]:
    keys: set[str] = set()
    for m in run.models:
        keys |= set(m.metrics)
    quality = fmt.ordered_metric_keys(keys, run.primary_metric)
    cost = [k for k in fmt.COST_KEYS if k in keys]
    return quality, cost


def _best_per_column(run: RunData, cols: list[str]) -> dict[str, set[str]]:
    """Best model(s) per column among those the run trained (teacher and references are yardsticks)."""
    best: dict[str, set[str]] = {}
    contenders = [m for m in run.models if m.role in ("baseline", "student")] or run.models
    for k in cols:
        vals = [(m.value(k), m.name) for m in contenders if m.value(k) is not None]
        if len(vals) < 2 or k in ("params", "size_mb"):
            continue
        top = min(v for v, _ in vals) if fmt.lower_is_better(k) else max(v for v, _ in vals)
        if all(v == top for v, _ in vals):
            continue  # a tie everywhere marks nothing
        best[k] = {n for v, n in vals if v == top}
    return best


CSS = """
:root{--ink:#0f172a;--muted:#64748b;--line:#e2e8f0;--bg:#f8fafc;--card:#fff;--accent:#2563eb;
--good:#047857;--warn:#b45309;--bad:#b91c1c}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.55 system-ui,-apple-system,"Segoe UI",
Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 20px 56px}
.top{display:flex;justify-content:space-between;align-items:baseline;gap:12px;flex-wrap:wrap;
color:var(--muted);font-size:13px;margin-bottom:18px}
.brand{font-weight:700;letter-spacing:.02em;color:var(--ink)}
.brand span{color:var(--accent)}
.hero{background:linear-gradient(135deg,#eff6ff 0%,#fff 60%);border:1px solid var(--line);
border-radius:16px;padding:26px 28px;margin-bottom:22px}
.hero .eyebrow{text-transform:uppercase;font-size:12px;letter-spacing:.08em;color:var(--muted);margin:0 0 6px}
.hero h1{font-size:clamp(22px,3.2vw,32px);line-height:1.25;margin:0 0 8px;font-weight:700}
.hero p.verdict{margin:6px 0 0;color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;margin-top:18px}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:12px 14px}
.card .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.card .v{font-size:24px;font-weight:700;font-variant-numeric:tabular-nums;margin:2px 0}
.card .n{font-size:12.5px;color:var(--muted)}
section.block{background:var(--card);border:1px solid var(--line);border-radius:14px;
padding:20px 22px;margin:18px 0}
h2{font-size:19px;margin:0 0 4px}
h3{font-size:15px;margin:18px 0 6px}
p.lead{margin:0 0 14px;color:var(--muted);font-size:14px}
.table-wrap{overflow-x:auto;-webkit-overflow-scrolling:touch;border:1px solid var(--line);border-radius:10px}
table{border-collapse:collapse;width:100%;font-size:14px;font-variant-numeric:tabular-nums}
th,td{padding:9px 12px;border-bottom:1px solid var(--line);white-space:nowrap;text-align:right}
th{background:#f1f5f9;font-weight:600;color:#334155;font-size:12.5px;cursor:pointer;user-select:none;
position:sticky;top:0}
th.dir{font-weight:400;color:var(--muted)}
tr:last-child td{border-bottom:none}
td:first-child,th:first-child{text-align:left;position:sticky;left:0;background:inherit}
thead th:first-child{background:#f1f5f9;z-index:1}
tbody tr{background:#fff}
tbody tr:hover{background:#f8fafc}
td.best{font-weight:700;color:var(--good)}
.role{display:inline-block;font-size:11px;font-weight:600;border-radius:999px;padding:1px 8px;
margin-left:8px;text-transform:uppercase;letter-spacing:.04em;vertical-align:1px}
.role.teacher{background:#e2e8f0;color:#334155}
.role.baseline{background:#fef3c7;color:#92400e}
.role.student{background:#dbeafe;color:#1e40af}
.role.reference{background:#f1f5f9;color:#475569}
tr.is-best td:first-child{box-shadow:inset 3px 0 0 var(--accent)}
.note{font-size:12.5px;color:var(--muted);margin:8px 2px 0}
figure{margin:0}
figure img{display:block;width:100%;height:auto;max-width:100%;margin:0 auto}
figcaption{font-size:13px;color:var(--muted);margin-top:6px}
.alert{border-radius:12px;padding:14px 18px;margin:18px 0;border:1px solid #fecaca;background:#fef2f2;color:#7f1d1d}
.alert strong{color:var(--bad)}
.sources{font-size:12.5px;color:var(--muted);word-break:break-all}
footer{color:var(--muted);font-size:12.5px;margin-top:28px;text-align:center}
@media (max-width:640px){main{padding:16px 10px 40px}.hero{padding:18px}section.block{padding:14px}
th,td{padding:7px 8px;font-size:13px}.card .v{font-size:20px}
.cards{grid-template-columns:repeat(2,minmax(0,1fr));gap:8px}}
@media print{body{background:#fff}section.block,.hero{break-inside:avoid;border-color:#ccc}}
"""

# Click a column header to sort by it (numbers by their data-v value); no console output.
JS = """
(function(){
  document.querySelectorAll('table.sortable').forEach(function(t){
    var heads=t.tHead?t.tHead.rows[0].cells:[];
    Array.prototype.forEach.call(heads,function(th,i){
      th.addEventListener('click',function(){
        var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
        var asc=th.getAttribute('aria-sort')!=='ascending';
        Array.prototype.forEach.call(heads,function(h){h.removeAttribute('aria-sort');});
        th.setAttribute('aria-sort',asc?'ascending':'descending');
        rows.sort(function(a,b){
          var x=a.cells[i].getAttribute('data-v'),y=b.cells[i].getAttribute('data-v');
          var nx=parseFloat(x),ny=parseFloat(y);
          var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(a.cells[i].textContent).localeCompare(b.cells[i].textContent);
          return asc?c:-c;});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
  var root=document.documentElement;
  root.setAttribute('data-report-ready','1');
  window.addEventListener('load',function(){
    var imgs=document.images,ok=0;
    for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){ok++;}}
    root.setAttribute('data-images-loaded',ok+'/'+imgs.length);
    root.setAttribute('data-page-overflow',root.scrollWidth>root.clientWidth+1?'1':'0');
  });
})();
"""


def _summary_table_html(section: Section) -> str:
    run = section.run
    quality, cost = table_columns(run)
    cols = quality + cost
    best_by = _best_per_column(run, quality + [c for c in cost if c == "latency_ms"])
    best_name = section.headline.best.name if section.headline else None
    head = "".join(
        f'<th scope="col" title="{"lower" if fmt.lower_is_better(k) else "higher"} is better">'
        f'{_e(fmt.label(k))} <span class="dir">{"↓" if fmt.lower_is_better(k) else "↑"}</span></th>'
        for k in cols
    )
    rows = []
    for m in run.models:
        cells = [f'<td data-v="{_e(m.name)}">{_e(m.name)}<span class="role {m.role}">{m.role}</span></td>']
        for k in cols:
            v = m.value(k)
            cls = ' class="best"' if m.name in best_by.get(k, ()) else ""
            cells.append(f'<td{cls} data-v="{"" if v is None else repr(v)}">{_e(fmt.fmt_value(k, v, std=m.std(k)))}</td>')
        tr_cls = ' class="is-best"' if m.name == best_name else ""
        rows.append(f"<tr{tr_cls}>{''.join(cells)}</tr>")
    seeds = max((m.n_seeds for m in run.models), default=1)
    note = ("Green: best trained model in the column (teacher and references excluded). ↑/↓: higher/lower is better. "
            "Click a header to sort.")
    if seeds > 1:
        note = f"Mean ± std over up to {seeds} seeds. " + note
    return (
        '<div class="table-wrap"><table class="sortable"><thead><tr><th scope="col">Model</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        f'<p class="note">{_e(note)}</p>'
    )


def _breakdown_tables_html(run: RunData) -> str:
    names: list[str] = []
    for m in run.models:
        names += [n for n in m.breakdowns if n not in names]
    out = []
    for name in names:
        models = [m for m in run.models if name in m.breakdowns]
        cats: list[str] = []
        for m in models:
            cats += [c for c in m.breakdowns[name] if c not in cats]
        head = "".join(f"<th>{_e(m.name)}</th>" for m in models)
        contender = [m.role in ("baseline", "student") for m in models]
        body = []
        for c in cats:
            vals = [m.breakdowns[name].get(c) for m in models]
            finite = [v for v, ok in zip(vals, contender) if v is not None and ok]
            top = (min(finite) if fmt.lower_is_better(name) else max(finite)) if finite else None
            marks = [ok and v is not None and v == top and len(finite) > 1 for v, ok in zip(vals, contender)]
            cells = "".join(
                f'<td{" class=best" if mark else ""} '
                f'data-v="{"" if v is None else v}">{_e(fmt.fmt_value("accuracy" if v is not None and 0 <= v <= 1 else name, v))}</td>'
                for v, mark in zip(vals, marks)
            )
            body.append(f'<tr><td data-v="{_e(c)}">{_e(c)}</td>{cells}</tr>')
        out.append(
            f"<h3>{_e(name)}</h3><div class=\"table-wrap\"><table class=\"sortable\"><thead><tr>"
            f"<th>category</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        )
    return "".join(out)


def _img(fig: Figure) -> str:
    data = base64.b64encode(fig.svg.encode("utf-8")).decode("ascii")
    style = f' style="max-width:{fig.max_width}px"' if fig.max_width else ""
    return (f'<figure><img alt="{_e(fig.title)}"{style} src="data:image/svg+xml;base64,{data}">'
            f"<figcaption>{_e(fig.caption)}</figcaption></figure>")


def _section_html(section: Section, many: bool) -> str:
    run = section.run
    h = section.headline
    parts = []
    eyebrow = _e(run.title) + (f" · primary metric: {_e(fmt.label(run.primary_metric))}" if run.primary_metric else "")
    if h is not None:
        cards = "".join(
            f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
            f'<div class="n">{_e(n)}</div></div>' for k, v, n in h.cards
        )
        verdict = f'<p class="verdict">{_e(h.verdict)}</p>' if h.verdict else ""
        parts.append(f'<section class="hero"><p class="eyebrow">{eyebrow}</p><h1>{_e(h.text)}</h1>'
                     f'{verdict}<div class="cards">{cards}</div></section>')
    else:
        parts.append(f'<section class="hero"><p class="eyebrow">{eyebrow}</p><h1>{_e(run.title)}</h1>'
                     f'<p class="verdict">{len(run.models)} run(s); no results.json, so curves only.</p></section>')
    for name, step in section.onsets.items():
        parts.append(
            f'<div class="alert" role="alert"><strong>Possible teacher hacking</strong> in '
            f"<b>{_e(name)}</b> from step {step}: the distance to the teacher kept falling while "
            "the held-out loss on real data rose (Tiapkin et al., 2025). Prefer the checkpoint "
            "before that step, or add on-policy / more diverse data.</div>"
        )
    if any(m.metrics for m in run.models):
        parts.append('<section class="block" id="summary"><h2>Summary</h2>'
                     '<p class="lead">Every model on the same evaluation data.</p>'
                     f"{_summary_table_html(section)}</section>")
    for lb in run.leaderboards:  # recipe compare: the paired leaderboard
        parts.append('<section class="block" id="leaderboard"><h2>Leaderboard (paired over seeds)</h2>'
                     f"{leaderboard_html(lb)}</section>")
    for fig in section.figures:
        if fig.slug.startswith("breakdown"):
            continue
        parts.append(f'<section class="block" id="{_e(fig.slug)}"><h2>{_e(fig.title)}</h2>{_img(fig)}</section>')
    bd = _breakdown_tables_html(run)
    if bd:
        figs = "".join(_img(f) for f in section.figures if f.slug.startswith("breakdown"))
        parts.append(f'<section class="block" id="breakdowns"><h2>Breakdowns</h2>{figs}{bd}</section>')
    parts.append(f'<p class="sources">Source: {_e(", ".join(run.sources))}</p>')
    inner = "".join(parts)
    return f'<div class="group">{inner}</div>' if many else inner


def render_html(sections: list[Section], *, title: str, version: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "<hr>".join(_section_html(s, len(sections) > 1) for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f'<div class="top"><span class="brand">kd<span>forge</span> report</span><span>{_e(now)}</span></div>'
        f"{body}<footer>Generated by kdforge {_e(version)} · self-contained file, no network needed</footer>"
        f"</main><script>{JS}</script></body></html>\n"
    )


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(sections: list[Section], *, title: str, figure_paths: dict[str, str]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        run = s.run
        if len(sections) > 1:
            out += [f"## {run.title}", ""]
        if s.headline:
            out += [f"**{s.headline.text}**", ""]
            if s.headline.verdict:
                out += [s.headline.verdict, ""]
        for name, step in s.onsets.items():
            out += [f"> **Possible teacher hacking** in {name} from step {step}: distance to the "
                    "teacher kept falling while held-out loss on real data rose.", ""]
        quality, cost = table_columns(run)
        cols = quality + cost
        if any(m.metrics for m in run.models):
            out += ["| model | role | " + " | ".join(fmt.label(k) for k in cols) + " |",
                    "|---|---|" + "---:|" * len(cols)]
            for m in run.models:
                vals = " | ".join(fmt.fmt_value(k, m.value(k), std=m.std(k)) for k in cols)
                out.append(f"| {_md_escape(m.name)} | {m.role} | {vals} |")
            out.append("")
        for lb in run.leaderboards:
            out += ["### Leaderboard (paired over seeds)", "", *leaderboard_markdown(lb)]
        for fig in s.figures:
            if fig.slug in figure_paths:
                out += [f"### {fig.title}", "", f"![{fig.title}]({figure_paths[fig.slug]})", "", f"_{fig.caption}_", ""]
        out += _md_breakdowns(run)
        out += [f"Source: {', '.join(run.sources)}", ""]
    return "\n".join(out)


def _md_breakdowns(run: RunData) -> list[str]:
    out: list[str] = []
    names: list[str] = []
    for m in run.models:
        names += [n for n in m.breakdowns if n not in names]
    for name in names:
        models: list[ModelEntry] = [m for m in run.models if name in m.breakdowns]
        cats: list[str] = []
        for m in models:
            cats += [c for c in m.breakdowns[name] if c not in cats]
        out += [f"### {name}", "", "| category | " + " | ".join(_md_escape(m.name) for m in models) + " |",
                "|---|" + "---:|" * len(models)]
        for c in cats:
            vals = []
            for m in models:
                v = m.breakdowns[name].get(c)
                vals.append(fmt.fmt_value("accuracy" if v is not None and 0 <= v <= 1 else name, v))
            out.append(f"| {_md_escape(c)} | " + " | ".join(vals) + " |")
        out.append("")
    return out
