"""``per_teacher: true``: one term per ensemble member, ``sum_s w_s loss(student, teacher_s)``,
against its definition (hand sums), its equivalences (forward KL: the mixture's gradient; one
member: the plain term), the causal-LM positions, refusals, and training."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.losses import forward_kl, reverse_kl
from kdforge.teachers import EnsembleTeacher, OnlineTeacher
from kdforge.train import (
    CausalLMTask,
    ClassificationTask,
    Distiller,
    LossTerm,
    Objective,
    TrainConfig,
)
from kdforge.train.tasks import attach_teacher

from ._tiny import MLP, ClassDataset, tiny_llama


def _members(n: int = 2) -> list[OnlineTeacher]:
    torch.manual_seed(3)
    return [OnlineTeacher(MLP(scale=2.0 + s).eval()) for s in range(n)]


def _batch() -> dict[str, torch.Tensor]:
    data = ClassDataset(n=12)
    return {"inputs": data.x, "labels": data.y}


def _value_and_grad(objective: Objective, teacher: EnsembleTeacher, student: MLP) -> tuple[float, list[torch.Tensor]]:
    student.zero_grad()
    out = attach_teacher(ClassificationTask(), student, teacher, _batch())
    value = objective(out, normalizer=12).total
    value.backward()
    return float(value), [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("weighting", ["fixed", "entropy"])
def test_per_teacher_is_the_weighted_sum_of_the_members_losses(weighting):
    members = _members()
    teacher = EnsembleTeacher(members, weighting, per_member_signals=True,
                              **({"weights": [0.7, 0.3]} if weighting == "fixed" else {}))
    student = MLP()
    out = attach_teacher(ClassificationTask(), student, teacher, _batch())
    got = Objective([LossTerm("reverse_kl", 1.0, per_teacher=True)])(out, normalizer=12).total
    x = _batch()["inputs"]
    q = student(x)
    w = teacher.last_weights  # [S, B]
    expected = sum((w[s] * reverse_kl(q, m.model(x), reduction="none")).sum() for s, m in enumerate(members)) / 12
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    mixture = Objective([LossTerm("reverse_kl", 1.0)])(out, normalizer=12).total
    assert abs(got.item() - mixture.item()) > 1e-4  # reverse KL is not linear in the teacher: the two differ


def test_forward_kl_per_teacher_has_the_mixtures_gradient():
    teacher = EnsembleTeacher(_members(), "entropy", per_member_signals=True)
    student = MLP()
    v_sum, g_sum = _value_and_grad(Objective([LossTerm("forward_kl", 1.0, per_teacher=True)]), teacher, student)
    v_mix, g_mix = _value_and_grad(Objective([LossTerm("forward_kl", 1.0)]), teacher, student)
    for a, b in zip(g_sum, g_mix, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert v_sum >= v_mix - 1e-6  # sum_s w_s KL(p_s||q) = KL(mix||q) + the members' Jensen gap >= 0


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "tvd"])
def test_an_ensemble_of_one_member_per_teacher_is_the_plain_term(loss):
    teacher = EnsembleTeacher(_members(1), per_member_signals=True)
    student = MLP()
    v1, g1 = _value_and_grad(Objective([LossTerm(loss, 1.0, per_teacher=True)]), teacher, student)
    v0, g0 = _value_and_grad(Objective([LossTerm(loss, 1.0)]), teacher, student)
    assert v1 == pytest.approx(v0, rel=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_causal_lm_members_are_weighted_per_sample_at_every_position():
    members = [OnlineTeacher(tiny_llama(s, head_scale=4.0)) for s in (1, 2)]
    teacher = EnsembleTeacher(members, "entropy", per_member_signals=True)
    student = tiny_llama(3)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = attach_teacher(CausalLMTask(), student, teacher, batch)
    assert [tuple(m.weights.shape) for m in out.signal.members] == [tuple(out.mask.shape)] * 2
    got = Objective([LossTerm("reverse_kl", 1.0, per_teacher=True)])(out, normalizer=12).total
    q = out.student_logits
    expected = sum((m.weights * reverse_kl(q, m.distribution, mask=out.mask, reduction="none")).sum()
                   for m in out.signal.members) / 12
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(out.signal.members[0].weights[:, 0], teacher.last_weights[0])


def test_refusals_name_the_fix():
    student = MLP()
    plain = EnsembleTeacher(_members())
    out = attach_teacher(ClassificationTask(), student, plain, _batch())
    with pytest.raises(ConfigError, match="per_member_signals=True"):
        Objective([LossTerm("reverse_kl", 1.0, per_teacher=True)])(out, normalizer=12)
    with pytest.raises(ValueError, match="does not read the teacher"):
        LossTerm("cross_entropy", 1.0, per_teacher=True)
    with pytest.raises(ConfigError, match="per_teacher"):
        Objective([LossTerm("forward_kl", 1.0, per_teacher=True)], chunked=True)._check_chunkable()
    assert not Objective([LossTerm("forward_kl", 1.0, per_teacher=True)])._chunkable_by_kernel()


def test_training_with_per_teacher_terms_moves_the_student_toward_both_members():
    torch.manual_seed(0)
    members = _members()
    teacher = EnsembleTeacher(members, per_member_signals=True)
    student = MLP()
    data = ClassDataset()
    cfg = TrainConfig(max_steps=40, batch_size=8, lr=1e-2, progress=False, log_every=1, scheduler="constant")
    x = data.x

    def gap() -> float:
        with torch.no_grad():
            q = student(x)
            return float(sum(forward_kl(q, m.model(x)) for m in members))

    before = gap()
    Distiller(student, teacher, task=ClassificationTask(), config=cfg, train_data=data,
              objective=[LossTerm("reverse_kl", 1.0, per_teacher=True)]).train()
    assert gap() < 0.7 * before
