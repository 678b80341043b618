"""Scheduled values (kdforge.train.schedules): each schedule against its formula, their invariants,
config errors, bit-exact state round trips (TAID's adaptive rule included), ScheduledValues'
paths and log keys, and the trainer applying, logging and resuming them."""

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kdforge.config import StrictModel, validate
from kdforge.errors import CheckpointError, ConfigError
from kdforge.losses.taid import TAIDSchedule
from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig
from kdforge.train.schedules import (
    SCHEDULES,
    Cosine,
    Linear,
    Schedule,
    ScheduleConfig,
    ScheduledFloat,
    ScheduledValues,
    TAIDAdaptive,
    Warmup,
    build_schedule,
    is_scheduled,
    parse_scheduled,
)

from ._tiny import MLP, ClassDataset

#: one config per registered schedule (a new schedule must add one: see the registry test)
EXAMPLES = {
    "constant": {"schedule": "constant", "value": 0.7},
    "linear": {"schedule": "linear", "start": 1.0, "end": 0.1, "begin": 2, "stop": 0.8},
    "cosine": {"schedule": "cosine", "start": 0.0, "end": 2.0, "stop": 0.5},
    "warmup": {"schedule": "warmup", "value": 1.5, "warmup_steps": 7},
    "piecewise": {"schedule": "piecewise", "values": [1.0, 0.5, 0.1], "boundaries": [3, 9]},
    "taid_adaptive": {"schedule": "taid_adaptive", "t_start": 0.3, "alpha": 0.05, "beta": 0.9},
}
LOSSES = [3.0, 2.5, 2.4, 2.0, 2.1, float("nan"), 1.5, 1.4, 1.45, 1.0, 0.9, 0.95, 0.7, 0.6, 0.65, 0.5]


def values_of(schedule, steps, max_steps):
    return [schedule.value(s, max_steps) for s in steps]


# -- each schedule against its formula --------------------------------------------------------------

def test_constant_is_its_value_at_every_step():
    s = build_schedule({"schedule": "constant", "value": 3.0})
    assert values_of(s, [0, 5, 10, 1000], 10) == [3.0] * 4


def test_linear_goes_from_start_to_end_over_the_whole_run_by_default():
    s = build_schedule({"schedule": "linear", "start": 1.0, "end": 0.0})
    assert values_of(s, [0, 5, 10, 20], 10) == [1.0, 0.5, 0.0, 0.0]


def test_linear_holds_start_before_begin_and_end_after_stop():
    s = build_schedule({"schedule": "linear", "start": 2.0, "end": 4.0, "begin": 10, "stop": 30})
    assert values_of(s, [0, 10, 15, 20, 30, 31, 500], 100) == [2.0, 2.0, 2.5, 3.0, 4.0, 4.0, 4.0]


def test_a_float_position_is_a_fraction_of_the_run():
    s = build_schedule({"schedule": "linear", "start": 0.0, "end": 1.0, "begin": 0.25, "stop": 0.75})
    assert values_of(s, [0, 25, 50, 75, 100], 100) == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert s.value(50, 200) == 0.0 and s.value(100, 200) == 0.5  # resolved against each run's length


def test_linear_with_stop_equal_to_begin_is_a_step_at_begin():
    s = build_schedule({"schedule": "linear", "start": 1.0, "end": 3.0, "begin": 4, "stop": 4})
    assert values_of(s, [0, 3, 4, 9], 10) == [1.0, 1.0, 3.0, 3.0]


def test_cosine_follows_half_a_cosine_wave():
    start, end, max_steps = 1.0, 0.2, 40
    s = build_schedule({"schedule": "cosine", "start": start, "end": end})
    assert s.value(0, max_steps) == start and s.value(max_steps, max_steps) == end and s.value(99, max_steps) == end
    for step in (10, 20, 30):
        expect = end + (start - end) * (1 + math.cos(math.pi * step / max_steps)) / 2
        assert s.value(step, max_steps) == pytest.approx(expect, rel=1e-12, abs=1e-15)
    assert s.value(20, max_steps) == pytest.approx((start + end) / 2)


