"""HARD: hard augmentations for robust distillation (Stanton-style KD on inputs where teacher and
student *disagree*; "HARD: Hard Augmentations for Robust Distillation", Nix et al. 2023).

Plain KD only shows the student the training inputs; the student then matches the teacher there
and nowhere else. HARD rewrites part of every micro-batch into inputs on which the teacher and
the student currently disagree most, and lets the teacher label them (a live teacher is needed:
the trainer runs the teacher source on the rewritten batch, as for
:class:`~kdforge.train.mixup.MixupTransform`). The disagreement of one image is

    D(x) = KL( softmax(t(x) / T) || softmax(s(x) / T) )        (per row, nats)

Two augmentation models, each a :class:`~kdforge.train.transforms.BatchTransform`:

* :class:`HardSearchTransform` — a *searched* family of spatial and photometric transforms
  (rotation, translation, scale, brightness, contrast; :func:`apply_family`) with parameters
  ``theta`` bounded by :class:`FamilyRanges`. Per row it draws ``candidates`` parameter vectors
  (the identity among them when ``include_identity``), measures ``D`` for each and keeps the
  argmax; ``ascent_steps`` further steps of projected gradient ascent on ``theta`` then climb
  ``D`` (the family is differentiable: ``affine_grid`` + ``grid_sample``).
* :class:`HardLearnedTransform` — a small augmentation network (:class:`HardAugmentNet`: an image
  -> bounded affine/photometric parameters + a bounded additive residual) trained
  *adversarially* with its own optimizer: each call takes ``net_steps`` steps on
  ``-mean D(g(x)) + realism_weight * R(g, x)``, where ``R`` is the squared size of the residual
  and of the parameters' departure from the identity (the "realistic images" constraint; the
  paper bounds its spatial transformer and penalises its VAE latents' departure likewise). The
  gradient reaches only the network (``torch.autograd.grad``), never the student's ``.grad``.

Rows rewritten: a random ``fraction`` of each micro-batch (the rest stays clean, as the paper
mixes original and augmented samples). Hard labels are kept (the families are small,
label-preserving perturbations); a pure distillation objective is the paper's setting.
:func:`save_augmentation_grid` writes originals above their augmentations (a PNG), to look at what
the teacher is "teaching" through the augmentations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.errors import ConfigError
from kdforge.train.transforms import StepContext

__all__ = [
    "FamilyRanges",
    "HardAugmentNet",
    "HardLearnedTransform",
    "HardSearchTransform",
    "apply_family",
    "disagreement",
    "save_augmentation_grid",
]

log = logging.getLogger(__name__)

#: parameter order of the transform family: rotation (degrees), x/y translation (fraction of the
#: half-width, affine_grid's units), log-scale, brightness (added, in input units), log-contrast
PARAMS = ("rotate", "translate_x", "translate_y", "log_scale", "brightness", "log_contrast")


@dataclass(frozen=True)
class FamilyRanges:
    """Symmetric bounds of the family's parameters (``|theta_k| <= bound_k``); 0 switches one off."""

    rotate: float = 30.0
    translate: float = 0.2
    scale: float = 0.2
    brightness: float = 0.3
    contrast: float = 0.3

    def bounds(self, device: torch.device | None = None) -> torch.Tensor:
        """``[6]`` bounds in :data:`PARAMS` order (scale/contrast as ``log(1 + r)``)."""
        vals = [self.rotate, self.translate, self.translate, math.log1p(self.scale), self.brightness,
                math.log1p(self.contrast)]
        if min(vals) < 0:
            raise ConfigError(f"HARD ranges must be >= 0, got {self}", "use e.g. FamilyRanges(rotate=30, translate=0.2)")
        return torch.tensor(vals, device=device)


