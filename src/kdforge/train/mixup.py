"""Mixup / CutMix for distillation: the teacher labels the *mixed* input.

Classic mixup trains on ``x' = lam * x_i + (1 - lam) * x_j`` with the labels mixed the same way.
In KD the teacher can label ``x'`` itself, which is the better target (the mixed image is a new
input, not a mixture of two labelled ones; Beyer et al., 2022, "Knowledge distillation: a good
teacher is patient and consistent"; the HARD / data-augmentation KD line in issue 13). So
:class:`MixupTransform` only rewrites the *inputs* of a micro-batch; the trainer then runs the
teacher source on the rewritten batch, and every distillation term compares the student with
the teacher on the same mixed input.

Per micro-batch (with probability ``prob``): ``lam ~ Beta(alpha, alpha)`` and a permutation
``j = perm(i)`` drawn from a generator seeded by ``(seed, step, micro)`` (a resumed run mixes
the same way), then

- ``mode="mixup"``: ``x'_i = lam * x_i + (1 - lam) * x_j``;
- ``mode="cutmix"``: a box of area ``(1 - lam)`` of the image (last two dims) is pasted from
  ``x_j``; ``lam`` is recomputed from the box actually pasted.

Hard labels, when the batch has them, become those of the dominant input (``lam >= 0.5``: the
row's own, else its partner's), so a cross-entropy term stays well defined; prefer a pure
distillation objective. A batch that carries a cached teacher signal cannot be mixed (the cache
labels the unmixed inputs): use a live teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from kdforge.errors import ConfigError
from kdforge.train.transforms import StepContext

__all__ = ["MixInfo", "MixupTransform"]


@dataclass(frozen=True)
class MixInfo:
    """What the last call did: ``lam`` (the input's own share) and ``perm`` (partner rows)."""

    lam: float
    perm: torch.Tensor
    box: tuple[int, int, int, int] | None = None  # cutmix: (top, bottom, left, right)


class MixupTransform:
    """A :class:`~kdforge.train.transforms.BatchTransform` mixing the inputs of each micro-batch.

    Args:
        alpha: Beta(alpha, alpha) concentration (1.0 = uniform ``lam``).
        mode: ``mixup`` or ``cutmix`` (images ``[B, C, H, W]`` or ``[B, H, W]``).
        prob: probability that a micro-batch is mixed.
        seed: base seed; micro-batch ``m`` of step ``s`` uses ``(seed, s, m)``.
        input_key, label_key: the batch's input and (optional) hard-label keys.
    """

    def __init__(self, alpha: float = 1.0, *, mode: Literal["mixup", "cutmix"] = "mixup", prob: float = 1.0,
                 seed: int = 0, input_key: str = "inputs", label_key: str = "labels") -> None:
        if alpha <= 0:
            raise ConfigError(f"mixup alpha must be > 0, got {alpha}", "use e.g. 1.0 (uniform) or 0.2")
        if mode not in ("mixup", "cutmix"):
            raise ConfigError(f"unknown mix mode {mode!r}", "use 'mixup' or 'cutmix'")
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"mix prob must be in [0, 1], got {prob}", "e.g. 1.0")
        self.alpha, self.mode, self.prob, self.seed = float(alpha), mode, float(prob), int(seed)
        self.input_key, self.label_key = input_key, label_key
        self.last: MixInfo | None = None

    def __call__(self, batch: Mapping[str, Any], ctx: StepContext) -> Mapping[str, Any]:
        if any(k.startswith("teacher_") for k in batch):
            raise ConfigError("mixup cannot mix a batch that carries a cached teacher signal (it labels the "
                              "unmixed inputs)", "distil from a live teacher when mixing inputs")
        x = batch[self.input_key]
        rng = np.random.default_rng([self.seed, int(ctx.step), int(ctx.micro)])
        if rng.random() >= self.prob or x.shape[0] < 2:
            self.last = None
            return batch
        lam = float(rng.beta(self.alpha, self.alpha))
        perm = torch.as_tensor(rng.permutation(x.shape[0]), device=x.device)
        box = None
        if self.mode == "mixup":
            mixed = lam * x + (1.0 - lam) * x[perm]
        else:
            if x.dim() < 3:
                raise ConfigError(f"cutmix needs images [B, (C,) H, W], got {tuple(x.shape)}", "use mode='mixup'")
            h, w = x.shape[-2], x.shape[-1]
            ch, cw = int(round(h * (1 - lam) ** 0.5)), int(round(w * (1 - lam) ** 0.5))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            top, bottom = max(cy - ch // 2, 0), min(cy - ch // 2 + ch, h)
            left, right = max(cx - cw // 2, 0), min(cx - cw // 2 + cw, w)
            mixed = x.clone()
            mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (h * w)
            box = (top, bottom, left, right)
        out = dict(batch)
        out[self.input_key] = mixed
        labels = batch.get(self.label_key)
        if torch.is_tensor(labels) and lam < 0.5:
            out[self.label_key] = labels[perm]
        self.last = MixInfo(lam, perm, box)
        return out