def test_warmup_ramps_linearly_from_zero_then_stays_at_its_value():
    s = build_schedule({"schedule": "warmup", "value": 2.0, "warmup_steps": 4})
    assert values_of(s, range(6), 10) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]  # value * min(1, (s + 1) / 4)
    assert s.value(10_000, 10) == 2.0


def test_warmup_of_zero_steps_or_a_fraction_of_the_run():
    assert build_schedule({"schedule": "warmup", "value": 1.0, "warmup_steps": 0}).value(0, 10) == 1.0
    frac = build_schedule({"schedule": "warmup", "value": 1.0, "warmup_steps": 0.1})  # 10 steps of 100
    assert values_of(frac, [0, 4, 9, 50], 100) == [0.1, 0.5, 1.0, 1.0]


def test_piecewise_switches_value_at_each_boundary():
    s = build_schedule({"schedule": "piecewise", "values": [1.0, 0.5, 0.1], "boundaries": [3, 6]})
    assert values_of(s, range(8), 10) == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.1, 0.1]
    frac = build_schedule({"schedule": "piecewise", "values": [4.0, 2.0], "boundaries": [0.5]})
    assert values_of(frac, [0, 9, 10, 19], 20) == [4.0, 4.0, 2.0, 2.0]
    assert build_schedule({"schedule": "piecewise", "values": [7.0]}).value(3, 10) == 7.0


def test_schedules_can_be_built_from_keyword_arguments_or_their_config():
    assert Linear(start=1.0, end=0.0).value(5, 10) == 0.5
    assert Cosine(Cosine.Config(start=1.0, end=0.0)).value(10, 10) == 0.0
    assert repr(Warmup(value=1.0, warmup_steps=3)) == "Warmup(value=1.0, warmup_steps=3)"


# -- TAID's adaptive rule behind the Schedule interface ---------------------------------------------

@pytest.mark.parametrize("mode", ["adaptive", "linear"])
def test_taid_adaptive_reproduces_the_taid_schedule_it_wraps(mode):
    s = build_schedule({"schedule": "taid_adaptive", "t_start": 0.4, "mode": mode, "alpha": 0.05})
    s.bind("taid")
    ref = TAIDSchedule(20, t_start=0.4, mode=mode, alpha=0.05)
    assert s.value(0, 20) == 0.4
    for step, loss in enumerate(LOSSES):
        assert s.value(step, 20) == ref.t
        s.observe({"loss/taid": loss, "loss": 99.0})
        ref.step(loss)
    assert s.value(len(LOSSES), 20) == ref.t


def test_taid_adaptive_observes_the_metric_it_is_told_to():
    s = build_schedule({"schedule": "taid_adaptive", "metric": "loss/kd", "alpha": 0.1})
    ref = TAIDSchedule(10, alpha=0.1)
    s.value(0, 10)
    for loss in [2.0, 1.0, 0.5]:
        s.observe({"loss/kd": loss})
        ref.step(loss)
    assert s.value(3, 10) == ref.t


def test_taid_adaptive_without_its_loss_says_which_metric_is_missing():
    s = build_schedule({"schedule": "taid_adaptive"})
    s.bind("taid")
    s.value(0, 10)
    with pytest.raises(ConfigError, match="observes 'loss/taid'.*loss/kd"):
        s.observe({"loss/kd": 1.0})
    unbound = build_schedule({"schedule": "taid_adaptive"})
    unbound.value(0, 10)
    with pytest.raises(ConfigError, match="which loss"):
        unbound.observe({"loss/taid": 1.0})


# -- invariants ------------------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False)
steps = st.integers(0, 10_000)
runs = st.integers(1, 5_000)
positions = st.one_of(st.integers(0, 5_000), st.floats(0.0, 1.0))


