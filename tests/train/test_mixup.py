"""Mixup-KD: the teacher labels the mixed input; inputs mixed as defined; seeded; trains."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig
from kdforge.train.mixup import MixupTransform
from kdforge.train.transforms import StepContext

from ._tiny import MLP, ClassDataset


def _ctx(step=0, micro=0):
    return StepContext(step=step, micro=micro, student=None, teacher=None)


def test_mixup_mixes_inputs_by_definition_and_is_seeded():
    x = torch.randn(6, 8)
    y = torch.arange(6)
    t = MixupTransform(alpha=0.4, seed=3)
    out = t({"inputs": x, "labels": y}, _ctx(5, 1))
    lam, perm = t.last.lam, t.last.perm
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(6))
    assert torch.allclose(out["inputs"], lam * x + (1 - lam) * x[perm])
    assert torch.equal(out["labels"], y if lam >= 0.5 else y[perm])
    again = MixupTransform(alpha=0.4, seed=3)({"inputs": x, "labels": y}, _ctx(5, 1))
    assert torch.equal(again["inputs"], out["inputs"])  # (seed, step, micro) decide: exact resume


def test_cutmix_pastes_a_box_and_lam_is_its_complement():
    x = torch.zeros(4, 1, 10, 10)
    x[:, 0] = torch.arange(4).view(4, 1, 1).float()
    t = MixupTransform(alpha=1.0, mode="cutmix", seed=1)
    out = t({"inputs": x}, _ctx(2))
    top, bottom, left, right = t.last.box
    pasted = (out["inputs"] != x).float().flatten(1).sum(1)
    moved = (t.last.perm != torch.arange(4))
    assert torch.all(pasted[moved] == (bottom - top) * (right - left))
    assert t.last.lam == pytest.approx(1 - (bottom - top) * (right - left) / 100)


def test_refuses_a_cached_teacher_and_bad_settings():
    with pytest.raises(ConfigError, match="cached teacher"):
        MixupTransform()({"inputs": torch.zeros(2, 3), "teacher_logits": torch.zeros(2, 3)}, _ctx())
    with pytest.raises(ConfigError):
        MixupTransform(alpha=0)


def _distiller(transforms, steps=6):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=1e-2, progress=False, log_every=1, seed=1)
    return Distiller(MLP(), MLP(scale=3.0), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                     config=cfg, train_data=ClassDataset(n=48), transforms=transforms)


def test_the_teacher_target_is_the_teacher_on_the_mixed_input():
    mix = MixupTransform(alpha=1.0, seed=2)
    d = _distiller([mix])
    raw = d.stream.next()  # the unmixed batch the trainer would draw first
    d.stream.reset()
    d.state.epoch = d.state.batch_in_epoch = 0
    (batch,) = d.next_micro_batches()
    out = d.task_output(batch)
    teacher = d.teacher_source.modules()[0]
    with torch.no_grad():
        on_mixed = teacher(batch["inputs"])
        mixed_labels = mix.last.lam * teacher(raw["inputs"]) + (1 - mix.last.lam) * teacher(raw["inputs"][mix.last.perm])
    assert torch.allclose(batch["inputs"], mix.last.lam * raw["inputs"] + (1 - mix.last.lam) * raw["inputs"][mix.last.perm])
    assert torch.allclose(out.teacher, on_mixed)
    assert not torch.allclose(out.teacher, mixed_labels, atol=1e-3)  # not the mixture of the teacher's outputs


def test_training_with_mixup_lowers_the_kd_loss():
    d = _distiller([MixupTransform(alpha=1.0, seed=0)], steps=30)
    before = d.evaluate(ClassDataset(n=48))["eval/kl_to_teacher"]
    d.train()
    assert d.evaluate(ClassDataset(n=48))["eval/kl_to_teacher"] < before
