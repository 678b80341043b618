"""EMA self-distillation through the trainer: the SelfTeacher source is updated after every optimizer step."""

from __future__ import annotations

import copy

import torch

from kdforge.teachers.sources import SelfTeacher
from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig

from ._tiny import TokenDataset, pad_collate, tiny_llama


def _train(decay: float, steps: int = 3):
    student = tiny_llama(2)
    init = copy.deepcopy(student.state_dict())
    source = SelfTeacher(student, mode="ema", decay=decay)
    d = Distiller(student, source, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("cross_entropy", 1.0), LossTerm("forward_kl", 1.0)],
                  config=TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, progress=False, log_every=1),
                  train_data=TokenDataset(n=8))
    state = d.train()
    return d.unwrapped_student.state_dict(), source, init, state


def test_decay_zero_teacher_is_the_student_after_every_update():
    final, source, init, state = _train(0.0)
    assert source.updates == 3
    teacher = source.model.state_dict()
    assert all(torch.equal(teacher[k], final[k]) for k in final)
    assert any(not torch.equal(init[k], final[k]) for k in final)  # the student did move


def test_decay_one_teacher_stays_the_initial_student_while_the_student_trains():
    final, source, init, _ = _train(1.0)
    teacher = source.model.state_dict()
    assert all(torch.equal(teacher[k], init[k]) for k in init)
    assert any(not torch.equal(init[k], final[k]) for k in final)


def test_the_first_step_distils_from_an_identical_copy_so_its_kl_is_zero():
    _, _, _, state = _train(0.9, steps=1)
    assert state.last_logs["loss/forward_kl"] == 0.0