@given(st.sampled_from(["linear", "cosine"]), finite, finite, positions, positions, steps, runs)
def test_linear_and_cosine_never_leave_the_range_of_their_ends(kind, start, end, begin, stop, step, max_steps):
    if type(begin) is type(stop) and stop < begin:
        begin, stop = stop, begin
    s = build_schedule({"schedule": kind, "start": start, "end": end, "begin": begin, "stop": stop})
    assert min(start, end) <= s.value(step, max_steps) <= max(start, end)


@given(st.floats(0, 1e6, allow_nan=False), positions, runs)
def test_warmup_never_decreases_and_reaches_its_value(value, warmup, max_steps):
    s = build_schedule({"schedule": "warmup", "value": value, "warmup_steps": warmup})
    ramp = math.ceil(warmup if isinstance(warmup, int) else warmup * max_steps)
    got = [s.value(i, max_steps) for i in range(ramp + 3)]
    assert all(a <= b for a, b in zip(got, got[1:]))
    assert got[-1] == value and all(0.0 <= v <= value for v in got)


@given(finite, st.lists(steps, max_size=20), runs)
def test_constant_is_constant(value, some_steps, max_steps):
    s = build_schedule({"schedule": "constant", "value": value})
    assert {s.value(i, max_steps) for i in some_steps} <= {value}


@given(st.sampled_from(sorted(EXAMPLES)), steps, runs)
def test_every_value_lies_within_the_configs_bounds(kind, step, max_steps):
    s = build_schedule(EXAMPLES[kind])
    s.bind("term")
    lo, hi = s.config.bounds()
    assert lo <= s.value(step, max_steps) <= hi


# -- configs ---------------------------------------------------------------------------------------

def test_every_registered_schedule_has_a_config_tagged_with_its_name_and_an_example():
    assert sorted(EXAMPLES) == SCHEDULES.names()
    for name in SCHEDULES.names():
        cls = SCHEDULES.get(name)
        assert issubclass(cls, Schedule) and issubclass(cls.Config, ScheduleConfig)
        assert cls.Config.model_fields["schedule"].default == name
        assert SCHEDULES.describe(name)
        assert type(build_schedule(EXAMPLES[name])) is cls


@pytest.mark.parametrize(("spec", "message"), [
    ({"schedule": "cosin", "start": 1, "end": 0}, "unknown schedule 'cosin' \\(did you mean 'cosine'\\?\\)"),
    ({"schedule": "warmpu", "value": 1, "warmup_steps": 3}, "did you mean 'warmup'"),
    ({"start": 1, "end": 0}, "'schedule' is missing.*linear"),
    ({"schedule": "linear", "strat": 1, "end": 0}, "strat: unknown key \\(did you mean 'start'\\?\\)"),
    ({"schedule": "taid_adaptive", "t_strat": 0.3}, "t_strat: unknown key \\(did you mean 't_start'\\?\\)"),
    ({"schedule": "warmup", "warmup_steps": 3}, "value: required key is missing"),
    ({"schedule": "linear", "start": "fast", "end": 0}, "start: Input should be a valid number"),
    ({"schedule": "constant", "value": float("nan")}, "value: Input should be a finite number"),
    ({"schedule": "warmup", "value": 1, "warmup_steps": -3}, "warmup_steps: a step count must be >= 0"),
    ({"schedule": "warmup", "value": 1, "warmup_steps": 200.0}, "write the integer 200"),
    ({"schedule": "linear", "start": 1, "end": 0, "stop": 1.5}, "fraction of the run in \\[0, 1\\]"),
    ({"schedule": "linear", "start": 1, "end": 0, "begin": "half"}, "begin: a position is a step count"),
    ({"schedule": "linear", "start": 1, "end": 0, "begin": 8, "stop": 4}, "stop=4 comes before begin=8"),
    ({"schedule": "piecewise", "values": [1, 2], "boundaries": []}, "2 values need 1 boundaries"),
    ({"schedule": "piecewise", "values": [1, 2, 3], "boundaries": [5, 0.5]}, "mix steps"),
    ({"schedule": "piecewise", "values": [1, 2, 3], "boundaries": [5, 2]}, "must not decrease"),
    ({"schedule": "taid_adaptive", "t_start": 0.9, "t_end": 0.5}, "t must rise"),
    ({"schedule": "taid_adaptive", "alpha": 2.0}, "alpha: Input should be less than or equal to 1"),
    ({"schedule": "taid_adaptive", "mode": "fast"}, "mode: Input should be 'adaptive' or 'linear'"),
])
def test_a_bad_schedule_fails_naming_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_schedule(spec)


