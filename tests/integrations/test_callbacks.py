"""TeacherHackingCallback: HF metric names read as kdforge's, the flag written back, training
stopped on request, the monitor's history carried through a checkpoint (ExportableState)."""

from __future__ import annotations

from transformers import TrainerControl, TrainerState

from kdforge.eval.monitor import detect_teacher_hacking
from kdforge.integrations import TeacherHackingCallback


def _history():
    # distance to the teacher falls all along; held-out NLL falls, then rises from step 5
    return [{"eval_kl_to_teacher": 2.0 - 0.1 * s, "eval_nll": 3.0 - 0.1 * s if s <= 4 else 2.6 + 0.05 * (s - 4),
             "eval_loss": 1.0} for s in range(10)]


def _run(callback, history):
    state, control = TrainerState(), TrainerControl()
    flags = []
    for step, metrics in enumerate(history):
        state.global_step = step
        metrics = dict(metrics)
        callback.on_evaluate(None, state, control, metrics=metrics)
        flags.append(metrics.get("eval_teacher_hacking"))
        if control.should_training_stop:
            break
    return flags, state, control


def test_flags_the_same_steps_as_the_detector_on_kdforge_names():
    flags, state, _ = _run(TeacherHackingCallback(), _history())
    reference = detect_teacher_hacking([{"step": s, "eval/kl_to_teacher": r["eval_kl_to_teacher"],
                                         "eval/nll": r["eval_nll"]} for s, r in enumerate(_history())])
    assert [s for s, f in enumerate(flags) if f == 1.0] == [c.step for c in reference if c.flagged]
    assert any(f == 1.0 for f in flags)
    assert any("eval_teacher_hacking_oracle_change" in r for r in state.log_history)


def test_stop_ends_training_at_the_first_flag():
    flags, _, control = _run(TeacherHackingCallback(stop=True), _history())
    assert control.should_training_stop and flags[-1] == 1.0 and flags.count(1.0) == 1


def test_explicit_keys_in_hf_spelling_and_state_round_trip():
    cb = TeacherHackingCallback(teacher_key="eval_kl_to_teacher", oracle_key="eval_nll", window=2)
    _run(cb, _history()[:6])
    restored = TeacherHackingCallback.from_state(cb.state())
    assert restored.monitor.steps == cb.monitor.steps and restored.monitor.oracle_key == "eval/nll"
    a, _, _ = _run(cb, _history()[6:])
    b, _, _ = _run(restored, _history()[6:])
    assert a == b


def test_metrics_without_either_curve_are_left_alone():
    cb = TeacherHackingCallback()
    metrics = {"eval_loss": 1.0}
    cb.on_evaluate(None, TrainerState(), TrainerControl(), metrics=metrics)
    assert metrics == {"eval_loss": 1.0}
