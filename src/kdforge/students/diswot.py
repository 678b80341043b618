"""DisWOT: rank candidate students for a teacher *without training them* (Dong et al., CVPR 2023).

"DisWOT: Student Architecture Search for Distillation WithOut Training" observes that the student
that trains best on labels is not the one that distils best, and that two similarities between the
teacher and a *randomly initialised* student, measured on one batch, correlate with how well the
student will distil. Both compare matrices whose size does not depend on the architecture, so a
32-channel teacher and an 8-channel student are comparable:

* **semantic similarity**: the class-activation maps of the last convolutional block (Grad-CAM:
  ``A_k = ReLU(sum_c alpha_kc F_c)`` with ``alpha_kc`` the spatial mean of ``d logit_k / d F_c``)
  for *every* class ``k``, flattened over the batch and the positions, give ``A`` ``[K, B*H*W]``;
  the class-correlation matrix is ``G_sem = normalize_rows(A A^T)`` ``[K, K]`` (each row scaled to
  unit L2 norm, as in ICKD). Distance ``d_sem = ||G_sem^T - G_sem^S||_F``.
* **relation similarity**: the sample-relation matrix of the last block's features (Tung & Mori's
  similarity-preserving KD: ``G_rel = normalize_rows(F F^T)``, ``F`` ``[B, C*H*W]``). Distance
  ``d_rel = ||G_rel^T - G_rel^S||_F``.
* **score** ``= -(d_sem + d_rel)`` (higher is better: more teacher-like).

The teacher is the user's trained teacher (the one the student will distil from); the student is
at its random initialisation. The paper searches the space with an evolutionary algorithm; here
:func:`evolutionary_search` is regularised evolution (Real et al. 2019: tournament of
``sample_size`` from the population, mutate the winner, drop the oldest) under a parameter budget.

Our reading of the paper's matrices: the abstract names "similarity matrices conditioned on the
semantic activation maps" and "sample relations"; the class-correlation Gram of the Grad-CAM maps
and the similarity-preserving relation matrix above are the two standard matrices of that kind,
both free of the architectures' widths. ``docs/students.md`` records a rank-correlation check on
Fashion-MNIST (the recipe ``diswot``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.errors import ConfigError, ShapeError
from kdforge.eval.rank import spearman

__all__ = [
    "Candidate",
    "ConvNetSpace",
    "DisWOTScore",
    "class_activation_gram",
    "diswot_score",
    "evolutionary_search",
    "sample_relation",
    "spearman",
]


@dataclass(frozen=True)
class DisWOTScore:
    """The two distances and the score ``-(semantic + relation)`` (higher = more teacher-like)."""

    semantic: float
    relation: float

    @property
    def score(self) -> float:
        return -(self.semantic + self.relation)


def _normalize_rows(g: torch.Tensor) -> torch.Tensor:
    return F.normalize(g, p=2, dim=1)


def sample_relation(features: torch.Tensor) -> torch.Tensor:
    """``normalize_rows(F F^T)`` ``[B, B]`` of features ``[B, ...]`` (similarity-preserving KD)."""
    flat = features.reshape(features.shape[0], -1).float()
    return _normalize_rows(flat @ flat.T)


def class_activation_gram(feature_map: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``normalize_rows(A A^T)`` ``[K, K]`` of the Grad-CAM maps of every class.

    Args:
        feature_map: ``[B, C, H, W]`` activations that ``logits`` were computed from (part of the
            autograd graph).
        logits: ``[B, K]``.

    ``A_k[b] = ReLU(sum_c alpha_kc[b] F_c[b])`` with ``alpha_kc[b]`` the spatial mean of
    ``d logits[b, k] / d F_c[b]``; ``A`` stacks the classes over ``B*H*W``. Samples do not interact
    in an eval-mode network, so one backward pass per class gives every sample's gradient.
    """
    if feature_map.ndim != 4:
        raise ShapeError(f"DisWOT needs a convolutional feature map [B, C, H, W], got {tuple(feature_map.shape)}",
                         "tap the last convolutional block (default: the model's `features` module)")
    maps = []
    for k in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), feature_map, retain_graph=True)
        alpha = grad.mean(dim=(2, 3), keepdim=True)                       # [B, C, 1, 1]
        maps.append(torch.relu((alpha * feature_map).sum(dim=1)).reshape(-1))  # [B*H*W]
    a = torch.stack(maps).detach().float()                                # [K, B*H*W]
    return _normalize_rows(a @ a.T)


