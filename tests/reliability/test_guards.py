"""Guard rails of the training step (kdforge.train.guards): no silent no-ops, no non-finite update.

* an empty micro-batch (every label ignored) is skipped and counted, a step made only of empty
  micro-batches makes no update and is not counted, and data with nothing to train on stops with a
  DataError (first N micro-batches, or a whole epoch);
* a weighted term stuck at exactly 0 is reported once;
* a NaN loss or gradient stops the step naming the term, step and micro-batch, or is skipped with
  ``on_nonfinite: skip`` (weights and optimizer moments untouched, a cap on skips in a row), and
  the last checkpoint stays finite and resumable.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from kdforge.errors import DataError, NonFiniteError
from kdforge.train import CausalLMTask, ClassificationTask, Distiller, TrainConfig
from kdforge.train.checkpoint import LoadedCheckpoint, latest_checkpoint
from kdforge.train.sampler import EpochSampler

from ._corpus import MLP, Rows, tiny_llama

SEQ = 8


class LabelledTokens(torch.utils.data.Dataset):
    """Token rows whose labels are all ``-100`` for the rows in ``ignored``."""

    def __init__(self, n: int = 8, ignored: range | set[int] = frozenset()) -> None:
        self.ids = torch.randint(3, 256, (n, SEQ), generator=torch.Generator().manual_seed(0))
        self.ignored = set(ignored)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = torch.full_like(self.ids[i], -100) if i in self.ignored else self.ids[i].clone()
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def lm(data: LabelledTokens, *, steps: int = 3, accum: int = 1, **cfg) -> Distiller:
    torch.manual_seed(0)
    config = TrainConfig(max_steps=steps, batch_size=2, grad_accum_steps=accum, progress=False, lr=1e-2, **cfg)
    return Distiller(tiny_llama(seed=1), None, task=CausalLMTask(), objective=[{"name": "cross_entropy", "weight": 1.0}],
                     config=config, train_data=data, sampler=EpochSampler(len(data), shuffle=False))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- empty micro-batches --------------------------------------------------------------------
def test_an_empty_micro_batch_is_skipped_counted_and_leaves_the_update_unchanged(caplog):
    """Rows 2-3 (micro-batch 1 of step 1) have no labels: the step's update equals the update
    from micro-batch 0 alone, and the skip is counted and logged."""
    d = lm(LabelledTokens(8, ignored={2, 3}), steps=1, accum=2)
    ref = lm(LabelledTokens(8), steps=1, accum=1)  # micro-batch 0 alone, same normaliser
    with caplog.at_level(logging.WARNING, logger="kdforge.train.guards"):
        state = d.train()
    ref.train()
    assert d.empty_batches.skipped == 1 and state.step == 1
    assert state.positions_seen == ref.state.positions_seen == 2 * (SEQ - 1)
    assert "skipped a micro-batch with no real positions (epoch 0, batch 1); 1 skipped so far" in caplog.text
    got, want = weights(d.unwrapped_student), weights(ref.unwrapped_student)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_step_of_empty_micro_batches_makes_no_update_and_does_not_count():
    d = lm(LabelledTokens(8, ignored={0, 1}), steps=3)  # batch 0 of every epoch is empty
    before = weights(d.unwrapped_student)
    state = d.train()
    assert state.step == 3 and d.empty_batches.skipped == 1
    assert (state.epoch, state.batch_in_epoch) == (1, 0)  # 4 batches drawn for 3 steps
    assert any(not torch.equal(before[k], v) for k, v in weights(d.unwrapped_student).items())


def test_data_without_a_single_label_stops_within_the_first_micro_batches():
    d = lm(LabelledTokens(64, ignored=range(64)), steps=50, empty_start_batches=4)
    before = weights(d.unwrapped_student)
    with pytest.raises(DataError) as err:
        d.train()
    assert "the first 4 micro-batches" in err.value.problem and "LabelledTokens, 64 examples" in err.value.problem
    assert "ignore_index" in err.value.fix and "empty_start_batches" in err.value.fix
    assert d.state.step == 0
    assert all(torch.equal(before[k], v) for k, v in weights(d.unwrapped_student).items())


def test_a_whole_empty_epoch_stops_even_without_the_start_rule():
    d = lm(LabelledTokens(8, ignored=range(8)), steps=50, empty_start_batches=None)
    with pytest.raises(DataError, match="a whole epoch") as err:
        d.train()
    assert "4 micro-batches in a row" in err.value.problem
    assert d.empty_batches.skipped == 4


def test_a_weighted_term_stuck_at_zero_is_reported_once(caplog):
    """ClassificationTask counts every row; cross_entropy on labels that are all -100 is 0."""

    class Unlabelled(Rows):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "labels": torch.tensor(-100)}

    torch.manual_seed(0)
    d = Distiller(MLP(), None, task=ClassificationTask(),
                  objective=[{"name": "cross_entropy", "weight": 1.0}],
                  config=TrainConfig(max_steps=12, batch_size=4, progress=False), train_data=Unlabelled())
    with caplog.at_level(logging.WARNING, logger="kdforge.train.guards"):
        d.train()
    stuck = [r for r in caplog.records if "exactly 0" in r.getMessage()]
    assert len(stuck) == 1 and "cross_entropy" in stuck[0].getMessage()


def test_a_run_shorter_than_the_window_reports_a_stuck_term_at_its_end(caplog):
    torch.manual_seed(0)
    d = Distiller(MLP(), None, task=ClassificationTask(),
                  objective=[{"name": "cross_entropy", "weight": 1.0}, {"name": "cross_entropy", "weight": 0.0,
                                                                        "label": "ce_logged"}],
                  config=TrainConfig(max_steps=3, batch_size=4, progress=False),
                  train_data=[{"inputs": torch.randn(4), "labels": torch.tensor(-100)} for _ in range(8)])
    with caplog.at_level(logging.WARNING, logger="kdforge.train.guards"):
        d.train()
    stuck = [r.getMessage() for r in caplog.records if "exactly 0" in r.getMessage()]
    assert len(stuck) == 1 and "cross_entropy have" in stuck[0] and "first 3 steps" in stuck[0]  # weight 0: not named


def test_a_term_that_moves_is_not_reported(caplog):
    torch.manual_seed(0)
    d = Distiller(MLP(), None, task=ClassificationTask(), objective=[{"name": "cross_entropy", "weight": 1.0}],
                  config=TrainConfig(max_steps=10, batch_size=4, progress=False), train_data=Rows())
    with caplog.at_level(logging.WARNING, logger="kdforge.train.guards"):
        d.train()
    assert "exactly 0" not in caplog.text


# ---- non-finite values ----------------------------------------------------------------------
class Poisoned(nn.Module):
    """An MLP whose logits become NaN on the forward calls listed in ``nan_calls`` (1-based), or
    whose gradient becomes Inf on those calls with ``grad=True``."""

    def __init__(self, nan_calls: set[int], grad: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = MLP()
        self.nan_calls, self.grad, self.calls = set(nan_calls), grad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        if self.calls in self.nan_calls:
            out = _InfGrad.apply(out) if self.grad else out * float("nan")
        return out


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g * float("inf")


def classifier(student: nn.Module, *, steps: int = 5, out=None, loss_checks: bool = True, **cfg) -> Distiller:
    config = TrainConfig(max_steps=steps, batch_size=4, progress=False, output_dir=str(out) if out else None, **cfg)
    term = {"name": "cross_entropy", "weight": 1.0, "params": {} if loss_checks else {"check_finite": False}}
    return Distiller(student, None, task=ClassificationTask(), objective=[term],
                     config=config, train_data=Rows(), sampler=EpochSampler(12, shuffle=False))


def test_a_nan_loss_stops_before_the_update_naming_term_step_and_batch():
    """The loss's own check is off: the step's guard finds the NaN term."""
    student = Poisoned({3})
    d = classifier(student, loss_checks=False, grad_accum_steps=1)
    with pytest.raises(NonFiniteError) as err:
        d.train()
    assert err.value.problem == "loss term 'cross_entropy' is nan (not finite) at step 3, micro-batch 0 (epoch 0, batch 2)"
    assert "on_nonfinite: skip" in err.value.fix and "checkpoint" in err.value.fix
    assert d.state.step == 2
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_a_loss_that_finds_nan_logits_itself_names_the_step_and_batch_too():
    """The losses check values on a layout's first micro-batch (and after a non-finite step)."""
    student = Poisoned({1})
    d = classifier(student, grad_accum_steps=2, steps=4)
    with pytest.raises(NonFiniteError) as err:
        d.train()
    assert err.value.problem == "cross_entropy: student logits contain NaN at step 1, micro-batch 0 (epoch 0, batch 0)"
    assert "learning rate" in err.value.fix and "on_nonfinite: skip" in err.value.fix


