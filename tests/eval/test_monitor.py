"""Teacher-hacking monitor on constructed metric histories."""

from __future__ import annotations

import logging
import math

import pytest

from kdforge.errors import ConfigError
from kdforge.eval.monitor import (
    FLAG_KEY,
    TeacherHackingCallback,
    TeacherHackingMonitor,
    detect_teacher_hacking,
)
from kdforge.train.callbacks import TrainerState


def _hist(teacher, oracle, key="eval/nll"):
    return [{"step": 10 * i, "split": "eval", "eval/kl_to_teacher": t, key: o}
            for i, (t, o) in enumerate(zip(teacher, oracle))]


def test_flags_when_teacher_distance_falls_while_oracle_rises():
    teacher = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8, 0.6]
    oracle = [3.0, 2.8, 2.7, 2.7, 2.8, 2.9, 3.0, 3.1]
    checks = detect_teacher_hacking(_hist(teacher, oracle), window=3, tolerance=0.01)
    flagged = [c.step for c in checks if c.flagged]
    assert flagged and flagged[0] == 50
    assert all(c.step >= 50 for c in checks if c.flagged)
    assert checks[-1].teacher_change < 0 < checks[-1].oracle_change


def test_no_flag_when_both_distances_fall():
    teacher = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0]
    oracle = [3.0, 2.9, 2.8, 2.75, 2.7, 2.68]
    assert not any(c.flagged for c in detect_teacher_hacking(_hist(teacher, oracle)))


def test_no_flag_when_oracle_rises_but_teacher_distance_rises_too():
    # plain overfitting / divergence: both curves go up, that is not teacher hacking
    teacher = [1.0, 1.1, 1.2, 1.3, 1.4]
    oracle = [3.0, 3.1, 3.2, 3.3, 3.4]
    assert not any(c.flagged for c in detect_teacher_hacking(_hist(teacher, oracle)))


def test_tolerance_ignores_small_noise_in_the_oracle():
    teacher = [2.0, 1.9, 1.8, 1.7, 1.6, 1.5]
    oracle = [3.0, 3.003, 2.998, 3.004, 3.0, 3.006]  # wiggles of 0.1%
    assert not any(c.flagged for c in detect_teacher_hacking(_hist(teacher, oracle), tolerance=0.01))
    assert any(c.flagged for c in detect_teacher_hacking(_hist(teacher, oracle), tolerance=0.0))


def test_perplexity_oracle_is_compared_in_log_space_and_records_are_filtered():
    teacher = [2.0, 1.8, 1.6, 1.4, 1.2]
    ppl = [math.exp(v) for v in [3.0, 2.9, 3.0, 3.1, 3.2]]
    hist = _hist(teacher, ppl, key="eval/perplexity")
    hist.insert(2, {"step": 15, "split": "train", "loss": 1.0})
    hist.insert(0, {"step": 0, "split": "eval", "eval/accuracy": 0.3})  # no curves: skipped
    checks = detect_teacher_hacking(hist, window=3)
    assert len(checks) == 5
    assert checks[-1].flagged
    assert checks[-1].oracle_change == pytest.approx(
        (0.1 * 3) / ((2.9 + 3.0 + 3.1 + 3.2) / 4), rel=1e-6)
    assert checks[-1].oracle_value == pytest.approx(ppl[-1])


def test_monitor_reports_onset_and_best_oracle_step_and_round_trips_state():
    mon = TeacherHackingMonitor(window=2)
    for i, (t, o) in enumerate(zip([2, 1.5, 1.0, 0.5, 0.2], [3.0, 2.5, 2.6, 2.9, 3.3])):
        mon.update(100 * i, {"eval/kl_to_teacher": t, "eval/nll": o})
    assert mon.best_oracle_step == 100
    assert mon.onset_step == 300
    assert mon.summary()["teacher_key"] == "eval/kl_to_teacher"
    other = TeacherHackingMonitor(window=2)
    other.load_state_dict(mon.state_dict())
    assert other.summary() == mon.summary()


def test_invalid_window_is_a_config_error():
    with pytest.raises(ConfigError):
        TeacherHackingMonitor(window=0)


def test_callback_writes_flags_into_eval_metrics_and_warns(caplog):
    cb = TeacherHackingCallback(TeacherHackingMonitor(window=2), stop=True)
    state = TrainerState(max_steps=100)
    seen = []
    with caplog.at_level(logging.WARNING, logger="kdforge.eval.monitor"):
        for i, (t, o) in enumerate(zip([2.0, 1.5, 1.0, 0.5], [3.0, 2.8, 2.9, 3.3])):
            state.step = 10 * (i + 1)
            metrics = {"eval/kl_to_teacher": t, "eval/nll": o}
            cb.on_evaluate(state, metrics)
            seen.append(metrics[FLAG_KEY])
            if state.should_stop:
                break
    assert seen == [0.0, 0.0, 0.0, 1.0]
    assert state.should_stop
    assert "teacher hacking at step 40" in caplog.text
    assert cb.state_dict()["steps"] == [10, 20, 30, 40]


def test_callback_without_the_needed_metrics_leaves_metrics_untouched(caplog):
    cb = TeacherHackingCallback()
    metrics = {"eval/accuracy": 0.5}
    with caplog.at_level(logging.WARNING, logger="kdforge.eval.monitor"):
        cb.on_evaluate(TrainerState(step=1), metrics)
    assert metrics == {"eval/accuracy": 0.5}
    assert "needs a distance" in caplog.text