def test_a_schedule_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match="a schedule is a mapping"):
        build_schedule("linear")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bgin: unknown key \\(did you mean 'begin'\\?\\)"):
        Linear(start=1.0, end=0.0, bgin=3)


def test_positions_out_of_order_once_resolved_fail_before_training():
    s = build_schedule({"schedule": "linear", "start": 1, "end": 0, "begin": 60, "stop": 0.5})
    s.check_run(200)  # stop = step 100, after begin
    with pytest.raises(ConfigError, match="comes before begin=60"):
        ScheduledValues({"kd.weight": s}, max_steps=100)


class _Term(StrictModel):
    name: str
    weight: ScheduledFloat
    params: dict[str, ScheduledFloat] = {}


class _Recipe(StrictModel):
    objective: list[_Term]


def test_a_scheduled_field_reports_errors_under_their_dotted_path():
    data = {"objective": [
        {"name": "ce", "weight": 1},
        {"name": "dkd", "weight": {"schedule": "warmup", "value": 1.0, "warmup_stpes": 200}},
        {"name": "taid", "weight": 1.0, "params": {"t": {"schedule": "taid_adaptve"}}},
        {"name": "kd", "weight": "heavy"},
    ]}
    with pytest.raises(ConfigError) as info:
        validate(_Recipe, data, source="recipe.yaml")
    text = str(info.value)
    assert "objective.1.weight.warmup_stpes: unknown key (did you mean 'warmup_steps'?)" in text
    assert "objective.1.weight.warmup_steps: required key is missing" in text
    assert "objective.2.params.t.schedule: unknown schedule 'taid_adaptve' (did you mean 'taid_adaptive'?)" in text
    assert "objective.3.weight: expected a finite number or a schedule" in text


def test_a_scheduled_field_keeps_a_number_and_dumps_a_schedule_whole():
    recipe = validate(_Recipe, {"objective": [
        {"name": "ce", "weight": 1},
        {"name": "dkd", "weight": {"schedule": "warmup", "value": 1.0, "warmup_steps": 200}}]})
    assert recipe.objective[0].weight == 1.0
    assert isinstance(recipe.objective[1].weight, Warmup.Config)
    assert recipe.model_dump()["objective"][1]["weight"] == {"schedule": "warmup", "value": 1.0, "warmup_steps": 200}
    assert validate(_Recipe, recipe.model_dump()) == recipe


def test_parse_scheduled_keeps_a_plain_number_and_builds_a_schedule():
    assert parse_scheduled(2) == 2 and type(parse_scheduled(2)) is int
    assert parse_scheduled(0.5) == 0.5
    built = parse_scheduled({"schedule": "warmup", "value": 1.0, "warmup_steps": 200})
    assert isinstance(built, Warmup) and built.value(99, 1000) == 0.5
    assert isinstance(parse_scheduled(Linear.Config(start=1.0, end=0.0)), Linear)
    same = Linear(start=1.0, end=0.0)
    assert parse_scheduled(same) is same
    for bad in ("1.0", True, [1.0], float("inf"), None):
        with pytest.raises(ConfigError, match="expected a number or a schedule"):
            parse_scheduled(bad)
    assert is_scheduled({"schedule": "constant", "value": 1}) and not is_scheduled({"layers": [1, 2]})
    assert not is_scheduled(1.0)


# -- state: bit-exact round trips --------------------------------------------------------------------

