"""The true bilevel update of trilateral KD's ratio network, as a step before the student's step.

Meta-Weight-Net style (the formulas: :mod:`kdforge.losses.trilateral_bilevel`). Per training
micro-batch, before the student's forward pass:

1. a held-out labelled batch is drawn: from a fixed held-out split of the labelled training data
   (``holdout: split``, the paper's held-out set; the student never trains on it), or the other
   half of the same batch (``holdout: batch``: each half's look-ahead is scored on the other);
2. :func:`~kdforge.losses.trilateral_bilevel.lookahead_holdout_ce` gives ``CE_val(theta'(phi))``;
   its gradient in ``phi`` moves the fusion network by one Adam step (``meta_lr``);
3. the :class:`~kdforge.train.Distiller`'s ordinary step follows, with ``r(phi)`` of the updated
   network, detached (``trilateral_kd(..., bilevel=...)`` adds no update term of its own).

:class:`TrilateralBilevelDistiller` is the Distiller with step 1-2 in front of
:meth:`~kdforge.train.Distiller.compute_loss` (single process; a classification task whose teacher
signal is dense logits). The fusion network stays in the Distiller's ``extra_modules`` (device,
checkpoints); the student's optimizer never moves it (it gets no gradient there). The
meta-learners' own state (Adam moments, the held-out draw) rides in the checkpoint's
``trainer_state.json``: a resumed run ends equal to an uninterrupted one (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError
from kdforge.losses.supervised import IGNORE_INDEX
from kdforge.losses.trilateral import TrilateralBilevel, TrilateralFusion
from kdforge.losses.trilateral_bilevel import lookahead_holdout_ce, network_ratios
from kdforge.train.callbacks import Callback
from kdforge.train.distiller import Distiller
from kdforge.train.objective import ObjectiveValue
from kdforge.train.tasks import ClassificationTask, pick_source

__all__ = ["TrilateralBilevelDistiller", "TrilateralMetaLearner", "split_holdout"]

log = logging.getLogger(__name__)


def split_holdout(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train indices, held-out indices)``: ``fraction`` of each class's labelled samples held out
    (at least one per class with two or more samples; unlabelled ``-100`` samples stay in training)."""
    g = torch.Generator().manual_seed(seed)
    held: list[torch.Tensor] = []
    for c in labels[labels != IGNORE_INDEX].unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:k])
    out = torch.cat(held) if held else torch.zeros(0, dtype=torch.long)
    if out.numel() == 0:
        raise ConfigError("holdout: split found no class with two or more labelled samples to hold out",
                          "use holdout: batch, or give more labelled data")
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[out] = False
    return keep.nonzero().flatten(), out.sort().values