def _features_and_logits(model: nn.Module, images: torch.Tensor, tap: str) -> tuple[torch.Tensor, torch.Tensor]:
    modules = dict(model.named_modules())
    if tap not in modules:
        raise ConfigError(f"the model has no module {tap!r} to tap for DisWOT",
                          f"pass tap= one of: {', '.join(n for n in modules if n)[:300]}")
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        captured.append(output)

    handle = modules[tap].register_forward_hook(hook)
    try:
        logits = model(images)
    finally:
        handle.remove()
    return captured[-1], logits


def diswot_score(teacher: nn.Module, student: nn.Module, images: torch.Tensor, *,
                 teacher_tap: str = "features", student_tap: str = "features") -> DisWOTScore:
    """DisWOT's two distances between ``teacher`` and ``student`` on one batch of ``images``.

    Both models are put in eval mode for the measurement (and restored); gradients flow only to
    compute Grad-CAM, no parameter is changed. ``*_tap`` names the module whose output is the last
    convolutional feature map (``ConvNet``/``TeacherCNN``: ``features``).
    """
    sems, rels = [], []
    for model, tap in ((teacher, teacher_tap), (student, student_tap)):
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                fmap, logits = _features_and_logits(model, images, tap)
                if not fmap.requires_grad:  # a frozen teacher: make the map a leaf that needs grad
                    raise ConfigError(f"the tapped map {tap!r} does not require grad, so Grad-CAM cannot be computed",
                                      "leave requires_grad on for the scoring pass (kdforge restores nothing else)")
                sems.append(class_activation_gram(fmap, logits))
                rels.append(sample_relation(fmap.detach()))
        finally:
            model.train(was_training)
    if sems[0].shape != sems[1].shape:
        raise ShapeError(f"teacher has {sems[0].shape[0]} classes, student {sems[1].shape[0]}",
                         "build the student with the teacher's number of classes")
    return DisWOTScore(semantic=float(torch.linalg.norm(sems[0] - sems[1])),
                       relation=float(torch.linalg.norm(rels[0] - rels[1])))


# -- the search space and the search ---------------------------------------------------------------


@dataclass(frozen=True)
class ConvNetSpace:
    """Students of :class:`kdforge.students.vision.ConvNet`: ``blocks`` conv blocks with widths from
    ``widths`` and one hidden layer from ``hidden`` (0 = a linear head), under ``max_params``."""

    widths: tuple[int, ...] = (4, 8, 12, 16, 24, 32)
    blocks: tuple[int, ...] = (1, 2, 3)
    hidden: tuple[int, ...] = (0, 32, 64)
    max_params: int | None = 20_000
    min_params: int = 0

    def kwargs(self, genes: tuple[int, ...]) -> dict[str, Any]:
        """ConvNet keyword arguments of ``genes = (hidden, c1, ..., cn)``."""
        hidden, *channels = genes
        return {"channels": list(channels), "hidden": [hidden] if hidden else []}

    def params(self, genes: tuple[int, ...]) -> int:
        from kdforge.students.vision import build_vision_model

        return sum(p.numel() for p in build_vision_model("convnet", **self.kwargs(genes)).parameters())

    def fits(self, genes: tuple[int, ...]) -> bool:
        n = self.params(genes)
        return n >= self.min_params and (self.max_params is None or n <= self.max_params)

    def sample(self, rng: random.Random) -> tuple[int, ...]:
        depth = rng.choice(self.blocks)
        return (rng.choice(self.hidden), *sorted(rng.choice(self.widths) for _ in range(depth)))

    def mutate(self, genes: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        """Change one gene: the hidden width, one block's width, or the depth (add/drop a block)."""
        hidden, *channels = genes
        move = rng.choice(("hidden", "width", "depth"))
        if move == "hidden":
            hidden = rng.choice([h for h in self.hidden if h != hidden] or [hidden])
        elif move == "width":
            i = rng.randrange(len(channels))
            channels[i] = rng.choice([w for w in self.widths if w != channels[i]] or [channels[i]])
        else:
            depths = [d for d in self.blocks if abs(d - len(channels)) == 1]
            if depths:
                d = rng.choice(depths)
                channels = channels[:d] if d < len(channels) else channels + [rng.choice(self.widths)]
        return (hidden, *channels)


@dataclass
class Candidate:
    """One scored student configuration."""

    genes: tuple[int, ...]
    kwargs: dict[str, Any]
    params: int
    semantic: float
    relation: float
    score: float
    history: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"genes": list(self.genes), "kwargs": self.kwargs, "params": self.params,
                "semantic": self.semantic, "relation": self.relation, "score": self.score}


