"""Ground-truth guidance of born-again generations (``teacher: {source: born_again, label_weight: ...}``).

Borup & Andersen 2021 (*Even your Teacher Needs Guidance*; our reading, see
``kdforge/teachers/guidance.py``): generation ``g`` trains on the target
``alpha_g * y + (1 - alpha_g) * softmax(f_{g-1}(x))``. On the method's terms this is exactly

    alpha_g * cross_entropy(y, q) + (1 - alpha_g) * forward_kl_{T=1}(softmax(f_{g-1}) || q)

since ``CE(alpha y + (1 - alpha) p, q) = alpha CE(y, q) + (1 - alpha) (KL(p || q) + H(p))`` and
``H(p)`` does not depend on the student: same value up to a constant, same gradient. So a method
with ``label_weight`` must have exactly one ``cross_entropy`` term and one ``forward_kl`` term at
temperature 1; their configured weights are replaced by ``alpha_g`` and ``1 - alpha_g`` in each
generation (:func:`guidance_terms`). Unlabelled transfer images, if any, get only the
``(1 - alpha_g)`` teacher term (cross-entropy ignores them).

``label_weight: auto`` estimates ``alpha_g`` before generation ``g`` (:func:`generation_label_weight`):
the labelled training images are split per class (:func:`guidance_split`, fixed by the run's seed),
80 % to fit a ridge regression on the previous generation's penultimate features and 20 % held
out; never the test set. The previous generation must not have seen the held-out rows: estimated
on the real chain (trained on all labelled images) alpha came out 0 in every case on Fashion-MNIST,
while a generation 0 trained without them gave 0.78-1.0 (``benchmarks/born_again_guidance_probe.py``,
docs/regimes.md). So the recipe trains a *shadow* chain on the kept rows only, with the same inits
and the same alphas, and estimates ``alpha_g`` from shadow generation ``g-1``; the real generation
``g`` (all images) then trains with that ``alpha_g``. This doubles the training cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ConfigError
from kdforge.teachers.guidance import estimate_label_weight, penultimate_features
from kdforge.train.trilateral_meta import split_holdout

log = logging.getLogger(__name__)

#: the fraction of each class's labelled images held out to estimate ``alpha`` (``label_weight: auto``)
HOLDOUT_FRACTION = 0.2

_FIX = ("give the method exactly two terms, {name: cross_entropy} and {name: forward_kl, params: {temperature: 1.0}} "
        "(their weights are replaced by alpha and 1 - alpha), or drop label_weight")


def guidance_terms(terms: Sequence[Any], alpha: float) -> list[Any]:
    """Copies of the method's two ``terms`` with weights ``alpha`` (cross_entropy) and ``1 - alpha``
    (forward_kl at T = 1). Raises ConfigError when the terms do not have that form."""
    names = sorted(t.name for t in terms)
    if names != ["cross_entropy", "forward_kl"]:
        raise ConfigError(f"label_weight mixes labels and the previous generation, but the method's terms are "
                          f"{names}", _FIX)
    kl = next(t for t in terms if t.name == "forward_kl")
    if float((kl.params or {}).get("temperature", 1.0)) != 1.0:
        raise ConfigError("label_weight needs the forward_kl term at temperature 1 (the target mixture "
                          "alpha * y + (1 - alpha) * p is a mixture of probabilities at T = 1)", _FIX)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"label_weight {alpha} is outside [0, 1]", "use a number in [0, 1] or auto")
    return [t.model_copy(update={"weight": float(alpha) if t.name == "cross_entropy" else 1.0 - float(alpha)})
            for t in terms]


def guidance_split(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept rows, held-out rows)`` of the training set ``labels [N]``: ``HOLDOUT_FRACTION`` of each
    class's labelled images held out (fixed by ``seed``); unlabelled (``-100``) rows are kept."""
    labelled = (labels != IGNORE_INDEX).nonzero().flatten()
    _, held = split_holdout(labels[labelled], HOLDOUT_FRACTION, seed)
    held = labelled[held]
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().flatten(), held


def generation_label_weight(setting: str | float, previous: torch.nn.Module, x: torch.Tensor,
                            previous_logits: torch.Tensor, labels: torch.Tensor, *, seed: int,
                            generation: int) -> dict[str, Any]:
    """Generation ``generation``'s label weight and how it was found: ``{"generation", "alpha", ...}``.

    Args:
        setting: ``"auto"`` or a fixed float in ``[0, 1]``.
        previous: generation ``generation - 1``, trained without the held-out rows of
            :func:`guidance_split` (the recipe's shadow chain); its features feed the ridge smoother.
        x: the training images ``[N, ...]``; ``previous_logits`` its logits on them ``[N, C]``.
        labels: ``[N]`` class indices, ``-100`` for unlabelled images (not used by the estimate).
        seed: fixes the held-out split (the same for every generation of a run).
    """
    if setting != "auto":
        return {"generation": generation, "alpha": float(setting), "estimated": False}
    keep, held_idx = guidance_split(labels, seed)
    fit_idx = keep[labels[keep] != IGNORE_INDEX]
    phi = penultimate_features(previous, x[fit_idx])
    phi_val = penultimate_features(previous, x[held_idx])
    est = estimate_label_weight(phi, phi_val, labels[fit_idx], labels[held_idx],
                                torch.softmax(previous_logits[fit_idx].double(), -1),
                                num_classes=previous_logits.shape[-1])
    log.info("born-again generation %d: label weight alpha = %.3f (unclipped %.3f; held-out MSE labels %.4f, "
             "previous %.4f, mixture %.4f; %d fit / %d held out)", generation, est.alpha, est.alpha_unclipped,
             est.heldout_mse_labels, est.heldout_mse_previous, est.heldout_mse_alpha, est.n_fit, est.n_heldout)
    return {"generation": generation, "estimated": True, **est.as_dict()}