class TrilateralMetaLearner:
    """Trains a :class:`~kdforge.losses.trilateral.TrilateralFusion` by the bilevel rule (module docstring).

    Args:
        fusion: the ratio network of a ``trilateral_kd`` term (marked as meta-trained).
        settings: :class:`~kdforge.losses.trilateral.TrilateralBilevel` (or its mapping).
        temperature: the term's ``T``.
        holdout: ``(inputs [m, ...], labels [m])``, the held-out split (``holdout: split``; None for
            ``holdout: batch``).
        seed: seeds the draw of held-out batches.
        params: ``lookahead: all`` only: the student parameter names to look ahead with (None: all).

    :meth:`step` returns ``{"meta_loss", "ratio_mean"}`` (the mean updated ratio of the batch's labelled
    samples, every 20th call; NaN otherwise); :attr:`history` keeps them per call.
    """

    def __init__(self, fusion: TrilateralFusion, settings: TrilateralBilevel | Mapping[str, Any] | None = None, *,
                 temperature: float = 1.0, holdout: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
                 params: Sequence[str] | None = None) -> None:
        self.fusion = fusion
        self.settings = settings if isinstance(settings, TrilateralBilevel) else TrilateralBilevel.model_validate(
            dict(settings or {}))
        if self.settings.holdout == "split" and holdout is None:
            raise ConfigError("holdout: split needs the held-out samples",
                              "pass holdout=(inputs, labels) (split_holdout gives the indices), or use holdout: batch")
        self.temperature, self.holdout, self.params = temperature, holdout, params
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(fusion.parameters(), lr=self.settings.meta_lr)
        self.history: list[dict[str, float]] = []
        self._head: nn.Linear | None = None
        fusion.bilevel_attached = True  # trilateral_kd refuses bilevel settings without a meta-learner

    def _head_of(self, student: nn.Module) -> nn.Linear | None:
        if self.settings.lookahead != "head":
            return None
        if self._head is None:
            from kdforge.students.dual_head import find_head

            self._head = find_head(student)[1]
        return self._head

    def _pairs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """``(x_tr, t_tr, y_tr, x_val, y_val)`` look-aheads of this step."""
        if self.settings.holdout == "batch":
            half = x.shape[0] // 2
            if half == 0:
                return []
            a, b = slice(0, half), slice(half, None)
            return [(x[a], t[a], y[a], x[b], y[b]), (x[b], t[b], y[b], x[a], y[a])]
        assert self.holdout is not None
        hx, hy = self.holdout
        pick = torch.randperm(len(hy), generator=self.generator)[: self.settings.holdout_batch_size]
        return [(x, t, y, hx[pick].to(x.device), hy[pick].to(x.device))]

    def step(self, student: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor,
             labels: torch.Tensor) -> dict[str, float]:
        """One meta update of the fusion network from the training batch ``(x, teacher_logits, labels)``."""
        labels = labels.to(x.device).long()
        s = self.settings
        self.fusion.train()
        meta = torch.zeros((), device=x.device)
        used = 0
        for x_tr, t_tr, y_tr, x_val, y_val in self._pairs(x, teacher_logits, labels):
            if not bool((y_val != IGNORE_INDEX).any()) or not bool((y_tr != IGNORE_INDEX).any()):
                continue  # nothing to score, or no ratio to learn
            meta = meta + lookahead_holdout_ce(student, self.fusion, x_tr, t_tr, y_tr, x_val, y_val,
                                               temperature=self.temperature, inner_lr=s.inner_lr,
                                               lookahead=s.lookahead, head=self._head_of(student),
                                               params=self.params)
            used += 1
        stats: dict[str, float] = {"meta_loss": float("nan"), "ratio_mean": float("nan")}
        if used:
            self.optimizer.zero_grad(set_to_none=True)
            grads = torch.autograd.grad(meta, list(self.fusion.parameters()), allow_unused=True)
            for p, g in zip(self.fusion.parameters(), grads):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            stats["meta_loss"] = float(meta.detach()) / used
            if len(self.history) % 20 == 0:  # the updated ratios on this batch, every 20 steps (a forward pass)
                with torch.no_grad():
                    r = network_ratios(self.fusion, student(x), teacher_logits, labels)
                stats["ratio_mean"] = float(r[labels != IGNORE_INDEX].mean())
        self.history.append(stats)
        if len(self.history) % 100 == 1:
            log.info("trilateral bilevel step %d: held-out CE after look-ahead %.4f, mean ratio %.3f",
                     len(self.history), stats["meta_loss"], stats["ratio_mean"])
        return stats

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (the meta-optimizer's moments, the held-out draw's generator, the step
        count): a checkpoint's ``trainer_state.json`` holds it, so a resumed run continues exactly."""
        opt = self.optimizer.state_dict()
        return {
            "optimizer": {"state": {str(i): {k: _jsonable(v) for k, v in st.items()} for i, st in opt["state"].items()},
                          "param_groups": [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
                                           for g in opt["param_groups"]]},
            "generator": self.generator.get_state().tolist(),
            "steps": len(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        opt = state["optimizer"]
        self.optimizer.load_state_dict({
            "state": {int(i): {k: _tensor(v) for k, v in st.items()} for i, st in opt["state"].items()},
            "param_groups": [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in opt["param_groups"]],
        })
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.history = [{"meta_loss": float("nan"), "ratio_mean": float("nan")} for _ in range(int(state.get("steps", 0)))]


def _jsonable(v: Any) -> Any:
    if torch.is_tensor(v):
        return {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "data": v.flatten().tolist()}
    return v


def _tensor(v: Any) -> Any:
    if isinstance(v, Mapping) and {"dtype", "shape", "data"} <= set(v):
        return torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
    return v


class _LearnerStates(Callback):
    """Carries the meta-learners' states in the Distiller's checkpoints (``trainer_state.json``)."""

    def __init__(self, learners: Sequence[TrilateralMetaLearner]) -> None:
        self.learners = list(learners)

    def state_dict(self) -> dict[str, Any]:
        return {"learners": [lr.state_dict() for lr in self.learners]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for learner, saved in zip(self.learners, state.get("learners", [])):
            learner.load_state_dict(saved)


class TrilateralBilevelDistiller(Distiller):
    """A :class:`~kdforge.train.Distiller` whose every training micro-batch first runs
    :meth:`TrilateralMetaLearner.step` of each learner (module docstring).

    Args:
        *args, **kwargs: the Distiller's.
        learners: the meta-learners (one per ``trilateral_kd`` term with ``bilevel`` settings).
    """

    def __init__(self, *args: Any, learners: Sequence[TrilateralMetaLearner], **kwargs: Any) -> None:
        kwargs["callbacks"] = [_LearnerStates(learners), *kwargs.get("callbacks", ())]  # first: a stable checkpoint key
        super().__init__(*args, **kwargs)
        if not isinstance(self.task, ClassificationTask):
            raise ConfigError(f"the bilevel trilateral update needs a ClassificationTask, got {type(self.task).__name__}",
                              "use task=ClassificationTask() or the first-order rule (drop bilevel)")
        if self.accelerator.num_processes != 1:
            raise ConfigError("the bilevel trilateral update runs in one process only",
                              "run this method without accelerate launch / torchrun")
        self.learners = list(learners)

    def compute_loss(self, batch: Mapping[str, Any], normalizer: float) -> ObjectiveValue:
        student = self.accelerator.unwrap_model(self.student)
        if student.training and torch.is_grad_enabled() and self.learners:
            (x,), _ = self.task.model_inputs(batch)
            source = pick_source(self.teacher_source, self.task, batch)
            signal = source.signal(batch, self.task) if source is not None else None
            if signal is None or signal.logits is None:
                raise ConfigError("the bilevel trilateral update needs dense teacher logits for every batch",
                                  "use a cached or online dense teacher")
            labels = batch[self.task.label_key]
            for learner in self.learners:
                learner.step(student, x, signal.logits.to(x.device), labels)
            if source is self.teacher_source:  # the student's step reuses this signal: one teacher query per batch
                self.teacher_source = _Replay(source, batch, signal)
                try:
                    return super().compute_loss(batch, normalizer)
                finally:
                    self.teacher_source = source
        return super().compute_loss(batch, normalizer)


class _Replay:
    """``source`` that answers ``batch`` (the same object, no feature request) with a given signal;
    everything else is the source's own."""

    def __init__(self, source: Any, batch: Mapping[str, Any], signal: Any) -> None:
        self._source, self._batch, self._signal = source, batch, signal

    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> Any:
        if batch is self._batch and features is None:
            return self._signal
        return self._source.signal(batch, task, features=features)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)