def apply_family(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply the spatial + photometric family row-wise.

    Args:
        x: images ``[B, C, H, W]`` (or ``[B, H, W]``).
        theta: ``[B, 6]`` parameters in :data:`PARAMS` order; all zeros is the identity.

    Spatial: ``x'(u) = x(A u + t)`` with ``A = R(angle) / exp(log_scale)`` (bilinear, zeros
    padding in the *shifted* frame, i.e. the image's own background value is kept by padding with
    the per-image minimum). Photometric: ``x'' = (x' - mu) * exp(log_contrast) + mu + brightness``,
    ``mu`` the per-image mean. Differentiable in ``theta``.
    """
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)
    if x.dim() != 4 or theta.shape != (x.shape[0], len(PARAMS)):
        raise ConfigError(f"HARD needs images [B, C, H, W] and theta [B, 6], got {tuple(x.shape)} and "
                          f"{tuple(theta.shape)}", "pass image batches (vision classifiers only)")
    theta = theta.to(x.dtype)
    angle = theta[:, 0] * (math.pi / 180.0)
    inv_scale = torch.exp(-theta[:, 3])
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    mat = torch.stack([torch.stack([cos, -sin, theta[:, 1]], -1), torch.stack([sin, cos, theta[:, 2]], -1)], 1)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    floor = x.amin(dim=(1, 2, 3), keepdim=True)  # background: pad with the image's own minimum
    out = F.grid_sample(x - floor, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + floor
    mu = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mu) * torch.exp(theta[:, 5]).view(-1, 1, 1, 1) + mu + theta[:, 4].view(-1, 1, 1, 1)
    return out.squeeze(1) if squeeze else out


def disagreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row ``KL(softmax(t/T) || softmax(s/T))`` in nats, shape ``[B]``."""
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
    log_s = F.log_softmax(student_logits.float() / temperature, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


class _Frozen:
    """Run models in eval mode without touching their ``.grad`` or their train/eval flag afterwards."""

    def __init__(self, *models: nn.Module) -> None:
        self.models, self.modes = models, [m.training for m in models]

    def __enter__(self) -> _Frozen:
        for m in self.models:
            m.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, mode in zip(self.models, self.modes):
            m.train(mode)


def _teacher_model(explicit: nn.Module | None, ctx: StepContext) -> nn.Module:
    if explicit is not None:
        return explicit
    model = getattr(ctx.teacher, "model", None)
    if not isinstance(model, nn.Module):
        raise ConfigError("HARD needs a live teacher model to measure disagreement on new images",
                          "pass teacher=<nn.Module> to the transform, or train with an online teacher (Distiller(student, "
                          "teacher_module, ...) / teacher: {source: online} in the fashion_mnist recipe)")
    return model


def _check_batch(batch: Mapping[str, Any], name: str) -> None:
    if any(k.startswith("teacher_") for k in batch):
        raise ConfigError(f"{name} cannot rewrite a batch that carries a cached teacher signal (it labels the "
                          "original images)", "distil from a live teacher when augmenting (teacher: {source: online})")


def _rows(n: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    k = int(round(fraction * n))
    return torch.randperm(n, generator=gen)[:k]


class HardSearchTransform:
    """Searched HARD augmentation (see the module docstring).

    Args:
        teacher: the teacher model (default: ``ctx.teacher.model``, an online teacher source's).
        ranges: :class:`FamilyRanges` of the family.
        candidates: parameter draws per row (uniform in the bounds); the identity is one of them
            when ``include_identity`` (so the chosen ``D`` is never below the clean image's).
        ascent_steps / step_size: projected sign-gradient ascent on ``theta`` after the search
            (``step_size`` is a fraction of each bound per step).
        fraction: share of each micro-batch rewritten (0..1).
        temperature: ``T`` of the disagreement.
        seed: micro-batch ``m`` of step ``s`` draws from ``(seed, s, m)`` (a resumed run searches alike).
        input_key: the batch's image key.

    After a call, ``last`` holds ``{"rows", "theta", "gain"}``: the rewritten rows, their
    parameters and the mean ``D(augmented) - D(clean)`` over them.
    """

    def __init__(self, teacher: nn.Module | None = None, *, ranges: FamilyRanges | None = None, candidates: int = 8,
                 ascent_steps: int = 0, step_size: float = 0.25, fraction: float = 0.5, temperature: float = 1.0,
                 include_identity: bool = True, seed: int = 0, input_key: str = "inputs") -> None:
        if candidates < 1 or ascent_steps < 0 or not 0.0 <= fraction <= 1.0 or temperature <= 0:
            raise ConfigError(f"HARD search: candidates >= 1, ascent_steps >= 0, fraction in [0, 1], temperature > 0 "
                              f"(got {candidates}, {ascent_steps}, {fraction}, {temperature})",
                              "e.g. HardSearchTransform(candidates=8, fraction=0.5)")
        self.teacher, self.ranges = teacher, ranges or FamilyRanges()
        self.candidates, self.ascent_steps, self.step_size = int(candidates), int(ascent_steps), float(step_size)
        self.fraction, self.temperature, self.include_identity = float(fraction), float(temperature), include_identity
        self.seed, self.input_key = int(seed), input_key
        self.last: dict[str, Any] | None = None

    def search(self, x: torch.Tensor, teacher: nn.Module, student: nn.Module,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(theta [B, 6], D at theta [B], D of the clean images [B])`` for images ``x``."""
        gen = gen if gen is not None else torch.Generator().manual_seed(self.seed)
        b = x.shape[0]
        bounds = self.ranges.bounds()
        draws = (torch.rand(self.candidates, b, len(PARAMS), generator=gen) * 2 - 1) * bounds
        if self.include_identity:
            draws[0] = 0.0
        draws = draws.to(x.device)
        with _Frozen(teacher, student), torch.no_grad():
            flat = draws.reshape(-1, len(PARAMS))
            xs = apply_family(x.repeat(self.candidates, *([1] * (x.dim() - 1))), flat)
            d = disagreement(teacher(xs), student(xs), self.temperature).view(self.candidates, b)
            clean = disagreement(teacher(x), student(x), self.temperature)
        best = d.argmax(0)
        theta = draws[best, torch.arange(b, device=x.device)]
        score = d.max(0).values
        if self.ascent_steps:
            theta, score = self._ascend(x, theta, teacher, student, bounds.to(x.device))
        return theta, score, clean

    def _ascend(self, x: torch.Tensor, theta: torch.Tensor, teacher: nn.Module, student: nn.Module,
                bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, best_d = theta.clone(), None
        with _Frozen(teacher, student):
            for _ in range(self.ascent_steps + 1):
                th = theta.detach().requires_grad_(True)
                xs = apply_family(x, th)
                d = disagreement(teacher(xs), student(xs), self.temperature)
                if best_d is None:
                    best_d = d.detach().clone()
                else:
                    better = d.detach() > best_d
                    best[better], best_d[better] = th.detach()[better], d.detach()[better]
                (grad,) = torch.autograd.grad(d.sum(), th)
                theta = torch.maximum(torch.minimum(th.detach() + self.step_size * bounds * grad.sign(), bounds), -bounds)
        assert best_d is not None
        return best, best_d

    def __call__(self, batch: Mapping[str, Any], ctx: StepContext) -> Mapping[str, Any]:
        _check_batch(batch, "HARD")
        x = batch[self.input_key]
        gen = torch.Generator().manual_seed(hash((self.seed, int(ctx.step), int(ctx.micro))) % (2**63))
        rows = _rows(x.shape[0], self.fraction, gen).to(x.device)
        if len(rows) == 0:
            self.last = None
            return batch
        teacher = _teacher_model(self.teacher, ctx)
        theta, score, clean = self.search(x[rows], teacher, ctx.student, gen)
        out = dict(batch)
        x_new = x.clone()
        x_new[rows] = apply_family(x[rows], theta).detach()
        out[self.input_key] = x_new
        self.last = {"rows": rows, "theta": theta, "gain": float((score - clean).mean())}
        return out


class HardAugmentNet(nn.Module):
    """A small adversarial augmentation network: image -> bounded family parameters + residual.

    ``g(x) = clamp(apply_family(x, ranges * tanh(head(f(x)))) + eps * tanh(res(x)), lo, hi)``:
    ``f`` two strided 3x3 convolutions (``width`` channels, leaky ReLU: with plain ReLU the
    adversarial updates killed every unit and all images got the same parameters) pooled to a vector, ``head`` a linear
    map to the 6 parameters, ``res`` a 3x3 convolution giving a per-pixel residual bounded by
    ``eps``; the output is clamped to the data's ``value_range`` (so it stays a valid image).
    Both heads start at zero: an untrained net is the identity. With ``noise_dim > 0`` the head also
    reads a noise vector ``z ~ N(0, I)`` per image (``head([f(x), z])``), so one image can get many
    transforms: without it the adversary is a deterministic map and tends to collapse onto one
    extreme transform that the student then learns.
    """

    def __init__(self, channels: int = 1, *, width: int = 16, ranges: FamilyRanges | None = None, eps: float = 0.3,
                 value_range: tuple[float, float] = (-1.0, 1.0), noise_dim: int = 0) -> None:
        super().__init__()
        if eps < 0 or value_range[0] >= value_range[1]:
            raise ConfigError(f"HardAugmentNet: eps >= 0 and value_range lo < hi, got {eps}, {value_range}",
                              "e.g. value_range=(-0.81, 2.03) for Fashion-MNIST normalised images")
        self.ranges, self.eps, self.value_range = ranges or FamilyRanges(), float(eps), value_range
        self.features = nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.noise_dim = int(noise_dim)
        self.head = nn.Linear(width + self.noise_dim, len(PARAMS))
        self.residual = nn.Conv2d(channels, channels, 3, padding=1)
        for layer in (self.head, self.residual):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("_bounds", self.ranges.bounds(), persistent=False)

    def params(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The bounded family parameters ``[B, 6]`` (``z``: ``[B, noise_dim]``, zeros when None)."""
        h = self.features(x)
        if self.noise_dim:
            h = torch.cat([h, z.to(h) if z is not None else h.new_zeros(h.shape[0], self.noise_dim)], 1)
        return self._bounds * torch.tanh(self.head(h))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(augmented images, theta [B, 6], residual)``; images ``[B, C, H, W]``, noise ``z [B, noise_dim]``."""
        theta = self.params(x, z)
        residual = self.eps * torch.tanh(self.residual(x))
        out = (apply_family(x, theta) + residual).clamp(*self.value_range)
        return out, theta, residual


class HardLearnedTransform:
    """Learned HARD augmentation: :class:`HardAugmentNet` trained adversarially during distillation.

    Args:
        net: the augmentation network (its parameters are trained here, by ``optimizer``).
        teacher: the teacher model (default: ``ctx.teacher.model``).
        lr: Adam learning rate of the net (when ``optimizer`` is None).
        net_steps: adversarial steps per call (on the call's clean rows, before rewriting them).
        realism_weight: ``lambda`` of ``R = mean(residual^2) + mean((theta / bounds)^2)``.
        fraction / temperature / seed / input_key: as in :class:`HardSearchTransform`.
        warmup_steps: optimizer steps of plain batches before the adversary starts. Against an
            untrained student every transform *lowers* the disagreement (the clean image is where
            the two random functions differ most), so an adversary trained from step 0 learns to
            stay at the identity; measured on Fashion-MNIST, a quarter of the run is enough.

    ``last``: ``{"rows", "disagreement", "realism"}`` of the last adversarial step. State
    (net and optimizer) is in ``state_dict`` so a resumed run continues the same adversary.
    """

    def __init__(self, net: HardAugmentNet, teacher: nn.Module | None = None, *, lr: float = 1e-3, net_steps: int = 1,
                 realism_weight: float = 1.0, fraction: float = 0.5, temperature: float = 1.0, seed: int = 0,
                 input_key: str = "inputs", optimizer: torch.optim.Optimizer | None = None,
                 warmup_steps: int = 0) -> None:
        if net_steps < 0 or realism_weight < 0 or not 0.0 <= fraction <= 1.0 or temperature <= 0:
            raise ConfigError(f"HARD learned: net_steps >= 0, realism_weight >= 0, fraction in [0, 1], temperature > 0 "
                              f"(got {net_steps}, {realism_weight}, {fraction}, {temperature})",
                              "e.g. HardLearnedTransform(HardAugmentNet(), net_steps=1, realism_weight=1.0)")
        self.net, self.teacher = net, teacher
        self.optimizer = optimizer or torch.optim.Adam(net.parameters(), lr=lr)
        self.net_steps, self.realism_weight = int(net_steps), float(realism_weight)
        self.fraction, self.temperature, self.seed, self.input_key = float(fraction), float(temperature), int(seed), input_key
        self.warmup_steps = int(warmup_steps)
        self.last: dict[str, Any] | None = None

    def realism(self, theta: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``R = mean(residual^2) + mean((theta / bounds)^2)`` (0 for the identity)."""
        bounds = self.net._bounds.clamp_min(1e-12)
        return residual.pow(2).mean() + (theta / bounds).pow(2).mean()

    def noise(self, n: int, gen: torch.Generator | None = None) -> torch.Tensor | None:
        """``[n, noise_dim]`` standard normal noise for the net (None when it takes none)."""
        return torch.randn(n, self.net.noise_dim, generator=gen) if self.net.noise_dim else None

    def adversary_step(self, x: torch.Tensor, teacher: nn.Module, student: nn.Module,
                       z: torch.Tensor | None = None) -> dict[str, float]:
        """One step of the net on ``-mean D(g(x, z)) + lambda * R``; gradients reach the net only."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        with _Frozen(teacher, student):
            self.net.train()
            aug, theta, residual = self.net(x, z)
            d = disagreement(teacher(aug), student(aug), self.temperature).mean()
            r = self.realism(theta, residual)
            loss = -d + self.realism_weight * r
            grads = torch.autograd.grad(loss, params)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"disagreement": float(d.detach()), "realism": float(r.detach())}

    def __call__(self, batch: Mapping[str, Any], ctx: StepContext) -> Mapping[str, Any]:
        _check_batch(batch, "HARD")
        x = batch[self.input_key]
        gen = torch.Generator().manual_seed(hash((self.seed, int(ctx.step), int(ctx.micro))) % (2**63))
        rows = _rows(x.shape[0], self.fraction, gen).to(x.device)
        if len(rows) == 0 or ctx.step < self.warmup_steps:
            self.last = None
            return batch
        teacher = _teacher_model(self.teacher, ctx)
        self.net.to(x.device)
        stats: dict[str, float] = {}
        for _ in range(self.net_steps):
            stats = self.adversary_step(x[rows], teacher, ctx.student, self.noise(len(rows), gen))
        with torch.no_grad():
            self.net.eval()
            aug = self.net(x[rows], self.noise(len(rows), gen))[0]
        out = dict(batch)
        x_new = x.clone()
        x_new[rows] = aug
        out[self.input_key] = x_new
        self.last = {"rows": rows, **stats}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])


def save_augmentation_grid(x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
                           path: str | Path, *, columns: int = 8, title: str = "") -> Path:
    """Write a PNG with ``columns`` originals (top row) above their augmentations (bottom row).

    ``augment`` is the augmented batch itself or a function ``x -> augmented x``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x[:columns].detach().cpu()
    with torch.no_grad():
        aug = (augment(x) if callable(augment) else augment[:columns]).detach().cpu()
    n = x.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8), squeeze=False)
    lo, hi = float(x.min()), float(x.max())
    for i in range(n):
        for row, imgs in enumerate((x, aug)):
            img = imgs[i]
            img = img[0] if img.dim() == 3 else img
            axes[row][i].imshow(img.numpy(), cmap="gray", vmin=lo, vmax=hi)
            axes[row][i].axis("off")
    axes[0][0].set_title("original", fontsize=8, loc="left")
    axes[1][0].set_title("HARD", fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