def test_an_infinite_gradient_with_a_finite_loss_is_named_as_such():
    d = classifier(Poisoned({2}, grad=True), max_grad_norm=None)
    with pytest.raises(NonFiniteError, match=r"the gradient is not finite at step 2 \(every loss term was finite"):
        d.train()


def test_skip_drops_the_update_and_keeps_training():
    student = Poisoned({3})
    d = classifier(student, steps=5, on_nonfinite="skip")
    opt_before = None

    from kdforge.train import Callback

    class Snapshot(Callback):
        def on_step_end(self, state, logs):
            nonlocal opt_before
            if state.step == 2:
                opt_before = (weights(student), {k: v["exp_avg"].clone() for k, v in
                                                 enumerate(d._torch_optimizer.state.values())})
            if state.step == 3:  # the skipped step: nothing moved
                w, m = opt_before
                assert all(torch.equal(w[k], v) for k, v in weights(student).items())
                assert all(torch.equal(m[k], v["exp_avg"]) for k, v in enumerate(d._torch_optimizer.state.values()))

    d.callbacks.insert(0, Snapshot())
    state = d.train()
    assert state.step == 5 and d.finite_guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_skip_stops_after_too_many_non_finite_steps_in_a_row():
    d = classifier(Poisoned(set(range(2, 50))), steps=20, on_nonfinite="skip", max_nonfinite_skips=3)
    with pytest.raises(NonFiniteError, match=r"4 steps in a row were not finite \(train.max_nonfinite_skips=3\)"):
        d.train()
    assert d.finite_guard.skipped == 4


