"""The ``stages`` recipe: a teacher-assistant chain on a tiny teacher, per-stage resume, reference errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdforge.config import validate
from kdforge.errors import ConfigError
from kdforge.recipes import load_recipe_file
from kdforge.recipes.stages import Stages, StagesConfig, plan_stages

from ._tiny import seeded_teacher_and_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return seeded_teacher_and_corpus(tmp_path_factory.mktemp("stages"))


def _llm(root: Path, **overrides) -> dict:
    """An inline llm_kd stage config: tiny data, a few steps, one KD method (role student)."""
    return {
        "teacher": {"model": str(root / "teacher")},
        "student": {"layers": "first_last"},
        "data": {"corpus": str(root / "corpus"), "train_docs": ["book_a"], "eval_docs": ["book_b"],
                 "seq_len": 16, "train_sequences": 8, "eval_sequences": 4},
        "cache": {"k": 8, "batch_size": 4},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 2, "eval_every": None,
                  "progress": False},
        "methods": [{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}],
        "eval": {"batch_size": 2, "during_training_sequences": 0, "speed_batch": 2, "speed_repeats": 1},
        "plot": False,
        **overrides,
    }


def _chain(root: Path, **top) -> StagesConfig:
    """teacher (4 layers) -> assistant (2 layers, distilled) -> student (1 layer, distilled from the assistant)."""
    stages = [
        {"name": "assistant", "config": _llm(root)},
        {"name": "student", "config": _llm(root, teacher={"model": "{stages.assistant.student}"}),
         "overrides": {"student.layers": [0]}},
    ]
    return validate(StagesConfig, {"stages": stages, **top}, source="test")


def test_the_second_stage_is_taught_by_the_first_stages_saved_student(tiny, tmp_path):
    out = tmp_path / "run"
    summary = Stages().run(_chain(tiny), out)

    assistant = out / "assistant" / "kd" / "seed-0" / "student"
    assert (assistant / "config.json").is_file() and (assistant / "model.safetensors").is_file()
    second = yaml.safe_load((out / "student" / "config.yaml").read_text())
    assert second["teacher"]["model"] == str(assistant)  # the folder is what stage 2 loaded as its teacher
    first = json.loads((out / "assistant" / "results.json").read_text())
    results = json.loads((out / "student" / "results.json").read_text())
    teacher_row, kd_row = results["models"]
    # stage 2's teacher is the 2-layer assistant (stage 1's student), not the 4-layer original
    assert teacher_row["params"] == first["models"][1]["params"] < first["models"][0]["params"]
    assert teacher_row["metrics"]["perplexity"] == pytest.approx(first["models"][1]["metrics"]["perplexity"], rel=1e-4)
    # the 1-layer student moved toward the assistant
    assert kd_row["metrics"]["kl_to_teacher"] < results["student_init"]["kl_to_teacher"]
    assert yaml.safe_load((out / "student" / "config.yaml").read_text())["student"]["layers"] == [0]

    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    rows = {(r["stage"], r["model"]): r for r in summary["models"]}
    assert set(rows) == {("assistant", "teacher"), ("assistant", "student / kd"),
                         ("student", "teacher"), ("student", "student / kd")}
    assert rows[("student", "teacher")]["teacher"] == "{stages.assistant.student}"
    assert "| student | student / kd | student | {stages.assistant.student} |" in (out / "results.md").read_text()
    for name in ("stage.json", "fingerprint.txt"):
        assert (out / "assistant" / name).is_file() and (out / "student" / name).is_file()


def test_resume_skips_finished_stages_and_a_changed_stage_reruns_with_every_later_one(tiny, tmp_path, caplog):
    out = tmp_path / "run"
    config = _chain(tiny)
    Stages().run(config, out)
    weights = out / "student" / "kd" / "seed-0" / "student" / "model.safetensors"
    before = weights.read_bytes()

    with caplog.at_level("INFO"):
        again = Stages().run(config, out, resume=True)
    assert "stage 'assistant' finished earlier" in caplog.text and "stage 'student' finished earlier" in caplog.text
    assert "running llm_kd" not in caplog.text
    assert again["models"][3]["metrics"]["perplexity"] == pytest.approx(
        json.loads((out / "results.json").read_text())["models"][3]["metrics"]["perplexity"])

    caplog.clear()  # stage 2 changed: stage 1 is kept, stage 2 reruns
    changed = _chain(tiny)
    changed.stages[1].overrides["train.lr"] = 5e-3
    with caplog.at_level("INFO"):
        Stages().run(changed, out, resume=True)
    assert "stage 'assistant' finished earlier" in caplog.text
    assert "stage 'student': its config or an earlier stage changed" in caplog.text
    assert weights.read_bytes() != before

    caplog.clear()  # stage 1 changed: it and the stage after it rerun, though stage 2's own config did not change
    changed.stages[0].overrides["train.lr"] = 5e-3
    with caplog.at_level("INFO"):
        Stages().run(changed, out, resume=True)
    assert "finished earlier" not in caplog.text
    assert "stage 'assistant': its config or an earlier stage changed" in caplog.text
    assert "stage 'student': its config or an earlier stage changed" in caplog.text


def test_a_damaged_student_reruns_its_stage(tiny, tmp_path, caplog):
    out = tmp_path / "run"
    config = validate(StagesConfig, {"stages": [{"name": "only", "config": _llm(tiny)}]}, source="test")
    Stages().run(config, out)
    weights = out / "only" / "kd" / "seed-0" / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with caplog.at_level("INFO"):
        Stages().run(config, out, resume=True)
    assert "is missing or changed; rerunning the stage" in caplog.text and "finished earlier" not in caplog.text


def test_chain_seeds_run_the_chain_per_seed_and_score_every_student_against_the_reference_teacher(tiny, tmp_path):
    out = tmp_path / "run"
    summary = Stages().run(_chain(tiny, seeds=[0, 1], reference={"stage": "assistant", "batch_size": 2}), out)

    for seed in (0, 1):
        second = yaml.safe_load((out / f"seed-{seed}" / "student" / "config.yaml").read_text())
        assert second["seeds"] == [seed]
        assert second["teacher"]["model"] == str(out / f"seed-{seed}" / "assistant" / "kd" / f"seed-{seed}" / "student")
    rows = {(r["stage"], r["model"]): r for r in summary["models"]}
    direct = rows[("assistant", "student / kd")]
    via = rows[("student", "student / kd")]
    assert [p["seed"] for p in direct["per_seed"]] == [p["seed"] for p in via["per_seed"]] == [0, 1]
    assert all(0.0 <= p["ref_agreement"] <= 1.0 for p in via["per_seed"])
    assert "perplexity_std" in via["metrics"] and 0.0 <= via["metrics"]["ref_agreement"] <= 1.0
    # stage 1's teacher is the reference teacher: its own fidelity and the reference one agree
    assert direct["metrics"]["ref_agreement"] == pytest.approx(direct["metrics"]["agreement"], abs=1e-6)
    assert direct["metrics"]["ref_kl_to_teacher"] == pytest.approx(direct["metrics"]["kl_to_teacher"], rel=1e-4)
    assert "agreement (reference teacher)" in (out / "results.md").read_text()
    # results.json is in the run format, so `kdforge run`'s closing HTML report renders it
    from kdforge.eval.report import build_report

    assert build_report([out], out / "report").html.is_file()


@pytest.mark.parametrize(("teacher", "message"), [
    ("{stages.nope.student}", "there is no stage named 'nope'"),
    ("{stages.second.student}", "refers to itself"),
    ("{stages.third.student}", "stage 'third', which runs after it"),
    ("{stages.first.weights}", "is not a stage reference"),
    ("{stages.first.dir[kd]}", "only .student takes [METHOD]"),
])
def test_bad_references_are_config_errors(tiny, teacher, message):
    stages = [{"name": "first", "config": _llm(tiny)},
              {"name": "second", "config": _llm(tiny, teacher={"model": teacher})},
              {"name": "third", "config": _llm(tiny)}]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(StagesConfig, {"stages": stages}, source="test")


@pytest.mark.parametrize(("first", "reference", "message"), [
    ({"save_students": False}, "{stages.first.student}", "saves none .save_students: false"),
    ({"methods": [{"name": "a", "objective": [{"name": "forward_kl", "weight": 1.0}]},
                  {"name": "b", "objective": [{"name": "forward_kl", "weight": 0.5}]}]},
     "{stages.first.student}", "trains 2 methods of role student"),
    ({}, "{stages.first.student[nope]}", "has no method named 'nope'"),
    ({"seeds": [0, 1]}, "{stages.first.student}", "trains seeds \\[0, 1\\]"),
])
def test_a_reference_to_a_stage_without_one_saved_student_fails_before_anything_runs(tiny, tmp_path, first,
                                                                                   reference, message):
    config = validate(StagesConfig, {"stages": [
        {"name": "first", "config": _llm(tiny, **first)},
        {"name": "second", "config": _llm(tiny, teacher={"model": reference})}]}, source="test")
    with pytest.raises(ConfigError, match=message):
        Stages().run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_named_method_and_a_stage_dir_resolve(tiny, tmp_path):
    methods = [{"name": "labels only", "role": "baseline", "objective": [{"name": "cross_entropy", "weight": 1.0}]},
               {"name": "KD top-8", "objective": [{"name": "forward_kl", "weight": 1.0}]}]
    config = validate(StagesConfig, {"stages": [
        {"name": "a", "config": _llm(tiny, methods=methods)},
        {"name": "b", "config": _llm(tiny, teacher={"model": "{stages.a.student[labels only]}"},
                                     cache={"k": 8, "dir": "{stages.a.dir}/b_cache"})}]}, source="test")
    (_, b), = plan_stages(config, tmp_path)
    assert b.config.teacher.model == str(tmp_path / "a" / "labels-only" / "seed-0" / "student")
    assert b.config.cache.dir == str(tmp_path / "a" / "b_cache")
    (_, moved), = plan_stages(config, tmp_path / "elsewhere")  # a chain copied to another run folder is reused
    assert moved.fingerprint == b.fingerprint and moved.config.teacher.model != b.config.teacher.model


def test_unknown_stage_keys_and_duplicate_names_are_rejected(tiny):
    with pytest.raises(ConfigError, match="unique"):
        validate(StagesConfig, {"stages": [{"name": "a"}, {"name": "a"}]}, source="test")
    with pytest.raises(ConfigError, match="unknown key"):
        validate(StagesConfig, {"stages": [{"name": "a", "confg": {}}]}, source="test")
    with pytest.raises(ConfigError, match="reference.stage"):
        validate(StagesConfig, {"stages": [{"name": "a"}], "reference": {"stage": "b"}}, source="test")


def test_shipped_progressive_yaml_plans_a_teacher_assistant_chain(tmp_path):
    recipe, config = load_recipe_file(REPO / "configs" / "progressive.yaml")
    assert isinstance(recipe, Stages)
    chains = plan_stages(config, tmp_path)
    assert len(chains) == len(config.seeds) >= 2
    by_name = {s.name: s for s in chains[0]}
    assistant, via = by_name["assistant"], by_name["via_assistant"]
    assert via.config.teacher.model == str(assistant.student_folder(None, "test"))
    layers = lambda s: len(s.config.student.layers) if isinstance(s.config.student.layers, list) \
        else s.config.student.num_layers  # noqa: E731
    assert layers(assistant) == 12 and layers(via) == layers(by_name["direct"]) == 6
    assert via.config.train.max_steps == by_name["direct"].config.train.max_steps


def test_common_overrides_reach_every_stage_before_its_own_and_a_mapping_merges_into_its_section(tiny, tmp_path):
    config = validate(StagesConfig, {
        "overrides": {"train.max_steps": 2, "data": {"seq_len": 8}},  # as --set overrides.data.seq_len=8 writes it
        "stages": [{"name": "a", "config": _llm(tiny)},
                   {"name": "b", "config": _llm(tiny), "overrides": {"train.max_steps": 3}}]}, source="test")
    (a, b), = plan_stages(config, tmp_path)
    assert a.config.data.seq_len == b.config.data.seq_len == 8
    assert a.config.data.corpus == str(tiny / "corpus")  # the rest of data: is kept
    assert (a.config.train.max_steps, b.config.train.max_steps) == (2, 3)


def test_any_recipe_runs_as_a_stage_from_its_config_file_but_only_llm_kd_stages_lend_a_student(tmp_path):
    from kdforge.data.vision import write_synthetic_fashion_mnist

    data = write_synthetic_fashion_mnist(tmp_path / "fm", n_train=200, n_test=50)
    tiny = {"data.root": str(data), "data.labelled": 40, "data.transfer": 60, "teacher.arch": "mlp",
            "teacher.kwargs": {"hidden": [64]}, "teacher.epochs": 1, "train.epochs": 1, "train.batch_size": 32,
            "eval.latency_warmup": 1, "eval.latency_repeats": 1,
            "methods": [{"name": "labels only", "role": "baseline", "terms": [{"name": "cross_entropy", "weight": 1.0}]}]}
    stages = [{"name": "fm", "config": str(REPO / "configs" / "fashion_mnist.yaml"), "overrides": tiny}]
    summary = Stages().run(validate(StagesConfig, {"stages": stages, "seeds": [0]}, source="test"), tmp_path / "run")
    assert (tmp_path / "run" / "seed-0" / "fm" / "results.json").is_file()
    roles = {(r["stage"], r["role"]) for r in summary["models"]}
    assert roles == {("fm", "teacher"), ("fm", "baseline")}
    assert summary["primary_metric"] == "accuracy" and 0.0 <= summary["models"][1]["metrics"]["accuracy"] <= 1.0

    with pytest.raises(ConfigError, match="reference.stage: stage 'fm' runs fashion_mnist_kd, not llm_kd"):
        plan_stages(validate(StagesConfig, {"stages": stages, "reference": {"stage": "fm"}}, source="test"), tmp_path)
    stages.append({"name": "next", "config": {}, "overrides": {"teacher.model": "{stages.fm.student}"}})
    with pytest.raises(ConfigError, match="runs fashion_mnist_kd, which saves no student folder"):
        plan_stages(validate(StagesConfig, {"stages": stages}, source="test"), tmp_path / "other")
