"""Learnable parts some loss terms need, attached to a recipe's student before training.

* a ``dual_head_kd`` term: the student is wrapped in :class:`~kdforge.students.DualHeadStudent`
  (its auxiliary head trains with it, the term gets it as ``heads``; :func:`unwrap_student` gives
  back the deployed model);
* a ``trilateral_kd`` term without a ``fusion`` network: a :class:`~kdforge.losses.trilateral.
  TrilateralFusion` is created, passed to the term and optimised with the student;
* a ``trilateral_kd`` term with ``bilevel`` settings: :func:`attach_bilevel` holds out the split
  and builds the :class:`~kdforge.train.TrilateralMetaLearner` that trains the fusion network
  (the recipe then trains with :class:`~kdforge.train.TrilateralBilevelDistiller`);
* a ``dac_kl`` term with ``learned: true``: a :class:`~kdforge.losses.dac_clip.DACClipNet` (its
  upper limit starting at the term's ``mass``) is created, passed as ``clip_net`` and optimised with the student
  (:func:`attach_clip_nets`; the ``llm_kd`` recipe calls that one alone).

Used by the ``fashion_mnist_kd`` / ``compare`` recipes' ``_fit`` so that these losses work by name
from YAML; the Python API does the same by hand (``docs/losses.md``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError

__all__ = ["attach_bilevel", "attach_clip_nets", "attach_learned_terms", "unwrap_student"]

log = logging.getLogger(__name__)


def attach_learned_terms(model: nn.Module, objective: Any, world_size: int = 1) -> tuple[nn.Module, dict[str, nn.Module]]:
    """``(model to train, extra_modules for the Distiller)`` for ``objective``'s terms (module docstring)."""
    from kdforge.losses.trilateral import TrilateralFusion
    from kdforge.students.dual_head import DualHeadStudent, find_head

    names = [t.name for t in objective.terms]
    extras: dict[str, nn.Module] = {}
    if "dual_head_kd" in names:
        if names.count("dual_head_kd") != 1:
            raise ConfigError("a method may have one dual_head_kd term", "merge them into one term")
        if world_size != 1:
            raise ConfigError("dual_head_kd is single-process in the recipes for now",
                              "run this method without a multi-process launch")
        model = DualHeadStudent(model)
        next(t for t in objective.terms if t.name == "dual_head_kd").params["heads"] = model
    for term in objective.terms:
        if term.name == "trilateral_kd" and term.params.get("fusion") is None and "ratio" not in term.params:
            classes = find_head(model.model if isinstance(model, DualHeadStudent) else model)[1].out_features
            fusion = TrilateralFusion(classes)
            term.params["fusion"] = fusion.to(next(model.parameters()).device)
            extras[f"trilateral-{term.key}"] = fusion
    extras.update(attach_clip_nets(objective, next(model.parameters()).device, world_size))
    return model, extras


def attach_bilevel(objective: Any, dataset: Any, *, seed: int = 0, world_size: int = 1) -> tuple[Any, list[Any]]:
    """``(training dataset, meta-learners)`` for the ``trilateral_kd`` terms with ``bilevel`` settings
    (call after :func:`attach_learned_terms`). ``holdout: split`` removes the held-out samples
    (``holdout_fraction`` of each class's labelled items of ``dataset``, dict items with ``inputs``
    and ``labels``) from the returned training dataset; without such a term: ``(dataset, [])``."""
    from kdforge.losses.trilateral import TrilateralBilevel
    from kdforge.train.trilateral_meta import TrilateralMetaLearner, split_holdout

    learners = []
    for term in objective.terms:
        if term.name != "trilateral_kd" or term.params.get("bilevel") is None:
            continue
        if world_size != 1:
            raise ConfigError("the bilevel trilateral update is single-process", "run this method without a launch")
        settings = TrilateralBilevel.model_validate(dict(term.params["bilevel"]))
        holdout = None
        if settings.holdout == "split":
            labels = getattr(dataset, "labels", None)
            if labels is None:
                labels = torch.stack([torch.as_tensor(dataset[i]["labels"]) for i in range(len(dataset))])
            keep, held = split_holdout(torch.as_tensor(labels), settings.holdout_fraction, seed)
            holdout = (torch.stack([dataset[i]["inputs"] for i in held.tolist()]),
                       torch.as_tensor(labels)[held].long())
            dataset = torch.utils.data.Subset(dataset, keep.tolist())
            log.info("trilateral bilevel: %d of the method's %d training items held out (never trained on)",
                     len(held), len(keep) + len(held))
        learners.append(TrilateralMetaLearner(term.params["fusion"], settings,
                                              temperature=float(term.params.get("temperature", 1.0)),
                                              holdout=holdout, seed=seed))
    if len(learners) > 1 and any(lr.settings.holdout == "split" for lr in learners):
        raise ConfigError("one method may have one trilateral_kd term with bilevel holdout: split",
                          "merge the terms, or use holdout: batch")
    return dataset, learners


def attach_clip_nets(objective: Any, device: torch.device | str = "cpu", world_size: int = 1) -> dict[str, nn.Module]:
    """Create the clipping sub-network of every ``dac_kl`` term with ``learned: true`` and no
    ``clip_net`` (its ``u`` starts at the term's ``mass``); returns them as ``extra_modules``."""
    from kdforge.losses.dac_clip import DACClipNet

    extras: dict[str, nn.Module] = {}
    for term in objective.terms:
        if term.name == "dac_kl" and term.params.get("learned") and term.params.get("clip_net") is None:
            if world_size != 1:  # the term calls the bare module: its gradients would not be all-reduced
                raise ConfigError("dac_kl learned: true is single-process in the recipes for now",
                                  "run this method without a multi-process launch, or use the fixed mass")
            net = DACClipNet(init_mass=float(term.params.get("mass", 0.9))).to(device)
            term.params["clip_net"] = net
            extras[f"dac-clip-{term.key}"] = net
    return extras


def unwrap_student(model: nn.Module | None) -> nn.Module | None:
    """The deployed student of a wrapped one (the main head of a dual-head student), else ``model``."""
    from kdforge.students.dual_head import DualHeadStudent

    return model.model if isinstance(model, DualHeadStudent) else model
