"""Checkpoints: exact resume, atomic layout, pruning, corruption errors."""

import json

import pytest
import torch

from kdforge.errors import CheckpointError
from kdforge.train import (
    Callback,
    ClassificationTask,
    Distiller,
    LossTerm,
    TrainConfig,
    verify_checkpoint,
)

from ._tiny import MLP, ClassDataset


class Crash(RuntimeError):
    pass


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, logs):
        if state.step == self.step:
            raise Crash(f"simulated crash after step {state.step}")


def _distiller(out_dir, max_steps=10, callbacks=(), scheduler="linear", **kw):
    torch.manual_seed(123)  # identical init for every run
    student, teacher = MLP(dropout=0.3), MLP(scale=3.0)  # dropout: resume must restore the torch RNG
    cfg = TrainConfig(max_steps=max_steps, batch_size=5, grad_accum_steps=2, lr=1e-2, progress=False, log_every=1,
                      save_every=3, keep_last=2, output_dir=str(out_dir), scheduler=scheduler, warmup_steps=2,
                      seed=7, **kw)
    # 23 examples, 5 per micro-batch, 2 per step: epochs end mid-step, the last batch is short
    return Distiller(student, teacher, task=ClassificationTask(),
                     objective=[LossTerm("forward_kl", 1.0, {"temperature": 2.0}), LossTerm("cross_entropy", 0.5)],
                     config=cfg, train_data=ClassDataset(n=23), callbacks=callbacks)


def test_run_crashed_mid_way_and_resumed_ends_bitwise_equal_to_uninterrupted_run(tmp_path):
    ref = _distiller(tmp_path / "ref")
    ref.train()

    crashed = _distiller(tmp_path / "run", callbacks=[CrashAt(8)])
    with pytest.raises(Crash):
        crashed.train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-3", "step-6"]

    resumed = _distiller(tmp_path / "run")
    state = resumed.train(resume=True)
    assert state.step == 10
    for (name, a), (_, b) in zip(ref.unwrapped_student.state_dict().items(),
                                 resumed.unwrapped_student.state_dict().items()):
        assert torch.equal(a, b), name
    # the log reads as one run: no duplicate steps from the crashed attempt
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_max_steps_then_continue_with_more_steps_equals_one_long_run(tmp_path):
    ref = _distiller(tmp_path / "ref", max_steps=8, scheduler="constant")
    ref.train()
    first = _distiller(tmp_path / "run", max_steps=4, scheduler="constant")
    first.train()
    assert (tmp_path / "run" / "checkpoints" / "step-4").is_dir()  # final checkpoint at the end
    second = _distiller(tmp_path / "run", max_steps=8, scheduler="constant")
    second.train(resume=True)
    for a, b in zip(ref.unwrapped_student.parameters(), second.unwrapped_student.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_layout_has_weights_optimizer_rng_state_and_checksums(tmp_path):
    d = _distiller(tmp_path, max_steps=3)
    d.train()
    ckpt = tmp_path / "checkpoints" / "step-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"student.safetensors", "optimizer.pt", "scheduler.pt", "rng-rank0.pt", "trainer_state.json",
            "checksums.json"} <= names
    state = verify_checkpoint(ckpt)
    assert state["step"] == 3 and state["epoch"] == 1 and state["batch_in_epoch"] == 1
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_keep_last_prunes_old_checkpoints(tmp_path):
    _distiller(tmp_path, max_steps=12).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-12", "step-9"]


def test_truncated_checkpoint_raises_checkpoint_error_naming_folder_and_fix(tmp_path):
    _distiller(tmp_path, max_steps=6).train()
    newest = tmp_path / "checkpoints" / "step-6"
    weights = newest / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CheckpointError) as err:
        _distiller(tmp_path, max_steps=8).train(resume=True)
    assert "step-6" in str(err.value) and "delete" in err.value.fix
    # following the fix falls back to the previous checkpoint
    import shutil

    shutil.rmtree(newest)
    state = _distiller(tmp_path, max_steps=8).train(resume=True)
    assert state.step == 8


def test_missing_checksums_file_is_reported_as_incomplete(tmp_path):
    _distiller(tmp_path, max_steps=3).train()
    (tmp_path / "checkpoints" / "step-3" / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete or corrupted"):
        _distiller(tmp_path, max_steps=4).train(resume=True)


def test_resume_with_another_batch_size_is_refused(tmp_path):
    _distiller(tmp_path, max_steps=3).train()
    d = _distiller(tmp_path, max_steps=4)
    d.config = d.config.model_copy(update={"batch_size": 4})
    with pytest.raises(CheckpointError, match="batch_size"):
        d.train(resume=True)


def test_resume_without_checkpoints_starts_fresh(tmp_path):
    state = _distiller(tmp_path, max_steps=2).train(resume=True)
    assert state.step == 2


def test_leftover_temp_folder_from_a_crashed_save_is_ignored_and_cleaned(tmp_path):
    _distiller(tmp_path, max_steps=3).train()
    stale = tmp_path / "checkpoints" / ".tmp-step-5"
    stale.mkdir()
    (stale / "student.safetensors").write_bytes(b"partial")
    state = _distiller(tmp_path, max_steps=6).train(resume=True)  # resumes from step-3, not the temp folder
    assert state.step == 6 and not stale.exists()


def test_fresh_run_in_a_used_folder_starts_a_fresh_metrics_log(tmp_path):
    _distiller(tmp_path, max_steps=3).train()
    _distiller(tmp_path, max_steps=2).train()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
