"""``kdforge losses``: list the loss registry with one-line descriptions."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="list available distillation losses")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kdforge.losses import LOSSES

    table = Table(title="kdforge losses", show_lines=False)
    table.add_column("name", style="bold cyan")
    table.add_column("description")
    for entry in LOSSES.entries():
        table.add_row(entry.name, entry.description)
    Console().print(table)
    return 0
