"""The ``data:`` block of a ``fashion_mnist_kd`` / ``compare`` method: data-level distillation.

A method may change *which images* the student sees (docs/data-selection.md):

* ``kind: hard_search`` / ``hard_learned`` — HARD augmentations (:mod:`kdforge.train.hard`), a batch
  transform that rewrites part of every batch into images where teacher and student disagree;
  needs ``teacher: {source: online}`` (the teacher labels the new images). The student's record
  also gets its accuracy on the test images rotated by a random angle in ``[-30, 30]`` degrees
  (``ood_accuracy``: the out-of-domain check) and ``hard_grid.png`` (originals above their
  augmentations at the end of training) in its run folder.
* ``kind: active`` — robust active distillation (:mod:`kdforge.data.select.active`): the
  ``data.transfer`` images are an unlabelled pool; ``budget`` teacher queries on it, spent in
  ``rounds`` by ``strategy`` (``robust``, ``uncertainty``, ``random``), charged to a
  :class:`~kdforge.teachers.QueryBudget`; the final student trains on the labelled images plus the
  queried ones (teacher targets only). Needs ``transfer_set: true``.
* ``kind: kd3`` — KD3 selection (:mod:`kdforge.data.select.kd3`): ``shift_fraction`` of the pool
  is shifted (rotated 90/180 degrees, inverted, or drowned in noise: a stand-in for web data), a
  student trained on the labelled images scores the pool with the teacher, and the final student
  trains on the labelled images plus the ``select`` best points (``selection: random`` for the
  control). Needs ``transfer_set: true``.

The recipe calls :func:`hard_transforms` and :func:`train_selected`; this module never imports
the recipe (it receives the recipe's ``fit`` function and dataset class).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from kdforge.config import StrictModel
from kdforge.errors import ConfigError

__all__ = ["ActiveSpec", "DataMethod", "HardSpec", "KD3Spec", "check_data_method", "hard_transforms",
           "ood_accuracy", "train_selected"]

log = logging.getLogger(__name__)


class HardSpec(StrictModel):
    """HARD augmentation of every training batch (docs/data-selection.md#hard)."""

    kind: Literal["hard_search", "hard_learned"]
    fraction: float = Field(0.5, ge=0, le=1, description="share of each batch rewritten")
    temperature: float = Field(1.0, gt=0, description="T of the disagreement KL(p_T || p_S)")
    rotate: float = Field(30.0, ge=0, description="max rotation, degrees")
    translate: float = Field(0.2, ge=0, description="max translation, fraction of the half-width")
    scale: float = Field(0.2, ge=0, description="max relative zoom")
    brightness: float = Field(0.3, ge=0, description="max brightness shift (input units)")
    contrast: float = Field(0.3, ge=0, description="max relative contrast change")
    candidates: int = Field(8, ge=1, description="hard_search: parameter draws per image")
    ascent_steps: int = Field(0, ge=0, description="hard_search: gradient-ascent steps on the parameters")
    lr: float = Field(1e-2, gt=0, description="hard_learned: Adam lr of the augmentation net")
    realism_weight: float = Field(0.1, ge=0, description="hard_learned: weight of the realism penalty")
    net_width: int = Field(16, ge=1, description="hard_learned: channels of the augmentation net")
    eps: float = Field(0.3, ge=0, description="hard_learned: bound of the per-pixel residual")
    warmup: float = Field(0.25, ge=0, lt=1, description="hard_learned: share of the run before the adversary starts")
    noise_dim: int = Field(0, ge=0, description="hard_learned: noise inputs of the net (0 = a deterministic map)")


class ActiveSpec(StrictModel):
    """Robust active distillation over the transfer images (docs/data-selection.md#active)."""

    kind: Literal["active"]
    strategy: Literal["robust", "uncertainty", "random"] = "robust"
    budget: int = Field(..., ge=0, description="teacher queries on the pool (never exceeded)")
    rounds: int = Field(4, ge=1, description="selection rounds")
    round_epochs: float = Field(3, gt=0, description="student epochs between rounds")
    bins: int = Field(5, ge=1, description="robust: student-margin bins of the teacher-confidence model")
    calibrate: bool = Field(False, description="robust: also learn the teacher's per-cell correctness on the labelled set")


class KD3Spec(StrictModel):
    """KD3 selection from a shifted pool (docs/data-selection.md#kd3)."""

    kind: Literal["kd3"]
    select: int = Field(..., ge=1, description="pool images kept")
    selection: Literal["kd3", "random"] = Field("kd3", description="kd3 scores, or a random subset (control)")
    teacher_weight: float = Field(0.5, ge=0, le=1, description="w of p = w p_T + (1 - w) p_S")
    temperature: float = Field(1.0, gt=0)
    require_agreement: bool = True
    balanced: bool = Field(False, description="take the top points of each combined label in turn")
    shift_fraction: float = Field(0.5, ge=0, le=1, description="share of the pool shifted (rotated/inverted/noised)")


DataMethod = Annotated[HardSpec | ActiveSpec | KD3Spec, Field(discriminator="kind")]


def check_data_method(spec: Any, source: str | None, transfer_set: bool) -> None:
    """Raise ValueError (a config error at the method) when the method's other keys do not fit ``spec``."""
    if spec is None:
        return
    if isinstance(spec, HardSpec) and source != "online":
        raise ValueError(f"data.kind {spec.kind} needs a live teacher to label the new images: add "
                         "teacher: {source: online} to the method")
    if isinstance(spec, ActiveSpec | KD3Spec):
        if not transfer_set:
            raise ValueError(f"data.kind {spec.kind} selects from the unlabelled transfer images: set transfer_set: true")
        if source is not None:
            raise ValueError(f"data.kind {spec.kind} uses the cached teacher's logits: remove the method's teacher block")


def _value_range(x: torch.Tensor) -> tuple[float, float]:
    return float(x.min()), float(x.max())


def hard_transforms(spec: HardSpec, teacher: torch.nn.Module, x_train: torch.Tensor, seed: int,
                    total_steps: int = 0) -> list[Any]:
    """The method's HARD batch transform (a list, for ``Distiller(transforms=...)``)."""
    from kdforge.train.hard import (
        FamilyRanges,
        HardAugmentNet,
        HardLearnedTransform,
        HardSearchTransform,
    )

    ranges = FamilyRanges(spec.rotate, spec.translate, spec.scale, spec.brightness, spec.contrast)
    if spec.kind == "hard_search":
        return [HardSearchTransform(teacher, ranges=ranges, candidates=spec.candidates, ascent_steps=spec.ascent_steps,
                                    fraction=spec.fraction, temperature=spec.temperature, seed=seed)]
    torch.manual_seed(seed + 500)
    net = HardAugmentNet(x_train.shape[1], width=spec.net_width, ranges=ranges, eps=spec.eps,
                         value_range=_value_range(x_train), noise_dim=spec.noise_dim)
    return [HardLearnedTransform(net, teacher, lr=spec.lr, realism_weight=spec.realism_weight, fraction=spec.fraction,
                                 temperature=spec.temperature, seed=seed, warmup_steps=int(spec.warmup * total_steps))]


def rotated(x: torch.Tensor, degrees: float = 30.0, seed: int = 7) -> torch.Tensor:
    """``x`` rotated by a per-image angle uniform in ``[-degrees, degrees]`` (fixed ``seed``)."""
    from kdforge.train.hard import apply_family

    theta = torch.zeros(len(x), 6)
    theta[:, 0] = (torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) * 2 - 1) * degrees
    return apply_family(x, theta)


