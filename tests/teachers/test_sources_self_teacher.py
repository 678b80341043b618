"""SelfTeacher: EMA endpoints (decay 1 and 0) are exact, the EMA formula, snapshots every N steps,
bit-exact resume through state_dict, and the signal is an OnlineTeacher's over the copy."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from kdforge.errors import CheckpointError, ConfigError, ShapeError
from kdforge.teachers import OnlineTeacher, SelfTeacher

from ._standin_task import CausalLMTask, ClassifierTask
from .conftest import tiny_llama

TASK = CausalLMTask()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _train(student, teacher, steps: int, start: int = 1, lr: float = 0.05):
    """``steps`` SGD steps on a next-token loss, calling ``teacher.on_step_end`` after each."""
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    for step in range(start, start + steps):
        batch = _batch(step)
        logits = student(**TASK.model_inputs(batch)[1]).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), batch["input_ids"][:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.on_step_end(student, step)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_decay_one_keeps_the_initial_model_bit_for_bit():
    student = tiny_llama()
    initial = copy.deepcopy(student)
    teacher = SelfTeacher(student, decay=1.0)
    _train(student, teacher, 3)
    assert not _same(student, initial)  # the student did move
    assert _same(teacher.model, initial)
    assert teacher.updates == 3 and teacher.last_step == 3


def test_decay_zero_equals_the_current_student():
    student = tiny_llama()
    teacher = SelfTeacher(student, decay=0.0)
    _train(student, teacher, 3)
    assert _same(teacher.model, student)


def test_ema_follows_the_formula_on_every_parameter():
    student = tiny_llama()
    teacher = SelfTeacher(student, decay=0.75)
    before = {k: v.clone() for k, v in teacher.model.named_parameters()}
    _train(student, teacher, 1)
    for name, p in teacher.model.named_parameters():
        expected = 0.75 * before[name] + 0.25 * dict(student.named_parameters())[name].detach()
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-7)
    # a derived, non-persistent buffer (rotary inv_freq) is copied, not averaged
    for (name, b), (_, s) in zip(teacher.model.named_buffers(), student.named_buffers(), strict=True):
        assert torch.equal(b, s), name


def test_ema_every_n_steps_updates_only_on_multiples():
    student = tiny_llama()
    teacher = SelfTeacher(student, decay=0.0, every=2)
    _train(student, teacher, 1)
    assert teacher.updates == 0 and not _same(teacher.model, student)
    _train(student, teacher, 1, start=2)
    assert teacher.updates == 1 and _same(teacher.model, student)


def test_snapshot_refreshes_every_n_steps_and_on_refresh():
    student = tiny_llama()
    initial = copy.deepcopy(student)
    teacher = SelfTeacher(student, mode="snapshot", every=2)
    _train(student, teacher, 1)
    assert _same(teacher.model, initial)
    _train(student, teacher, 1, start=2)
    assert _same(teacher.model, student)
    at_two = copy.deepcopy(student)
    _train(student, teacher, 1, start=3)
    assert _same(teacher.model, at_two)
    teacher.refresh(student)  # e.g. from an epoch-end callback
    assert _same(teacher.model, student) and teacher.updates == 2


def test_snapshot_without_every_refreshes_only_on_demand():
    student = tiny_llama()
    initial = copy.deepcopy(student)
    teacher = SelfTeacher(student, mode="snapshot")
    _train(student, teacher, 2)
    assert teacher.every is None and _same(teacher.model, initial)


def _through_a_checkpoint(state):
    """What the trainer's checkpoint does with a source state: tensors as safetensors, the rest as JSON."""
    from kdforge.train.checkpoint import state_dict_from_bytes, state_dict_to_bytes
    from kdforge.train.persistence import _split_state

    tensors, meta = _split_state(state)
    return {**json.loads(json.dumps(meta)), **state_dict_from_bytes(state_dict_to_bytes(tensors))}


def test_state_dict_round_trip_resumes_bit_exactly():
    student = tiny_llama()
    teacher = SelfTeacher(student, decay=0.9)
    _train(student, teacher, 3)
    state = teacher.state_dict()
    saved = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    assert set(saved) == {f"model.{k}" for k in teacher.model.state_dict()}  # flat: the checkpoint's format
    student_state = copy.deepcopy(student.state_dict())

    # the uninterrupted run continues two steps
    _train(student, teacher, 2, start=4)
    for k, v in saved.items():  # a saved state is a copy: later steps do not change it
        assert torch.equal(state[k], v)

    # the resumed run: a fresh student from its checkpoint, a fresh SelfTeacher, then the saved state
    resumed_student = tiny_llama(seed=123)
    resumed_student.load_state_dict(student_state)
    resumed = SelfTeacher(resumed_student, decay=0.9)
    resumed.load_state_dict(_through_a_checkpoint(state))
    assert resumed.updates == 3 and resumed.last_step == 3
    assert all(torch.equal(resumed.model.state_dict()[k[len("model."):]], v) for k, v in saved.items())
    _train(resumed_student, resumed, 2, start=4)
    assert _same(resumed.model, teacher.model) and resumed.updates == teacher.updates == 5