def _run(schedule, steps, max_steps, losses):
    out = []
    for step, loss in zip(steps, losses):
        out.append(schedule.value(step, max_steps))
        schedule.observe({"loss/term": loss, "loss": 2 * loss})
    return out


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_state_dict_round_trip_continues_bit_exactly(kind):
    max_steps, half = 2 * len(LOSSES), len(LOSSES) // 2
    a = build_schedule(EXAMPLES[kind])
    a.bind("term")
    _run(a, range(half), max_steps, LOSSES[:half])
    saved = json.loads(json.dumps(a.state_dict()))  # trainer_state.json is JSON
    b = build_schedule(EXAMPLES[kind])
    b.bind("term")
    b.load_state_dict(saved)  # before b's first value(), as on resume
    later = range(half, max_steps)
    losses = (LOSSES[half:] + LOSSES)[: len(later)]
    assert _run(a, later, max_steps, losses) == _run(b, later, max_steps, losses)
    assert json.dumps(a.state_dict()) == json.dumps(b.state_dict())


def test_the_taid_state_holds_what_the_rule_needs_and_moves_t_ahead_of_the_floor():
    s = build_schedule(EXAMPLES["taid_adaptive"])
    s.bind("term")
    _run(s, range(8), 100, LOSSES[:8])
    state = s.state_dict()
    assert set(state) == {"total_steps", "t", "momentum", "prev_loss", "num_steps"}
    assert state["num_steps"] == 8 and state["total_steps"] == 100
    assert state["t"] > s.inner.linear_t(8)  # the loss fell: t ran ahead of the linear floor


def test_a_stateless_schedule_refuses_a_foreign_state():
    with pytest.raises(CheckpointError, match="stateless"):
        build_schedule(EXAMPLES["linear"]).load_state_dict({"t": 0.5})


# -- ScheduledValues ---------------------------------------------------------------------------------

def _yaml_terms():
    return [
        ("dkd", {"schedule": "warmup", "value": 1.0, "warmup_steps": 4}, {"beta": 8.0}),
        ("taid", 1.0, {"t": {"schedule": "taid_adaptive", "t_start": 0.4, "t_end": 1.0}, "temperature": 2.0}),
        ("ce", 0.5, {}),
    ]


def test_scheduled_values_hold_the_schedules_by_path_without_touching_the_terms():
    terms = _yaml_terms()
    before = copy.deepcopy(terms)
    values = ScheduledValues.from_terms(terms, max_steps=10)
    assert values.paths == ["dkd.weight", "taid.params.t"] and len(values) == 2 and "taid.params.t" in values
    assert isinstance(values["taid.params.t"], TAIDAdaptive)
    assert values.current(0) == {"dkd.weight": 0.25, "taid.params.t": 0.4}
    values.observe({"loss": 3.0, "loss/dkd": 1.0, "loss/taid": 2.0, "loss/ce": 0.1})
    values.observe({"loss": 2.0, "loss/dkd": 1.0, "loss/taid": 1.0, "loss/ce": 0.1})
    assert values.current(3, max_steps=10)["dkd.weight"] == 1.0
    assert terms == before


def test_log_values_name_each_scheduled_value_sched_path():
    values = ScheduledValues({"dkd.weight": {"schedule": "linear", "start": 1.0, "end": 0.0},
                              "my.kd.params.temperature": {"schedule": "constant", "value": 2.0}}, max_steps=4)
    assert values.log_values(1) == {"sched/dkd.weight": 0.75, "sched/my.kd.params.temperature": 2.0}
    assert values.log_values(2, max_steps=8) == {"sched/dkd.weight": 0.75, "sched/my.kd.params.temperature": 2.0}


def test_each_adaptive_schedule_observes_its_own_terms_loss():
    spec = {"schedule": "taid_adaptive", "alpha": 0.2}
    values = ScheduledValues({"a.b.params.t": spec, "c.params.t": spec}, max_steps=50)  # a label may hold a dot
    ref_a, ref_c = TAIDSchedule(50, alpha=0.2), TAIDSchedule(50, alpha=0.2)
    for step, (la, lc) in enumerate([(2.0, 2.0), (1.0, 2.5), (0.5, 3.0), (0.25, 3.5)]):
        assert values.current(step) == {"a.b.params.t": ref_a.t, "c.params.t": ref_c.t}
        values.observe({"loss/a.b": la, "loss/c": lc})
        ref_a.step(la)
        ref_c.step(lc)
    assert ref_a.t > ref_c.t


