"""The shared pre-flight checkers, one by one (kdforge.preflight.checks)."""

from __future__ import annotations

import pytest
import torch

from kdforge.preflight import Problems
from kdforge.preflight.checks import (
    check_device,
    check_model_ref,
    check_objective,
    check_output_dir,
    random_signal,
)
from kdforge.train import LossTerm


def _check(terms, **kw) -> list[tuple[str, str]]:
    problems = Problems()
    check_objective(problems, "m", terms, **kw)
    return [(p.key, p.problem) for p in problems]


def test_a_valid_objective_passes_with_every_signal():
    terms = [LossTerm("forward_kl", 1.0, {"temperature": 2.0}), LossTerm("cross_entropy", 0.1)]
    for kind in ("dense", "sparse"):
        assert _check(terms, teacher=kind, k=4) == []
    assert _check([LossTerm("forward_kl", 1.0)], teacher="sparse", k=4, tail_samples=3) == []  # linear in p
    assert _check([LossTerm("cross_entropy", 1.0)], teacher="none") == []


def test_bad_values_and_signals_are_found_per_term():
    found = _check([LossTerm("cross_entropy", 1.0), LossTerm("jsd", 1.0, {"beta": 2.0}),
                    LossTerm("dkd", 1.0)], teacher="sparse", k=4)
    assert [k for k, _ in found] == ["m.1", "m.2"]
    assert "beta" in found[0][1] and "dense teacher logits" in found[1][1] and "top-4 teacher cache" in found[1][1]
    assert _check([LossTerm("reverse_kl", 1.0)], teacher="sparse", k=4, tail_samples=2)[0][0] == "m.0"
    assert "needs a teacher signal" in _check([LossTerm("forward_kl", 1.0)], teacher="none")[0][1]


def test_schedules_are_resolved_at_step_zero():
    term = LossTerm.model_validate({"name": "forward_kl", "weight": 1.0, "params": {
        "temperature": {"schedule": "linear", "start": -1.0, "end": 2.0}}})
    found = _check([term], teacher="dense", max_steps=10)
    assert found and "temperature" in found[0][1]  # -1 at step 0: refused before training


def test_the_sampled_signal_is_an_unbiased_estimate_that_sums_to_one():
    signal = random_signal("sparse", torch.randn(2, 3, 16), 4, 5)
    assert signal.num_exact == 4 and signal.k == 9
    assert torch.allclose(signal.logprobs.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    assert random_signal("none", torch.randn(1, 2), 1) is None


def test_model_refs(tmp_path, monkeypatch):
    problems = Problems()
    assert check_model_ref(problems, "a", "smollm2") == "asset"
    (tmp_path / "m").mkdir()
    assert check_model_ref(problems, "b", str(tmp_path / "m")) == "missing"  # a folder without config.json
    (tmp_path / "m" / "config.json").write_text("{}")
    assert check_model_ref(problems, "c", str(tmp_path / "m")) == "folder"
    assert check_model_ref(problems, "d", str(tmp_path / "nope" / "x" / "y")) == "missing"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_model_ref(problems, "e", "kdforge-test/not-cached") == "missing"
    assert [p.key for p in problems] == ["b", "d", "e"]
    assert "has no config.json" in problems.items[0].problem and "HF_HUB_OFFLINE" in problems.items[2].problem


def test_output_dir_under_a_file_or_being_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    problems = Problems()
    check_output_dir(problems, "o", tmp_path / "f" / "run")
    check_output_dir(problems, "o", tmp_path / "f")
    check_output_dir(problems, "o", tmp_path / "new" / "run")
    assert len(problems) == 2 and "is a file" in problems.items[0].problem
    assert "not a folder" in problems.items[1].problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_devices_this_machine_lacks():
    problems = Problems()
    for device in ("auto", "cpu", "cuda", "cuda:3", "tpu"):
        check_device(problems, device, device)
    assert [p.key for p in problems] == ["cuda", "cuda:3", "tpu"]


def test_a_learned_dac_kl_term_is_checked_with_a_stand_in_net_and_its_params_stay_as_configured():
    term = LossTerm("dac_kl", 1.0, {"learned": True, "mass": 0.8})
    assert _check([term], teacher="dense") == []
    assert term.params == {"learned": True, "mass": 0.8}  # the recipe attaches the real net later
    assert "dense teacher logits" in _check([term], teacher="sparse", k=4)[0][1]