def test_weights_of_another_architecture_are_a_checkpoint_error():
    state = SelfTeacher(tiny_llama(hidden=16)).state_dict()
    with pytest.raises(CheckpointError, match="student architecture"):
        SelfTeacher(tiny_llama()).load_state_dict(state)


def test_state_of_another_mode_is_refused():
    student = tiny_llama()
    with pytest.raises(CheckpointError, match="snapshot"):
        SelfTeacher(student).load_state_dict(SelfTeacher(student, mode="snapshot").state_dict())


def test_signal_is_dense_logits_like_an_online_teacher_over_the_copy():
    student = tiny_llama()
    teacher = SelfTeacher(student, decay=0.5)
    _train(student, teacher, 2)
    batch = _batch(9)
    signal = teacher.signal(batch, TASK)
    ref = OnlineTeacher(copy.deepcopy(teacher.model)).signal(batch, TASK)
    assert signal.kind == "dense" and signal.logits.shape == (2, 9, 256)
    assert torch.equal(signal.logits, ref.logits) and not signal.logits.requires_grad
    assert teacher.provides == frozenset({"dense", "features"}) and teacher.scores_new_samples


def test_the_copy_is_frozen_in_eval_mode_and_the_student_is_untouched():
    student = tiny_llama().train()
    teacher = SelfTeacher(student)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.modules() == [teacher.model]
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(student.parameters(), teacher.model.parameters(),
                                                            strict=True))


def test_batchnorm_running_stats_are_averaged_and_counters_copied():
    student = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    teacher = SelfTeacher(student, decay=0.5)
    student.train()
    student(torch.randn(8, 4))  # updates running stats, num_batches_tracked = 1
    teacher.on_step_end(student, 1)
    bn_t, bn_s = teacher.model[1], student[1]
    torch.testing.assert_close(bn_t.running_mean, 0.5 * bn_s.running_mean, rtol=0, atol=1e-7)  # from zeros
    assert int(bn_t.num_batches_tracked) == 1
    out = teacher.signal({"inputs": torch.randn(5, 4)}, ClassifierTask())
    assert out.logits.shape == (5, 3)


def test_misuse_is_a_clear_error():
    student = tiny_llama()
    with pytest.raises(ConfigError, match="mode"):
        SelfTeacher(student, mode="swa")
    with pytest.raises(ConfigError, match="decay"):
        SelfTeacher(student, decay=1.5)
    with pytest.raises(ConfigError, match="every"):
        SelfTeacher(student, every=0)
    teacher = SelfTeacher(student)
    with pytest.raises(ShapeError, match="unwrapped student"):
        teacher.on_step_end(nn.Linear(2, 2), 1)


def test_works_with_the_trainers_causal_lm_task():
    from kdforge.train.tasks import CausalLMTask as RealTask

    student = tiny_llama()
    teacher = SelfTeacher(student, decay=0.5)
    batch = _batch(2)
    assert torch.equal(teacher.signal(batch, RealTask()).logits, OnlineTeacher(student).signal(batch, RealTask()).logits)


class _CrashAt:
    """A trainer callback raising after optimizer step ``step`` (a simulated crash)."""

    def __new__(cls, step):
        from kdforge.train import Callback

        class CrashAt(Callback):
            def on_step_end(self, state, logs):
                if state.step == step:
                    raise RuntimeError(f"simulated crash after step {state.step}")

        return CrashAt()


def _distiller(out_dir, teacher_kind: str, callbacks=()):
    from tests.train._tiny import MLP, ClassDataset

    from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig

    torch.manual_seed(123)
    student, other = MLP(dropout=0.3), MLP(scale=3.0)
    teacher = SelfTeacher(student, decay=0.8)
    if teacher_kind == "ensemble":
        from kdforge.teachers import EnsembleTeacher

        teacher = EnsembleTeacher([other, teacher], weighting="entropy")
    cfg = TrainConfig(max_steps=8, batch_size=5, grad_accum_steps=2, lr=1e-2, progress=False, log_every=1,
                      save_every=3, keep_last=2, output_dir=str(out_dir), seed=7)
    return Distiller(student, teacher, task=ClassificationTask(),
                     objective=[LossTerm("forward_kl", 1.0), LossTerm("cross_entropy", 0.5)],
                     config=cfg, train_data=ClassDataset(n=23), callbacks=list(callbacks))


@pytest.mark.parametrize("teacher_kind", ["self", "ensemble"])
def test_a_crashed_and_resumed_run_with_a_self_teacher_is_bit_exact(tmp_path, teacher_kind):
    ref = _distiller(tmp_path / "ref", teacher_kind)
    ref.train()
    crashed = _distiller(tmp_path / "run", teacher_kind, callbacks=[_CrashAt(5)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    resumed = _distiller(tmp_path / "run", teacher_kind)
    assert resumed.train(resume=True).step == 8

    def self_source(d):
        src = d.teacher_source
        return src if isinstance(src, SelfTeacher) else src.sources[1]

    def ema(d):
        return self_source(d).model

    assert self_source(ref).updates == self_source(resumed).updates == 8  # the trainer calls on_step_end
    assert _same(ref.unwrapped_student, resumed.unwrapped_student)
    assert _same(ema(ref), ema(resumed)) and not _same(ema(ref), ref.unwrapped_student)
    assert ema(resumed).training is False
