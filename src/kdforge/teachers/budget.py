"""Teacher-query budgets: :class:`QueryBudget` and :class:`BudgetedTeacher`.

A served (paid) or large teacher costs per query. A :class:`QueryBudget` holds the limits (queries
and/or tokens) and what was spent; :meth:`QueryBudget.charge` refuses, *before* anything is sent,
a charge that would exceed a limit (:class:`BudgetExceededError`), so a budget is never
overspent. Any code path that queries a teacher charges the same object: active distillation's
selection rounds (:mod:`kdforge.data.select.active`) and, through :class:`BudgetedTeacher`, every
``signal`` call of a :class:`~kdforge.teachers.sources.TeacherSource` (a
:class:`~kdforge.teachers.sources.ServedTeacher`, an online model): one query per row, tokens =
the batch's ``attention_mask`` sum (0 for inputs without one, e.g. images).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kdforge.errors import KdforgeError
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

__all__ = ["BudgetExceededError", "BudgetedTeacher", "QueryBudget"]

log = logging.getLogger(__name__)


class BudgetExceededError(KdforgeError, RuntimeError):
    """A teacher query would exceed its :class:`QueryBudget`."""


@dataclass
class QueryBudget:
    """Limits on teacher queries and tokens (None = unlimited) and what has been spent."""

    max_queries: int | None = None
    max_tokens: int | None = None
    queries: int = 0
    tokens: int = 0
    log_: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_queries", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise KdforgeError(f"QueryBudget.{name} must be >= 0 or None, got {value}",
                                   f"set {name} to the number you can afford (None = unlimited)")

    @property
    def remaining_queries(self) -> int | None:
        return None if self.max_queries is None else self.max_queries - self.queries

    @property
    def remaining_tokens(self) -> int | None:
        return None if self.max_tokens is None else self.max_tokens - self.tokens

    def can_afford(self, queries: int, tokens: int = 0) -> bool:
        rq, rt = self.remaining_queries, self.remaining_tokens
        return (rq is None or queries <= rq) and (rt is None or tokens <= rt)

    def affordable(self, n: int, tokens_per_query: int = 0) -> int:
        """How many of ``n`` queries of ``tokens_per_query`` tokens each still fit."""
        k = n
        if self.remaining_queries is not None:
            k = min(k, self.remaining_queries)
        if self.remaining_tokens is not None and tokens_per_query > 0:
            k = min(k, self.remaining_tokens // tokens_per_query)
        return max(k, 0)

    def charge(self, queries: int, tokens: int = 0, *, what: str = "") -> None:
        """Spend ``queries`` and ``tokens``, or raise :class:`BudgetExceededError` spending nothing."""
        if queries < 0 or tokens < 0:
            raise KdforgeError(f"a charge must be >= 0, got {queries} queries, {tokens} tokens", "charge what was sent")
        if not self.can_afford(queries, tokens):
            raise BudgetExceededError(
                f"teacher budget exceeded{f' ({what})' if what else ''}: {queries} queries / {tokens} tokens asked, "
                f"{self.remaining_queries} queries / {self.remaining_tokens} tokens left "
                f"(limits {self.max_queries} / {self.max_tokens})",
                "raise the budget, or query fewer points (smaller rounds / batches)")
        self.queries += queries
        self.tokens += tokens
        self.log_.append({"queries": queries, "tokens": tokens, "what": what})

    def state_dict(self) -> dict[str, Any]:
        return {"max_queries": self.max_queries, "max_tokens": self.max_tokens, "queries": self.queries,
                "tokens": self.tokens}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.queries, self.tokens = int(state["queries"]), int(state["tokens"])


def batch_cost(batch: Mapping[str, Any]) -> tuple[int, int]:
    """``(queries, tokens)`` of a batch: its rows, and its ``attention_mask`` sum (else ``input_ids``
    size, else 0)."""
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    first = next((v for v in batch.values() if torch.is_tensor(v)), None)
    rows = int((mask if mask is not None else ids if ids is not None else first).shape[0]) if first is not None else 0
    if torch.is_tensor(mask):
        return rows, int(mask.sum())
    if torch.is_tensor(ids):
        return rows, int(ids.numel())
    return rows, 0


class BudgetedTeacher(TeacherSource):
    """A teacher source that charges a :class:`QueryBudget` before every ``signal`` call."""

    def __init__(self, source: TeacherSource, budget: QueryBudget) -> None:
        self.source, self.budget = source, budget
        self.provides, self.scores_new_samples = source.provides, source.scores_new_samples

    @property
    def model(self) -> Any:
        return getattr(self.source, "model", None)

    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        queries, tokens = batch_cost(batch)
        self.budget.charge(queries, tokens, what="teacher signal")
        return self.source.signal(batch, task, features=features)

    def modules(self) -> list[torch.nn.Module]:
        return self.source.modules()

    def place(self, device: torch.device | str) -> None:
        self.source.place(device)

    def on_step_end(self, student: torch.nn.Module, step: int) -> None:
        self.source.on_step_end(student, step)

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "budget": self.budget.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.budget.load_state_dict(state["budget"])
