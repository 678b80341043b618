"""``kdforge report RUN_DIR [RUN_DIR ...] [-o OUT]``: self-contained HTML + Markdown report."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render an HTML + Markdown report from run folders",
        description="Render a self-contained HTML page (inline CSS and figures, no network) and a "
        "Markdown twin from one or more run folders (docs/run-format.md): headline, summary "
        "table, quality/cost trade-off, training curves, calibration, breakdowns.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) to report on")
    p.add_argument("-o", "--out", default=None,
                   help="output folder or .html path (default: RUN_DIR/report, or ./kdforge-report "
                   "for several runs)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from kdforge.eval.report import build_report

    paths = build_report(args.run_dirs, args.out, title=args.title)
    print(f"report: {paths.html}")
    print(f"markdown: {paths.markdown}")
    return 0
