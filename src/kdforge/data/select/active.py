"""Robust active distillation: spend a budget of teacher queries on points that are both
*informative* for the student and *likely labelled correctly* by the teacher (after "Robust
Active Distillation", Baykal et al., ICLR 2023).

Setting: a labelled set, a large unlabelled pool, a teacher whose soft labels cost a query each
(:class:`~kdforge.teachers.budget.QueryBudget`; tokens too for a served LM). Selection runs in
rounds: train the student, score the pool, query the teacher on the chosen points, repeat.

Scores of a pool point ``i`` from the student's logits ``s_i`` (no teacher query needed):

* informativeness ``u_i = 1 - (p_(1) - p_(2))``: one minus the student's *margin* (top-1 minus
  top-2 probability; :func:`student_uncertainty`, ``kind="entropy"`` for normalised entropy);
* correctness ``c_i``: the predicted probability that the teacher labels ``i`` correctly. The
  teacher's answer is unknown before the query, so :class:`TeacherConfidenceModel` predicts the
  teacher's confidence (its top probability, a calibrated teacher's P(correct)) from what the
  already-queried points showed, per (student-predicted class, student-margin bin), shrunk toward
  the global mean (``c = (sum + m * mean) / (count + m)``); before any query it is 1 for all.
  With a labelled set the teacher was run on, :meth:`ActiveSelector.calibrate` adds the teacher's
  measured *correctness* there (``[argmax t == y]``; ``bins=1``: per class), which matters when the
  teacher is over-confident (its top probability then says little about its errors).
* strategies (:func:`active_scores`): ``robust`` ``u_i * c_i`` (informative *and* likely right:
  the points of highest uncertainty are also where teachers err most, and a wrong soft label on
  them hurts the student; the product trades the two off), ``uncertainty`` ``u_i`` (classic
  margin sampling), ``random``.

Note: the paper derives its selection from a game-theoretic formulation with provable
guarantees; what is implemented here is the trade-off it names (informative x likely-correct)
with a plug-in correctness estimate, *not* the paper's exact randomised selection rule. Pass
``teacher_confidence=`` to :func:`select_queries` when a cheap proxy of the teacher's
confidence exists (a small model of the same family, a cached earlier teacher).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from kdforge.errors import ConfigError
from kdforge.teachers.budget import QueryBudget

__all__ = ["ActiveRound", "ActiveSelector", "TeacherConfidenceModel", "active_scores", "select_queries",
           "student_uncertainty"]

log = logging.getLogger(__name__)

Strategy = Literal["robust", "uncertainty", "random"]
STRATEGIES = ("robust", "uncertainty", "random")


def student_uncertainty(logits: torch.Tensor, kind: Literal["margin", "entropy"] = "margin") -> torch.Tensor:
    """``[N]`` informativeness: ``1 - (p1 - p2)`` (margin) or ``H(p) / log C`` (entropy), in [0, 1]."""
    p = torch.softmax(logits.float(), -1)
    if kind == "margin":
        top = p.topk(2, dim=-1).values
        return 1.0 - (top[:, 0] - top[:, 1])
    if kind == "entropy":
        return -(p * p.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(p.shape[-1])))
    raise ConfigError(f"unknown uncertainty kind {kind!r}", "use 'margin' or 'entropy'")


class TeacherConfidenceModel:
    """Predict the teacher's confidence on unqueried points from the student's logits (see module doc).

    Args:
        bins: student-margin bins (equal width on [0, 1]).
        prior_weight: ``m``, pseudo-count pulling each cell toward the global mean.
    """

    def __init__(self, num_classes: int, bins: int = 5, prior_weight: float = 5.0) -> None:
        if bins < 1 or prior_weight < 0:
            raise ConfigError(f"bins >= 1 and prior_weight >= 0, got {bins}, {prior_weight}", "e.g. bins=5, prior_weight=5")
        self.num_classes, self.bins, self.m = int(num_classes), int(bins), float(prior_weight)
        self.sum = torch.zeros(self.num_classes, self.bins, dtype=torch.float64)
        self.count = torch.zeros(self.num_classes, self.bins, dtype=torch.float64)

    def _cells(self, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        margin = 1.0 - student_uncertainty(student_logits, "margin")
        b = (margin * self.bins).long().clamp(0, self.bins - 1)
        return student_logits.argmax(-1), b

    def update(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               labels: torch.Tensor | None = None) -> None:
        """Record points: the student's logits and the teacher's. Without ``labels`` (queried pool
        points) the target is the teacher's confidence ``max softmax(t)``; with true ``labels``
        (a labelled set the teacher was run on) it is the teacher's correctness ``[argmax t == y]``."""
        cls, b = self._cells(student_logits)
        if labels is None:
            conf = torch.softmax(teacher_logits.float(), -1).max(-1).values.double()
        else:
            conf = (teacher_logits.argmax(-1) == labels).double()
        self.sum.index_put_((cls, b), conf, accumulate=True)
        self.count.index_put_((cls, b), torch.ones_like(conf), accumulate=True)

    def predict(self, student_logits: torch.Tensor) -> torch.Tensor:
        """``[N]`` predicted teacher confidence (1 everywhere before any update)."""
        total = float(self.count.sum())
        if total == 0:
            return torch.ones(student_logits.shape[0])
        mean = float(self.sum.sum()) / total
        cls, b = self._cells(student_logits)
        est = (self.sum[cls, b] + self.m * mean) / (self.count[cls, b] + self.m)
        return est.float()