def test_scheduled_values_refuse_bad_paths_and_bad_calls():
    with pytest.raises(ConfigError, match="bad scheduled-value path 'kd.wieght'"):
        ScheduledValues({"kd.wieght": {"schedule": "constant", "value": 1.0}})
    with pytest.raises(ConfigError, match="kd.weight: unknown schedule 'lin'"):
        ScheduledValues({"kd.weight": {"schedule": "lin"}})
    shared = Linear(start=1.0, end=0.0)
    with pytest.raises(ConfigError, match="reuses a schedule object"):
        ScheduledValues({"a.weight": shared, "b.weight": shared})
    values = ScheduledValues({"kd.weight": {"schedule": "constant", "value": 1.0}})
    with pytest.raises(ConfigError, match="run length is unknown"):
        values.current(0)
    with pytest.raises(ConfigError, match="step must be an int >= 0"):
        values.current(-1, 10)
    taid = ScheduledValues({"taid.params.t": {"schedule": "taid_adaptive"}}, max_steps=10)
    taid.current(0)
    with pytest.raises(ConfigError, match="taid.params.t: taid_adaptive observes 'loss/taid'"):
        taid.observe({"loss": 1.0})


def test_scheduled_values_state_round_trip_is_bit_exact():
    a = ScheduledValues.from_terms(_yaml_terms(), max_steps=30)
    for step, loss in enumerate(LOSSES[:7]):
        a.current(step)
        a.observe({"loss/taid": loss})
    b = ScheduledValues.from_terms(_yaml_terms(), max_steps=30)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step, loss in enumerate(LOSSES[7:], start=7):
        assert a.current(step) == b.current(step)
        a.observe({"loss/taid": loss})
        b.observe({"loss/taid": loss})
    assert a.state_dict() == b.state_dict()


def test_a_checkpoint_of_other_schedules_is_refused():
    saved = ScheduledValues.from_terms(_yaml_terms(), max_steps=10).state_dict()
    other = ScheduledValues({"dkd.weight": {"schedule": "constant", "value": 1.0}}, max_steps=10)
    with pytest.raises(CheckpointError, match="saved, not scheduled now: \\['taid.params.t'\\]"):
        other.load_state_dict(saved)
    kinds = ScheduledValues({"dkd.weight": {"schedule": "constant", "value": 1.0},
                             "taid.params.t": {"schedule": "taid_adaptive"}}, max_steps=10)
    with pytest.raises(CheckpointError, match="'dkd.weight' was a 'warmup' schedule when saved, now it is 'constant'"):
        kinds.load_state_dict(saved)


# -- in the trainer ----------------------------------------------------------------------------------

def _distiller(out_dir, max_steps=6, save_every=None):
    torch.manual_seed(0)
    terms = [LossTerm("forward_kl", {"schedule": "linear", "start": 1.0, "end": 0.0}),
             {"name": "taid", "weight": 0.5, "params": {"t": {"schedule": "taid_adaptive", "t_start": 0.3}}},
             LossTerm("cross_entropy", {"schedule": "warmup", "value": 1.0, "warmup_steps": 4})]
    return Distiller(MLP(), MLP(scale=2.0), task=ClassificationTask(), objective=terms,
                     config=TrainConfig(max_steps=max_steps, batch_size=8, lr=1e-2, progress=False, log_every=1,
                                        save_every=save_every, output_dir=str(out_dir)),
                     train_data=ClassDataset(n=32))


