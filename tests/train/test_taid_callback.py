"""TAIDCallback: the TAID schedule stepped by the trainer, driving the taid term's t, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from tests.train._tiny import TokenDataset, pad_collate, tiny_llama

from kdforge.errors import ConfigError
from kdforge.losses.taid import TAIDSchedule
from kdforge.train import CausalLMTask, Distiller, LossTerm, TAIDCallback, TrainConfig
from kdforge.train.callbacks import Callback


class Crash(RuntimeError):
    pass


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, logs):
        if state.step == self.step:
            raise Crash(f"simulated crash after step {state.step}")


def _distiller(out_dir=None, max_steps=8, callbacks=(), objective=None, chunked=False, **kw):
    torch.manual_seed(5)
    teacher, student = tiny_llama(1, head_scale=3.0), tiny_llama(2)
    cfg = TrainConfig(max_steps=max_steps, batch_size=4, grad_accum_steps=2, lr=5e-3, progress=False, log_every=2,
                      save_every=3, output_dir=str(out_dir) if out_dir else None, seed=3, **kw)
    from kdforge.train import Objective

    terms = objective or [LossTerm("taid", 1.0), LossTerm("cross_entropy", 0.0)]
    return Distiller(student, teacher, task=CausalLMTask(), objective=Objective(terms, chunked=chunked),
                     config=cfg, train_data=TokenDataset(n=20), collate_fn=pad_collate(), callbacks=callbacks)


def test_adaptive_schedule_moves_t_from_t_start_up_to_one_and_the_loss_uses_it(tmp_path):
    d = _distiller(tmp_path / "run")
    cb = TAIDCallback(TAIDSchedule(d.state.max_steps, t_start=0.2, mode="adaptive")).attach(d)
    term = d.objective.terms[0]
    assert term.params["t"] == pytest.approx(0.2)
    d.train()
    assert cb.history[0] == pytest.approx(0.2)
    assert all(b >= a for a, b in zip(cb.history, cb.history[1:]))  # t never falls
    assert cb.history[-1] > 0.2
    assert cb.t == pytest.approx(1.0) and term.params["t"] == pytest.approx(1.0)  # t_end at total_steps
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ts = [r["taid/t"] for r in logged if r.get("split") == "train"]
    assert len(ts) == 4 and ts[-1] == pytest.approx(1.0) and ts[0] < 1.0


def test_linear_schedule_matches_its_formula_step_by_step():
    d = _distiller(max_steps=5)
    cb = TAIDCallback(TAIDSchedule(5, t_start=0.5, mode="linear")).attach(d)
    d.train()
    assert cb.history == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])


def test_adaptive_step_reads_the_taid_term_value_of_each_step():
    # the adaptive schedule consumes the same per-step value the trainer logs as loss/taid
    seen = []
    d = _distiller(max_steps=4)
    d.config.log_every = 1
    cb = TAIDCallback(TAIDSchedule(4, t_start=0.3)).attach(d)

    class Spy(Callback):
        def on_step_end(self, state, logs):
            seen.append((logs["loss/taid"], cb.schedule.prev_loss))

    d.callbacks.append(Spy())
    d.train()
    for logged, prev in seen:
        assert prev == pytest.approx(logged, rel=1e-6)


def test_chunked_objective_is_driven_too():
    d = _distiller(max_steps=3, chunked=True)
    cb = TAIDCallback(TAIDSchedule(3, t_start=0.4, mode="linear")).attach(d)
    d.train()
    assert cb.history == pytest.approx([0.4, 0.6, 0.8])


def test_crash_and_resume_with_the_callback_is_bit_exact(tmp_path):
    ref = _distiller(tmp_path / "ref")
    ref_cb = TAIDCallback(TAIDSchedule(8, t_start=0.3)).attach(ref)
    ref.train()

    crashed = _distiller(tmp_path / "run", callbacks=[CrashAt(5)])
    TAIDCallback(TAIDSchedule(8, t_start=0.3)).attach(crashed)
    with pytest.raises(Crash):
        crashed.train()

    resumed = _distiller(tmp_path / "run")
    cb = TAIDCallback(TAIDSchedule(8, t_start=0.3)).attach(resumed)
    resumed.train(resume=True)
    assert cb.history == ref_cb.history[3:]  # resumed from step-3: same t at every later step
    assert cb.schedule.state_dict() == ref_cb.schedule.state_dict()
    for (name, a), (_, b) in zip(ref.unwrapped_student.state_dict().items(),
                                 resumed.unwrapped_student.state_dict().items()):
        assert torch.equal(a, b), name


def test_objective_without_a_taid_term_is_a_config_error():
    d = _distiller(max_steps=2, objective=[LossTerm("forward_kl", 1.0)])
    with pytest.raises(ConfigError, match="taid"):
        TAIDCallback(TAIDSchedule(2)).attach(d)


def test_callback_passed_without_attach_is_a_config_error():
    d = _distiller(max_steps=2, callbacks=[TAIDCallback(TAIDSchedule(2))])
    with pytest.raises(ConfigError, match="attach"):
        d.train()