def test_a_stopped_run_leaves_a_finite_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    d = classifier(Poisoned({4}), steps=6, out=out, save_every=1)
    with pytest.raises(NonFiniteError, match="at step 4"):
        d.train()
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and newest.name == "step-3"
    ckpt = LoadedCheckpoint(newest)  # checksums verified
    assert all(torch.isfinite(t).all() for t in ckpt.student_state().values())
    resumed = classifier(Poisoned(set()), steps=6, out=out, save_every=1)
    assert resumed.train(resume=True).step == 6


def test_the_guards_survive_a_resume(tmp_path):
    out = tmp_path / "run"
    classifier(Poisoned({2}), steps=3, out=out, save_every=1, on_nonfinite="skip").train()
    again = classifier(Poisoned(set()), steps=4, out=out, save_every=1, on_nonfinite="skip")
    again.train(resume=True)
    assert again.finite_guard.skipped == 1


@pytest.mark.slow  # a torchrun launch: ~45 s on a busy 2-core box
def test_two_processes_take_the_same_branch_on_empty_and_non_finite_micro_batches(tmp_path):
    """torchrun, 2 CPU processes (gloo): an empty micro-batch on one rank is kept, one empty on
    both is dropped by both, a NaN on one rank is skipped by both; nobody hangs, weights agree."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("_guard_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(port), str(worker), str(tmp_path)], env=env, timeout=240, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["step"] == 4 and r0["batch_in_epoch"] == 5  # 5 batches drawn: one whole step was empty
    assert r0["empty_skipped"] == 1 and r0["nonfinite_skipped"] == 1 and r0["finite"]
    # positions of the 3 applied steps: batch 0 (4 rows), batch 1 (rank 0's 2 rows), batch 4 (4 rows), x 7 each
    assert r0["positions_seen"] == 7 * (4 + 2 + 4)