def evolutionary_search(score_fn: Callable[[dict[str, Any]], DisWOTScore], space: ConvNetSpace, *,
                        population: int = 12, cycles: int = 40, sample_size: int = 4,
                        seed: int = 0, max_tries: int = 200) -> list[Candidate]:
    """Regularised evolution over ``space`` maximising ``score_fn(kwargs).score``.

    Starts from ``population`` random configurations that fit the budget; each cycle draws
    ``sample_size`` members, mutates the best of them (retrying until the child fits the budget and
    is new), scores it, appends it and drops the oldest member. Every configuration is scored once
    (a cache by genes). Returns every scored candidate, best first.
    """
    if population < 1 or sample_size < 1:
        raise ConfigError("population and sample_size must be at least 1", "e.g. population: 12, sample_size: 4")
    rng = random.Random(seed)
    scored: dict[tuple[int, ...], Candidate] = {}

    def evaluate(genes: tuple[int, ...]) -> Candidate:
        if genes not in scored:
            kwargs = space.kwargs(genes)
            s = score_fn(kwargs)
            scored[genes] = Candidate(genes, kwargs, space.params(genes), s.semantic, s.relation, s.score)
        return scored[genes]

    def draw(make: Callable[[], tuple[int, ...]]) -> tuple[int, ...] | None:
        for _ in range(max_tries):
            genes = make()
            if genes not in scored and space.fits(genes):
                return genes
        return None

    pop: list[Candidate] = []
    while len(pop) < population:
        genes = draw(lambda: space.sample(rng))
        if genes is None:
            break
        pop.append(evaluate(genes))
    if not pop:
        raise ConfigError(f"no configuration of the search space fits the parameter budget {space.min_params}.."
                          f"{space.max_params}", "widen max_params/min_params or the widths")
    for _ in range(cycles):
        parent = max(rng.sample(pop, min(sample_size, len(pop))), key=lambda c: c.score)
        genes = draw(lambda p=parent: space.mutate(p.genes, rng))
        if genes is None:
            continue
        pop.append(evaluate(genes))
        pop.pop(0)
    return sorted(scored.values(), key=lambda c: c.score, reverse=True)


def score_candidates(teacher: nn.Module, images: torch.Tensor, kwargs_list: Sequence[dict[str, Any]], *,
                     init_seed: int = 0, inits: int = 1) -> list[DisWOTScore]:
    """Score ConvNet students built from each ``kwargs`` (mean over ``inits`` random inits)."""
    from kdforge.students.vision import build_vision_model

    out = []
    for kwargs in kwargs_list:
        sem = rel = 0.0
        for i in range(inits):
            torch.manual_seed(init_seed + i)
            s = diswot_score(teacher, build_vision_model("convnet", **kwargs), images)
            sem, rel = sem + s.semantic / inits, rel + s.relation / inits
        out.append(DisWOTScore(sem, rel))
    return out
