"""``kdforge losses``: list the registered losses from their specs (what each needs and can do).

Columns, read from each :class:`~kdforge.losses.spec.LossSpec`: the name; what it needs
(``teacher``, ``labels``); whether it takes a sparse top-k teacher, a sampled-tail cache
(``linear_in_teacher``) and has a closed-form chunk kernel; its own parameters with their
defaults; the paper. Then the feature losses with their descriptions.
"""

from __future__ import annotations

import argparse
from typing import Any

# parameters every divergence takes: listed once in the caption instead of on every row
_SHARED = ("temperature", "sparse_policy", "check_finite")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="list available distillation losses (needs, abilities, parameters)")
    p.set_defaults(func=handle)


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _params(spec: Any) -> str:
    shown = [f"{k}={spec.param_defaults.get(k, '<required>')!r}" for k in spec.param_names if k not in _SHARED]
    if spec.default_temperature != 1.0:
        shown.append(f"temperature={spec.default_temperature!r}")
    return ", ".join(shown) or "-"


def loss_rows() -> list[tuple[str, ...]]:
    """One row per registered loss: name, needs, sparse, sampled tail, chunk kernel, params, paper, description."""
    from kdforge.losses import LOSSES

    rows = []
    for name in LOSSES.names():
        spec = LOSSES.get(name)
        needs = ", ".join(n for n, on in (("teacher", spec.needs_teacher), ("labels", spec.needs_labels)) if on)
        uses = (_yes(spec.sparse_ok), _yes(spec.linear_in_teacher)) if spec.needs_teacher else ("n/a", "n/a")
        rows.append((name, needs or "-", *uses, _yes(spec.kernel is not None), _params(spec), spec.paper or "-",
                     spec.description))
    return rows


def handle(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kdforge.features import FEATURE_LOSSES

    console = Console()
    table = Table(title="kdforge losses (on logits)",
                  caption="every loss also takes temperature (default 1 unless listed) and check_finite; "
                          "the divergences take sparse_policy (tail_bucket, renormalize, student_full)")
    table.add_column("name", style="bold cyan", no_wrap=True)
    for column in ("needs", "sparse top-k", "sampled tail", "chunk kernel", "params", "paper", "description"):
        table.add_column(column)
    for row in loss_rows():
        table.add_row(*row)
    console.print(table)
    features = Table(title="feature losses (on hidden states / attention; docs/features.md)")
    features.add_column("name", style="bold cyan", no_wrap=True)
    features.add_column("description")
    for entry in FEATURE_LOSSES.entries():
        features.add_row(entry.name, entry.description)
    console.print(features)
    return 0
