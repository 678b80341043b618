"""The bilevel meta-learner of trilateral KD's ratio network and its Distiller (kdforge.train.trilateral_meta)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge.errors import ConfigError
from kdforge.losses import TrilateralBilevel, TrilateralFusion
from kdforge.losses.trilateral_bilevel import network_ratios
from kdforge.train import (
    Callback,
    ClassificationTask,
    LossTerm,
    Objective,
    TrainConfig,
    TrilateralBilevelDistiller,
    TrilateralMetaLearner,
)
from kdforge.train.trilateral_meta import split_holdout

C, D = 4, 10


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(C, D, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, C, (n,), generator=g)
    return means[y] + torch.randn(n, D, generator=g), y


def _mean_ratio(lookahead: str, *, teacher_right: bool, noisy_labels: bool) -> tuple[float, float]:
    """Mean ratio on a fixed batch before and after 30 meta steps (a fixed linear student)."""
    torch.manual_seed(0)
    student = nn.Linear(D, C)
    fusion = TrilateralFusion(C)
    x, y_true = _clusters(128, 1)
    g = torch.Generator().manual_seed(2)
    flip = torch.rand(len(y_true), generator=g) < 0.6
    y = torch.where(flip & noisy_labels, torch.randint(0, C, y_true.shape, generator=g), y_true)
    teacher = 6.0 * nn.functional.one_hot(y_true if teacher_right else (y_true + 1) % C, C).float()
    learner = TrilateralMetaLearner(fusion, TrilateralBilevel(lookahead=lookahead, meta_lr=0.05, inner_lr=0.5),
                                    temperature=2.0, holdout=_clusters(200, 3))
    ratio = lambda: float(network_ratios(fusion, student(x).detach(), teacher, y).detach().mean())  # noqa: E731
    before = ratio()
    for _ in range(30):
        learner.step(student, x, teacher, y)
    return before, ratio()


@pytest.mark.parametrize("lookahead", ["head", "all"])
def test_a_right_teacher_with_noisy_labels_raises_the_ratio_and_a_wrong_teacher_lowers_it(lookahead):
    before, after = _mean_ratio(lookahead, teacher_right=True, noisy_labels=True)
    assert before == pytest.approx(0.5, abs=1e-6) and after > 0.6
    before, after = _mean_ratio(lookahead, teacher_right=False, noisy_labels=False)
    assert after < 0.4


def test_split_holdout_is_class_balanced_disjoint_and_keeps_unlabelled_samples():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 1 + [-100] * 5)
    keep, held = split_holdout(labels, 0.2, seed=0)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[held], minlength=3).tolist() == [4, 2, 0]  # a 1-sample class stays in training
    assert (labels[keep] == -100).sum() == 5
    assert torch.equal(held, split_holdout(labels, 0.2, seed=0)[1])
    with pytest.raises(ConfigError, match="holdout: batch"):
        split_holdout(torch.tensor([0, 1, -100]), 0.5)
    with pytest.raises(ConfigError, match="holdout=\\(inputs, labels\\)"):
        TrilateralMetaLearner(TrilateralFusion(C), {"holdout": "split"})


def _distill(holdout: str, lookahead: str, steps: int = 40):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    fusion = TrilateralFusion(C)
    settings = TrilateralBilevel(lookahead=lookahead, holdout=holdout, meta_lr=0.02)
    x, y = _clusters(192, 4)
    teacher = 4.0 * nn.functional.one_hot(y, C).float()
    data = [{"inputs": x[i], "labels": y[i], "teacher_logits": teacher[i]} for i in range(len(y))]
    held = None
    if holdout == "split":
        keep, out = split_holdout(y, 0.25)
        held, data = (x[out], y[out]), [data[i] for i in keep.tolist()]
    learner = TrilateralMetaLearner(fusion, settings, temperature=2.0, holdout=held)
    objective = Objective([LossTerm(name="trilateral_kd", weight=1.0,
                                    params={"fusion": fusion, "temperature": 2.0, "bilevel": settings})])
    phi = [p.detach().clone() for p in fusion.parameters()]
    distiller = TrilateralBilevelDistiller(
        student, None, task=ClassificationTask(), objective=objective, train_data=data,
        extra_modules={"fusion": fusion}, learners=[learner],
        config=TrainConfig(max_steps=steps, batch_size=32, lr=1e-2, progress=False, log_every=1))
    losses: list[float] = []

    class Losses(Callback):
        def on_step_end(self, state, logs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    distiller.callbacks.append(Losses())
    distiller.train()
    return losses, learner, phi, fusion


@pytest.mark.parametrize(("holdout", "lookahead"), [("split", "head"), ("batch", "all")])
def test_bilevel_distillation_trains_the_student_and_the_ratio_network(holdout, lookahead):
    losses, learner, phi, fusion = _distill(holdout, lookahead)
    assert len(learner.history) == 40  # one meta step per training micro-batch
    assert losses[-1] < 0.5 * losses[0]  # the student learned
    assert any(not torch.equal(a, b) for a, b in zip(phi, fusion.parameters()))  # the meta step moved phi
    assert all(m == m for m in (h["meta_loss"] for h in learner.history))  # every step had a held-out batch


def test_the_distiller_refuses_a_non_classification_task():
    from kdforge.train import CausalLMTask

    fusion = TrilateralFusion(C)
    learner = TrilateralMetaLearner(fusion, {"holdout": "batch"})
    with pytest.raises(ConfigError, match="ClassificationTask"):
        TrilateralBilevelDistiller(nn.Linear(D, C), None, task=CausalLMTask(), learners=[learner],
                                   objective=Objective([LossTerm(name="cross_entropy", weight=1.0)]),
                                   train_data=[{"input_ids": torch.zeros(4, dtype=torch.long)}],
                                   config=TrainConfig(max_steps=1, batch_size=1, progress=False))


class _Crash(RuntimeError):
    pass


def _resumable(out_dir, callbacks=()):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    fusion = TrilateralFusion(C)
    settings = TrilateralBilevel(lookahead="head", holdout="split", holdout_batch_size=16, meta_lr=0.02)
    x, y = _clusters(96, 5)
    keep, out = split_holdout(y, 0.25)
    teacher = 4.0 * nn.functional.one_hot(y, C).float()
    data = [{"inputs": x[i], "labels": y[i], "teacher_logits": teacher[i]} for i in keep.tolist()]
    learner = TrilateralMetaLearner(fusion, settings, temperature=2.0, holdout=(x[out], y[out]), seed=3)
    objective = Objective([LossTerm(name="trilateral_kd", weight=1.0,
                                    params={"fusion": fusion, "temperature": 2.0, "bilevel": settings})])
    return TrilateralBilevelDistiller(
        student, None, task=ClassificationTask(), objective=objective, train_data=data, callbacks=callbacks,
        extra_modules={"fusion": fusion}, learners=[learner],
        config=TrainConfig(max_steps=8, batch_size=16, lr=1e-2, progress=False, log_every=1, save_every=3,
                           output_dir=str(out_dir), seed=1)), fusion


def test_a_resumed_bilevel_run_ends_equal_to_an_uninterrupted_one(tmp_path):
    class CrashAt5(Callback):
        def on_step_end(self, state, logs):
            if state.step == 5:
                raise _Crash("simulated crash")

    ref, ref_fusion = _resumable(tmp_path / "ref")
    ref.train()
    crashed, _ = _resumable(tmp_path / "run", callbacks=[CrashAt5()])
    with pytest.raises(_Crash):
        crashed.train()
    resumed, fusion = _resumable(tmp_path / "run")
    assert resumed.train(resume=True).step == 8
    for a, b in zip([*ref.unwrapped_student.parameters(), *ref_fusion.parameters()],
                    [*resumed.unwrapped_student.parameters(), *fusion.parameters()]):
        assert torch.equal(a, b)
    assert len(resumed.learners[0].history) == 8  # the meta steps before the checkpoint are counted


def test_a_live_teacher_is_queried_once_per_batch_for_the_meta_step_and_the_student_step():
    """The meta step's teacher signal is replayed to the student's step (same logits, one forward)."""
    torch.manual_seed(0)
    x, y = _clusters(64, 6)
    teacher = nn.Linear(D, C)
    calls = []
    teacher.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    fusion = TrilateralFusion(C)
    settings = TrilateralBilevel(lookahead="head", holdout="batch", meta_lr=0.02)
    objective = Objective([LossTerm(name="trilateral_kd", weight=1.0,
                                    params={"fusion": fusion, "temperature": 2.0, "bilevel": settings})])
    distiller = TrilateralBilevelDistiller(
        nn.Linear(D, C), teacher, task=ClassificationTask(), objective=objective,
        train_data=[{"inputs": x[i], "labels": y[i]} for i in range(64)], extra_modules={"fusion": fusion},
        learners=[TrilateralMetaLearner(fusion, settings, temperature=2.0)],
        config=TrainConfig(max_steps=4, batch_size=16, lr=1e-2, progress=False, log_every=1))
    distiller.train()
    assert calls == [16] * 4  # one teacher forward per training batch, not two
    assert distiller.teacher_source is not None and type(distiller.teacher_source).__name__ != "_Replay"
