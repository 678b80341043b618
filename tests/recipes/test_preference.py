"""The preference recipe end to end on a tiny arithmetic model, its task helpers and its pairs."""

from __future__ import annotations

import json

import pytest
from tests.recipes._arith import tiny_arith_model

from kdforge.recipes import load_recipe
from kdforge.recipes.preference import (
    ArithmeticTask,
    PreferenceConfig,
    arithmetic_prompts,
    check_answer,
)


def test_check_answer_reads_the_last_integer():
    assert check_answer("3 + 4 = 7", 7)
    assert check_answer("7", 7)
    assert not check_answer("3 + 4 = 8", 7)
    assert not check_answer("no number", 7)
    assert check_answer("1,024", 1024)


def test_arithmetic_prompts_are_seeded_and_correct():
    task = ArithmeticTask(ops=["+", "-", "*"], max_operand=9)
    a, b = arithmetic_prompts(task, 20, 3), arithmetic_prompts(task, 20, 3)
    assert a == b
    for text, value in a:
        x, op, y = text.removeprefix("What is ").removesuffix("? Answer:").partition(next(o for o in "+-*" if o in text))
        assert value == eval(f"{int(x)}{op}{int(y)}")  # noqa: S307 (digits and one operator)


def _config(root, out, **over):
    data = {"output_dir": str(out), "seeds": [0], "student": {"model": str(root), "device": "cpu"},
            "task": {"train_prompts": 6, "eval_prompts": 4, "max_operand": 5},
            "sampling": {"k": 4, "max_new_tokens": 4}, "methods": ["dpo", "rft"],
            "train": {"steps": 3, "batch_size": 4, "lr": 1e-3}, "eval_max_new_tokens": 4}
    data.update(over)
    return PreferenceConfig.model_validate(data)


def test_recipe_runs_and_resumes(tmp_path, monkeypatch):
    root, _, _ = tiny_arith_model(tmp_path / "m")
    # a random tiny model is never right: let the checker accept answers whose last token is even,
    # so that pairs exist and both methods train
    monkeypatch.setattr("kdforge.recipes.preference.check_answer",
                        lambda text, value: bool(text) and text.split()[-1].isdigit() and int(text.split()[-1]) % 2 == 0)
    cfg = _config(root, tmp_path / "run")
    recipe = load_recipe("preference")()
    assert recipe.check(cfg, tmp_path / "run") == []
    results = recipe.run(cfg, tmp_path / "run")
    names = [m["name"] for m in results["models"]]
    assert names == ["student (before)", "student + dpo", "student + rft"]
    seed = results["seeds"][0]
    assert seed["pairs"] > 0
    dpo = seed["methods"]["dpo"]["history"]
    assert len(dpo) == 3 and dpo[-1]["margin"] > dpo[0]["margin"]
    assert (tmp_path / "run" / "results.md").is_file()
    samples = json.loads((tmp_path / "run" / "samples" / "seed-0" / "samples.json").read_text())
    assert len(samples["rows"]) == 6
    # resume: nothing is retrained, the same numbers come back
    again = recipe.run(cfg, tmp_path / "run", resume=True)
    assert again["seeds"][0]["methods"]["dpo"]["history"] == dpo


def test_teacher_labels_need_a_reference(tmp_path):
    root, _, _ = tiny_arith_model(tmp_path / "m")
    cfg = _config(root, tmp_path / "run", labels="teacher")
    problems = load_recipe("preference")().check(cfg, tmp_path / "run")
    assert [p.key for p in problems] == ["labels"]


def test_teacher_labels_run(tmp_path):
    root, _, _ = tiny_arith_model(tmp_path / "m")
    ref, _, _ = tiny_arith_model(tmp_path / "ref", seed=1)
    cfg = _config(root, tmp_path / "run", labels="teacher", methods=["dpo"],
                  reference={"model": str(ref), "device": "cpu"})
    results = load_recipe("preference")().run(cfg, tmp_path / "run")
    assert results["seeds"][0]["pairs"] > 0


@pytest.mark.parametrize("key", ["labels"])
def test_unknown_label_kind_is_rejected(key, tmp_path):
    with pytest.raises(ValueError):
        _config(tmp_path, tmp_path / "run", **{key: "judge"})
