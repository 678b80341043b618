"""``kdforge losses``: list the loss registry with one-line descriptions."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="list available distillation losses")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kdforge.features import FEATURE_LOSSES
    from kdforge.losses import LOSSES

    console = Console()
    for title, registry in (("kdforge losses (on logits)", LOSSES),
                            ("feature losses (on hidden states / attention; docs/features.md)", FEATURE_LOSSES)):
        table = Table(title=title, show_lines=False)
        table.add_column("name", style="bold cyan")
        table.add_column("description")
        for entry in registry.entries():
            table.add_row(entry.name, entry.description)
        console.print(table)
    return 0