def active_scores(student_logits: torch.Tensor, strategy: Strategy = "robust", *,
                  teacher_confidence: torch.Tensor | None = None, kind: Literal["margin", "entropy"] = "margin",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``[N]`` selection scores (higher first): ``u * c`` (robust), ``u`` (uncertainty), U(0,1) (random)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown active strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    n = student_logits.shape[0]
    if strategy == "random":
        return torch.rand(n, generator=generator)
    u = student_uncertainty(student_logits, kind)
    if strategy == "uncertainty":
        return u
    c = torch.ones(n) if teacher_confidence is None else teacher_confidence.float().reshape(n)
    return u * c


def select_queries(student_logits: torch.Tensor, k: int, strategy: Strategy = "robust", *,
                   teacher_confidence: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
                   kind: Literal["margin", "entropy"] = "margin",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``k`` pool indices of highest score (``exclude``: indices already queried), best first."""
    scores = active_scores(student_logits, strategy, teacher_confidence=teacher_confidence, kind=kind,
                           generator=generator).clone()
    if exclude is not None and len(exclude):
        scores[exclude] = -float("inf")
    k = min(int(k), int(torch.isfinite(scores).sum()))
    return scores.topk(k).indices if k > 0 else torch.empty(0, dtype=torch.long)


@dataclass
class ActiveRound:
    """One selection round: the indices queried and what they cost."""

    round: int
    indices: list[int]
    queries: int
    tokens: int


@dataclass
class ActiveSelector:
    """Rounds of budgeted selection over a pool of ``pool_size`` points.

    ``select(student_logits)`` chooses the next round's points (``budget`` split evenly over
    ``rounds``, never more than :meth:`QueryBudget.affordable`), charges the budget and returns
    them; the caller then queries the teacher on them and calls ``observe(indices, student_logits,
    teacher_logits)`` (which feeds :class:`TeacherConfidenceModel`).
    """

    pool_size: int
    budget: QueryBudget
    rounds: int
    num_classes: int
    strategy: Strategy = "robust"
    tokens_per_query: int = 0
    seed: int = 0
    kind: Literal["margin", "entropy"] = "margin"
    bins: int = 5
    queried: list[int] = field(default_factory=list)
    history: list[ActiveRound] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"active distillation needs rounds >= 1, got {self.rounds}", "e.g. rounds=4")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown active strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}")
        if self.budget.max_queries is None and self.budget.max_tokens is None:
            raise ConfigError("active distillation needs a finite budget", "QueryBudget(max_queries=N)")
        self.confidence = TeacherConfidenceModel(self.num_classes, bins=self.bins)
        self._gen = torch.Generator().manual_seed(self.seed)

    def round_size(self) -> int:
        left = self.budget.affordable(self.pool_size - len(self.queried), self.tokens_per_query)
        rounds_left = max(self.rounds - len(self.history), 1)
        return -(-left // rounds_left)  # ceil: the last round spends what is left

    def select(self, student_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape[0] != self.pool_size:
            raise ConfigError(f"student logits cover {student_logits.shape[0]} points, the pool has {self.pool_size}",
                              "score the whole pool every round")
        k = self.round_size()
        conf = self.confidence.predict(student_logits) if self.strategy == "robust" else None
        exclude = torch.tensor(self.queried, dtype=torch.long)
        idx = select_queries(student_logits, k, self.strategy, teacher_confidence=conf, exclude=exclude,
                             kind=self.kind, generator=self._gen)
        tokens = len(idx) * self.tokens_per_query
        self.budget.charge(len(idx), tokens, what=f"active round {len(self.history)}")
        self.queried.extend(int(i) for i in idx)
        self.history.append(ActiveRound(len(self.history), [int(i) for i in idx], len(idx), tokens))
        log.info("active round %d (%s): %d queries, %s left", len(self.history) - 1, self.strategy, len(idx),
                 self.budget.remaining_queries)
        return idx

    def calibrate(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Teach the correctness model with labelled points (the teacher's correctness is known there;
        no budget: the labelled set's teacher outputs are the same for every strategy)."""
        self.confidence.update(student_logits, teacher_logits, labels)

    def observe(self, indices: Sequence[int] | torch.Tensor, student_logits: torch.Tensor,
                teacher_logits: torch.Tensor) -> None:
        """Feed the queried points' student logits (pool order rows ``indices``) and teacher logits."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        self.confidence.update(student_logits[idx], teacher_logits)
