"""HARD augmentations: the family by definition, the search raises teacher-student disagreement,
the learned net stays in range and only trains itself, and distillation with HARD trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge.errors import ConfigError
from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig
from kdforge.train.hard import (
    FamilyRanges,
    HardAugmentNet,
    HardLearnedTransform,
    HardSearchTransform,
    apply_family,
    disagreement,
    save_augmentation_grid,
)
from kdforge.train.transforms import StepContext


def _net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(width * 16, 5))


def _images(n: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 8, 8)
    x[:, :, 2:6, 2:6] = 1.0 + torch.rand(n, 1, 4, 4, generator=g)  # a bright square off-centre by noise
    return x + 0.1 * torch.randn(n, 1, 8, 8, generator=g)


def test_family_identity_translation_and_photometry_by_definition():
    x = torch.rand(3, 1, 8, 8)
    theta = torch.zeros(3, 6)
    assert torch.allclose(apply_family(x, theta), x, atol=1e-5)
    shift = theta.clone()
    shift[:, 1] = 2.0 / 8  # one pixel in affine_grid units: x'(i, j) = x(i, j + 1)
    out = apply_family(x, shift)
    assert torch.allclose(out[..., :, :-1], x[..., :, 1:], atol=1e-5)
    photo = theta.clone()
    photo[:, 4], photo[:, 5] = 0.5, torch.log(torch.tensor(2.0))
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(apply_family(x, photo), (x - mu) * 2.0 + mu + 0.5, atol=1e-5)
    rot = theta.clone()
    rot[:, 0] = 90.0  # a quarter turn of a square grid is a permutation of its pixels
    assert torch.allclose(apply_family(x, rot).sort(-1).values.sum(), x.sum(), rtol=1e-4)


def test_disagreement_is_the_per_row_kl():
    t, s = torch.randn(4, 5), torch.randn(4, 5)
    pt = t.softmax(-1)
    expected = (pt * (pt.log() - s.log_softmax(-1))).sum(-1)
    assert torch.allclose(disagreement(t, s), expected, atol=1e-6)
    assert torch.allclose(disagreement(t, t), torch.zeros(4), atol=1e-6)


def test_search_raises_the_measured_disagreement_over_identity_and_random_draws():
    teacher, student = _net(8, 0), _net(4, 1)
    x = _images()
    search = HardSearchTransform(teacher, candidates=16, include_identity=False, seed=0)
    theta, score, clean = search.search(x, teacher, student)
    again = disagreement(teacher(apply_family(x, theta)), student(apply_family(x, theta)))
    assert torch.allclose(score, again, atol=1e-5)  # the reported score is the augmented images' D
    assert score.mean() > 1.3 * clean.mean()  # the searched transforms raise D well above the clean images'
    random_draw = HardSearchTransform(teacher, candidates=1, include_identity=False, seed=0)
    assert score.mean() > random_draw.search(x, teacher, student)[1].mean()  # and above one random draw
    bounds = FamilyRanges().bounds()
    assert (theta.abs() <= bounds + 1e-6).all()
    ascended = HardSearchTransform(teacher, candidates=16, include_identity=False, ascent_steps=3, seed=0)
    theta2, score2, _ = ascended.search(x, teacher, student)
    assert (score2 >= score - 1e-5).all() and score2.mean() > score.mean()  # ascent keeps the best, climbs
    assert (theta2.abs() <= bounds + 1e-6).all()


def test_transform_rewrites_a_fraction_of_rows_and_leaves_models_untouched():
    teacher, student = _net(8, 0), _net(4, 1)
    student.train()
    x, y = _images(10), torch.arange(10) % 5
    t = HardSearchTransform(teacher, fraction=0.5, seed=3)
    out = t({"inputs": x, "labels": y}, StepContext(4, 0, student, None))
    changed = (out["inputs"] != x).flatten(1).any(1)
    assert set(changed.nonzero().squeeze(1).tolist()) <= set(t.last["rows"].tolist()) and len(t.last["rows"]) == 5
    assert torch.equal(out["labels"], y) and student.training
    assert all(p.grad is None for p in student.parameters())
    again = HardSearchTransform(teacher, fraction=0.5, seed=3)({"inputs": x, "labels": y}, StepContext(4, 0, student, None))
    assert torch.equal(again["inputs"], out["inputs"])  # (seed, step, micro) decide
    with pytest.raises(ConfigError, match="cached teacher"):
        t({"inputs": x, "teacher_logits": torch.zeros(10, 5)}, StepContext(0, 0, student, None))
    with pytest.raises(ConfigError, match="live teacher"):
        HardSearchTransform()({"inputs": x}, StepContext(0, 0, student, None))


def test_augmentation_net_stays_in_range_and_starts_as_identity():
    net = HardAugmentNet(1, value_range=(-0.5, 1.5), eps=0.5)
    x = _images(6).clamp(-0.5, 1.5)
    out, theta, residual = net(x)
    assert torch.allclose(out, x, atol=1e-5) and theta.abs().max() == 0  # zero-initialised heads
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 5.0)  # an extreme adversary
    out, theta, residual = net(10 * torch.randn(6, 1, 8, 8))
    assert out.min() >= -0.5 and out.max() <= 1.5
    assert (theta.abs() <= FamilyRanges().bounds() + 1e-6).all() and residual.abs().max() <= 0.5


def test_learned_adversary_raises_disagreement_and_trains_only_itself():
    teacher, student = _net(8, 0), _net(4, 1)
    x = _images(32)
    torch.manual_seed(0)
    t = HardLearnedTransform(HardAugmentNet(1, width=8, value_range=(-1.0, 3.0)), teacher, lr=0.05, realism_weight=0.01,
                             fraction=1.0)
    first = t.adversary_step(x, teacher, student)["disagreement"]
    for _ in range(30):
        last = t.adversary_step(x, teacher, student)["disagreement"]
    assert last > 1.5 * first
    assert all(p.grad is None for p in list(student.parameters()) + list(teacher.parameters()))
    out = t({"inputs": x}, StepContext(0, 0, student, None))
    assert out["inputs"].min() >= -1.0 and out["inputs"].max() <= 3.0
    state = t.state_dict()
    other = HardLearnedTransform(HardAugmentNet(1, width=8, value_range=(-1.0, 3.0)), teacher, lr=0.05)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.net.state_dict().values(), t.net.state_dict().values()))


@pytest.mark.parametrize("learned", [False, True])
def test_distillation_with_hard_moves_the_student_toward_the_teacher(tmp_path, learned):
    teacher, student = _net(8, 0), _net(4, 1)
    teacher.eval()
    x = _images(64, seed=5)
    data = [{"inputs": x[i], "labels": torch.tensor(-100)} for i in range(64)]
    probe = _images(64, seed=9)

    def kl() -> float:
        with torch.no_grad():
            return float(disagreement(teacher(probe), student(probe)).mean())

    before = kl()
    transform = (HardLearnedTransform(HardAugmentNet(1, width=8, value_range=(-1.0, 3.0)), lr=1e-2) if learned
                 else HardSearchTransform(candidates=4))
    cfg = TrainConfig(max_steps=40, batch_size=16, lr=1e-2, seed=0, progress=False, log_every=100)
    Distiller(student, teacher, task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)], config=cfg,
              train_data=data, transforms=[transform]).train()
    assert kl() < 0.5 * before
    png = save_augmentation_grid(x, (lambda b: transform.net.eval()(b)[0]) if learned else x.flip(-1),
                                 tmp_path / "grid.png", columns=4)
    assert png.stat().st_size > 1000


def test_learned_adversary_waits_for_its_warmup():
    teacher, student = _net(8, 0), _net(4, 1)
    x = _images(8)
    t = HardLearnedTransform(HardAugmentNet(1, width=4, value_range=(-1.0, 3.0)), teacher, warmup_steps=5, fraction=1.0)
    before = [p.clone() for p in t.net.parameters()]
    assert t({"inputs": x}, StepContext(4, 0, student, None))["inputs"] is x and t.last is None
    assert all(torch.equal(a, b) for a, b in zip(before, t.net.parameters()))
    t({"inputs": x}, StepContext(5, 0, student, None))
    assert t.last is not None and not all(torch.equal(a, b) for a, b in zip(before, t.net.parameters()))


def test_noise_inputs_give_one_image_several_transforms():
    teacher, student = _net(8, 0), _net(4, 1)
    x = _images(16)
    net = HardAugmentNet(1, width=4, value_range=(-1.0, 3.0), noise_dim=3)
    assert torch.allclose(net(x, torch.randn(16, 3))[0], x, atol=1e-5)  # still the identity at init
    t = HardLearnedTransform(net, teacher, lr=0.05, realism_weight=0.01, fraction=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        t.adversary_step(x, teacher, student, t.noise(16, g))
    same = x[:1].repeat(8, 1, 1, 1)
    theta = net.params(same, t.noise(8, g))
    assert theta.std(0).max() > 1e-3  # the same image, different noise: different parameters
    out = t({"inputs": x}, StepContext(0, 0, student, None))["inputs"]
    assert out.min() >= -1.0 and out.max() <= 3.0