def ood_accuracy(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Accuracy on the rotated test images (:func:`rotated`)."""
    from kdforge.eval.classification import predict_logits

    return float((predict_logits(model, rotated(x_test)).argmax(-1) == y_test).float().mean())


def hard_grid(transforms: list[Any], teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor,
              path: Path) -> Path | None:
    """Save originals above their HARD augmentations under the final student (a PNG)."""
    from kdforge.train.hard import HardLearnedTransform, apply_family, save_augmentation_grid

    if not transforms:
        return None
    tf, x8 = transforms[0], x[:8]
    with torch.no_grad():
        aug = (tf.net.eval()(x8, tf.noise(len(x8), torch.Generator().manual_seed(0)))[0]
               if isinstance(tf, HardLearnedTransform) else None)
    if aug is None:
        aug = apply_family(x8, tf.search(x8, teacher, student)[0])
    return save_augmentation_grid(x8, aug, path, title="HARD augmentations at the end of training")


def shift_pool(x: torch.Tensor, fraction: float, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shifted copy of x, in-domain mask)``: ``fraction`` of the rows rotated by 90 or 180 degrees,
    inverted (``lo + hi - x``) or drowned in Gaussian noise (std 1.5, clamped), a quarter each."""
    g = torch.Generator().manual_seed(seed)
    out, lo, hi = x.clone(), float(x.min()), float(x.max())
    rows = torch.randperm(len(x), generator=g)[: int(round(fraction * len(x)))]
    kinds = torch.arange(len(rows)) % 4
    for k in range(4):
        r = rows[kinds == k]
        if k < 2:
            out[r] = torch.rot90(x[r], k + 1, (-2, -1))
        elif k == 2:
            out[r] = lo + hi - x[r]
        else:
            out[r] = (x[r] + 1.5 * torch.randn(x[r].shape, generator=g)).clamp(lo, hi)
    in_domain = torch.ones(len(x), dtype=torch.bool)
    in_domain[rows] = False
    return out, in_domain


def train_selected(spec: ActiveSpec | KD3Spec, *, factory: Callable[[], torch.nn.Module], fit: Callable[..., dict],
                   dataset_cls: Callable[..., Any], terms: Any, teacher: torch.nn.Module, x_lab: torch.Tensor,
                   y_lab: torch.Tensor, t_lab: torch.Tensor, x_pool: torch.Tensor, y_pool: torch.Tensor,
                   t_pool: torch.Tensor, run_dir: Path, seed: int, epochs: float,
                   fit_kwargs: dict[str, Any]) -> tuple[torch.nn.Module, int, dict[str, Any]]:
    """Select pool points (active rounds or KD3), then train a fresh student on labelled + selected
    for ``epochs`` (over labelled + selected, like a transfer-set method).

    ``fit(model, dataset, terms, run_dir=..., epochs=..., **fit_kwargs)`` is the recipe's trainer;
    ``t_pool`` are the cached teacher logits of the pool, *revealed* only for the points an active
    round charges to its budget. Returns ``(student, steps, record fields)``.
    """
    from kdforge.constants import IGNORE_INDEX
    from kdforge.data.select import ActiveSelector, kd3_select
    from kdforge.eval.classification import predict_logits
    from kdforge.teachers import QueryBudget

    def data(sel: torch.Tensor, t_sel: torch.Tensor) -> Any:
        labels = torch.cat([y_lab, torch.full((len(sel),), IGNORE_INDEX, dtype=y_lab.dtype)])
        return dataset_cls(torch.cat([x_lab, x_pool[sel]]), labels, teacher_logits=torch.cat([t_lab, t_sel]))

    steps = 0
    torch.manual_seed(seed)
    student = factory()
    out = fit(student, data(torch.empty(0, dtype=torch.long), t_pool[:0]), terms, run_dir=run_dir / "select-0",
              epochs=epochs, **fit_kwargs)
    student, steps = out["model"], steps + out["steps"]
    record: dict[str, Any] = {"kind": spec.kind}
    if isinstance(spec, ActiveSpec):
        budget = QueryBudget(max_queries=spec.budget)
        selector = ActiveSelector(len(x_pool), budget, spec.rounds, t_pool.shape[-1], strategy=spec.strategy, seed=seed,
                                  bins=spec.bins)
        chosen = torch.empty(0, dtype=torch.long)
        for r in range(spec.rounds):
            s_pool = predict_logits(student, x_pool)
            if spec.calibrate:
                selector.calibrate(predict_logits(student, x_lab), t_lab, y_lab)
            idx = selector.select(s_pool)  # charges the budget; raises before any overspending
            selector.observe(idx, s_pool, t_pool[idx])
            chosen = torch.cat([chosen, idx])
            if r < spec.rounds - 1 and len(chosen):
                out = fit(student, data(chosen, t_pool[chosen]), terms, run_dir=run_dir / f"select-{r + 1}",
                          epochs=spec.round_epochs, **fit_kwargs)
                student, steps = out["model"], steps + out["steps"]
        record |= {"strategy": spec.strategy, "budget": spec.budget, "queries": budget.queries,
                   "teacher_acc_on_queried": float((t_pool[chosen].argmax(-1) == y_pool[chosen]).float().mean())
                   if len(chosen) else None}
    else:
        s_pool = predict_logits(student, x_pool)
        if spec.selection == "kd3":
            chosen = kd3_select(t_pool, s_pool, k=spec.select, balanced=spec.balanced, teacher_weight=spec.teacher_weight,
                                temperature=spec.temperature, require_agreement=spec.require_agreement)
        else:
            chosen = torch.randperm(len(x_pool), generator=torch.Generator().manual_seed(seed))[: spec.select]
        record |= {"selection": spec.selection, "selected": len(chosen)}
    if len(chosen) == 0:
        raise ConfigError(f"data.kind {spec.kind} selected no pool images", "raise the budget / select, or data.transfer")
    torch.manual_seed(seed)
    final = fit(factory(), data(chosen, t_pool[chosen]), terms, run_dir=run_dir / "final",
                epochs=epochs, **fit_kwargs)
    record["pool_indices"] = chosen.tolist()
    return final["model"], steps + final["steps"], record
