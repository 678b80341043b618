"""Scheduled parameters: each schedule against its formula, YAML errors, the trainer applying and
logging them, TAID's adaptive rule as a schedule, and bit-exact resume of their state."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdforge.errors import ConfigError
from kdforge.losses.taid import TAIDSchedule
from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig
from kdforge.train.schedules import ScheduledValues, build_schedule

from ._tiny import MLP, ClassDataset


def test_each_schedule_follows_its_formula():
    lin = build_schedule({"schedule": "linear", "start": 1.0, "end": 0.0}, 10)
    assert [lin.value(s) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    cos = build_schedule({"schedule": "cosine", "start": 1.0, "end": 0.0}, 10)
    assert cos.value(0) == 1.0 and cos.value(5) == pytest.approx(0.5) and cos.value(10) == pytest.approx(0.0)
    warm = build_schedule({"schedule": "warmup", "value": 2.0, "warmup_steps": 4}, 10)
    assert [warm.value(s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    frac = build_schedule({"schedule": "linear", "start": 0.0, "end": 1.0, "stop": 0.5}, 10)  # fraction of the run
    assert frac.value(5) == 1.0 and frac.value(2) == pytest.approx(0.4)
    assert build_schedule({"schedule": "constant", "value": 3.0}, 10).value(7) == 3.0


@given(st.floats(-5, 5), st.floats(-5, 5), st.integers(0, 50), st.integers(1, 40))
def test_linear_and_cosine_stay_between_their_ends(start, end, step, max_steps):
    for kind in ("linear", "cosine"):
        v = build_schedule({"schedule": kind, "start": start, "end": end}, max_steps).value(step)
        assert min(start, end) - 1e-9 <= v <= max(start, end) + 1e-9


@given(st.floats(0, 10), st.integers(1, 30))
def test_warmup_never_decreases(value, warmup):
    s = build_schedule({"schedule": "warmup", "value": value, "warmup_steps": warmup}, 100)
    values = [s.value(i) for i in range(40)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_bad_schedules_fail_with_a_clear_message():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        build_schedule({"schedule": "cosin", "start": 1, "end": 0})
    with pytest.raises(ConfigError, match="no parameter 'strat'.*did you mean 'start'"):
        build_schedule({"schedule": "linear", "strat": 1, "end": 0})
    with pytest.raises(ConfigError, match="needs value"):
        build_schedule({"schedule": "warmup", "warmup_steps": 3})
    with pytest.raises(ConfigError, match="weight: unknown schedule"):
        LossTerm("forward_kl", {"schedule": "nope"})


def test_taid_adaptive_schedule_equals_the_taid_schedule_it_wraps():
    values = ScheduledValues({"taid.params.t": {"schedule": "taid_adaptive", "t_start": 0.4}}, max_steps=20)
    ref = TAIDSchedule(20, t_start=0.4)
    for loss in [3.0, 2.5, 2.4, 2.0, 2.1, 1.5]:
        assert values.current(0)["taid.params.t"] == ref.t
        values.observe({"loss/taid": loss})
        ref.step(loss)
    assert values.current(0)["taid.params.t"] == ref.t


def test_state_dict_round_trip_is_bit_exact_for_an_adaptive_schedule():
    spec = {"taid.params.t": {"schedule": "taid_adaptive"}, "ce.weight": {"schedule": "cosine", "start": 1, "end": 0}}
    a = ScheduledValues(spec, max_steps=30)
    for loss in [2.0, 1.7, 1.8, 1.2]:
        a.observe({"loss/taid": loss})
    b = ScheduledValues(spec, max_steps=30)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step, loss in enumerate([1.1, 1.3, 0.9, 0.7], start=4):
        assert a.current(step) == b.current(step)
        a.observe({"loss/taid": loss})
        b.observe({"loss/taid": loss})


def _distiller(out_dir, max_steps=6, save_every=None):
    torch.manual_seed(0)
    terms = [LossTerm("forward_kl", {"schedule": "linear", "start": 1.0, "end": 0.0}),
             {"name": "taid", "weight": 0.5, "params": {"t": {"schedule": "taid_adaptive", "t_start": 0.3}}},
             LossTerm("cross_entropy", {"schedule": "warmup", "value": 1.0, "warmup_steps": 4})]
    return Distiller(MLP(), MLP(scale=2.0), task=ClassificationTask(), objective=terms,
                     config=TrainConfig(max_steps=max_steps, batch_size=8, lr=1e-2, progress=False, log_every=1,
                                        save_every=save_every, output_dir=str(out_dir)),
                     train_data=ClassDataset(n=32))


def test_a_scheduled_weight_follows_its_schedule_in_the_logs(tmp_path):
    _distiller(tmp_path).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["sched/forward_kl.weight"] for r in train] == pytest.approx([1 - s / 6 for s in range(6)])
    assert [r["sched/cross_entropy.weight"] for r in train] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    t = [r["sched/taid.params.t"] for r in train]
    assert t[0] == pytest.approx(0.3) and all(a <= b for a, b in zip(t, t[1:])) and t[-1] > t[0]
    # the loss used the scheduled weights: total = sum_i w_i(step) * term_i
    for r in train:
        expect = (r["sched/forward_kl.weight"] * r["loss/forward_kl"] + 0.5 * r["loss/taid"]
                  + r["sched/cross_entropy.weight"] * r["loss/cross_entropy"])
        assert math.isclose(r["loss"], expect, rel_tol=1e-5)


def test_resume_restores_schedules_bit_exactly(tmp_path):
    full = _distiller(tmp_path / "full")
    full.train()
    part = _distiller(tmp_path / "part", max_steps=6, save_every=3)
    part.state.max_steps = 3
    part.train()
    resumed = _distiller(tmp_path / "part", max_steps=6, save_every=3)
    resumed.train(resume=True)
    assert resumed.schedules.state_dict() == full.schedules.state_dict()
    for a, b in zip(full.unwrapped_student.parameters(), resumed.unwrapped_student.parameters()):
        assert torch.equal(a, b)