def test_the_trainer_uses_and_logs_the_scheduled_values(tmp_path):
    _distiller(tmp_path).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["sched/forward_kl.weight"] for r in train] == pytest.approx([1 - s / 6 for s in range(6)])
    assert [r["sched/cross_entropy.weight"] for r in train] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    t = [r["sched/taid.params.t"] for r in train]
    assert t[0] == pytest.approx(0.3) and all(a <= b for a, b in zip(t, t[1:])) and t[-1] > t[0]
    for r in train:  # the loss used the scheduled weights: total = sum_i w_i(step) * term_i
        expect = (r["sched/forward_kl.weight"] * r["loss/forward_kl"] + 0.5 * r["loss/taid"]
                  + r["sched/cross_entropy.weight"] * r["loss/cross_entropy"])
        assert math.isclose(r["loss"], expect, rel_tol=1e-5)


def test_a_resumed_run_continues_its_schedules_bit_exactly(tmp_path):
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


# -- docs/schedules.md cannot drift from the code ------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "schedules.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_docs_yaml_terms_are_valid_scheduled_terms():
    terms = yaml.safe_load(_blocks("yaml")[0])
    parsed = [LossTerm.model_validate(t) for t in terms]
    values = ScheduledValues.from_terms([(t["name"], t["weight"], t.get("params", {})) for t in terms],
                                        max_steps=1000)
    assert values.paths == ["dkd.weight", "taid.params.t", "forward_kl.weight", "cross_entropy.weight"]
    assert values.current(99) == {"dkd.weight": 0.5, "taid.params.t": 0.4, "forward_kl.weight": 1.0,
                                  "cross_entropy.weight": 0.0}
    assert values.current(550)["forward_kl.weight"] == pytest.approx(0.6)  # half-way through [100, 1000]
    assert values.current(500)["cross_entropy.weight"] == 0.5
    assert sorted(path for t in parsed for path in t.scheduled) == ["params.t", "weight", "weight", "weight"]


def test_the_docs_python_example_runs():
    namespace: dict = {}
    exec(compile(_blocks("python")[0], str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["warm"].value(99, 1000) == 0.5
    ref = TAIDSchedule(1000)
    ref.step(2.3)  # the example observed one step
    assert namespace["values"].current(1) == {"dkd.weight": 0.01, "taid.params.t": ref.t}


def test_the_docs_recipe_for_a_new_schedule_is_a_class_and_one_line(monkeypatch):
    from kdforge.registry import Registry
    from kdforge.train import schedules

    monkeypatch.setattr(schedules, "SCHEDULES", Registry("schedule"))  # keep the real registry clean
    namespace: dict = {}
    exec(compile(_blocks("python")[1], str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    decay = build_schedule({"schedule": "exponential", "start": 1.0, "gamma": 0.5})
    assert isinstance(decay, namespace["Exponential"]) and decay.value(3, 10) == 0.125
    with pytest.raises(ConfigError, match="gama: unknown key \\(did you mean 'gamma'\\?\\)"):
        build_schedule({"schedule": "exponential", "start": 1.0, "gama": 0.5})
    with pytest.raises(ConfigError, match="gamma: Input should be greater than 0"):
        build_schedule({"schedule": "exponential", "start": 1.0, "gamma": 0.0})


def test_the_json_schema_of_a_scheduled_field_lists_every_schedule_strictly():
    jsonschema = pytest.importorskip("jsonschema")
    schema = _Recipe.model_json_schema()
    weight = schema["$defs"]["_Term"]["properties"]["weight"]
    assert [m.get("title") for m in weight["anyOf"]] == [None, *[f"schedule: {n}" for n in SCHEDULES.names()]]
    good = {"objective": [{"name": "dkd", "weight": {"schedule": "warmup", "value": 1.0, "warmup_steps": 0.1}},
                          {"name": "ce", "weight": 0.5, "params": {"t": {"schedule": "taid_adaptive"}}}]}
    jsonschema.validate(good, schema)
    for bad in ({"schedule": "warmup", "value": 1.0, "warmup_stpes": 3}, {"value": 1.0},
                {"schedule": "warmup", "value": 1.0, "warmup_steps": 2.5}, "heavy"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"objective": [{"name": "dkd", "weight": bad}]}, schema)
