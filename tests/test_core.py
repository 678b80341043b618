"""Tests of the shared core: registry, config validation, atomic writes, CLI basics."""

from __future__ import annotations

import pytest
from pydantic import Field

from kdforge.cli.main import main
from kdforge.config import StrictModel, load_config
from kdforge.errors import ConfigError, KdforgeError
from kdforge.io import atomic_write, write_json_atomic
from kdforge.registry import Registry


def test_registry_lookup_is_exact_and_suggests_closest_name():
    reg: Registry = Registry("loss")
    reg.add("forward_kl", object(), "fkl")
    reg.add("skew_forward_kl", object(), "skl")
    assert reg.describe("forward_kl") == "fkl"
    with pytest.raises(ConfigError, match="did you mean 'forward_kl'"):
        reg.get("forwrd_kl")
    with pytest.raises(ConfigError):
        reg.get("kl")  # no substring matching
    reg.unregister("skew_forward_kl")
    assert reg.names() == ["forward_kl"]
    with pytest.raises(KeyError, match="not registered"):
        reg.unregister("skew_forward_kl")


class _Inner(StrictModel):
    hidden: int = 8


class _Outer(StrictModel):
    lr: float = 1e-3
    student: _Inner = Field(default_factory=_Inner)


def test_config_unknown_nested_key_names_key_and_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: fast\nstudent:\n  hiden: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(_Outer, path)
    msg = str(info.value)
    assert "student.hiden: unknown key (did you mean 'hidden'?)" in msg
    assert "lr:" in msg and "'fast'" in msg
    assert "2 problems" in msg


def test_config_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(_Outer, tmp_path / "nope.yaml")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_write(target, "w") as fh:
        fh.write("partial")
        raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_cli_version_and_error_exit_code(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "kdforge" in capsys.readouterr().out
    bad = tmp_path / "r.yaml"
    bad.write_text("recipe: no_such_recipe\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'no_such_recipe'" in err and "Traceback" not in err


def test_error_message_includes_fix():
    exc = KdforgeError("thing is broken", "do the fix")
    assert str(exc) == "thing is broken\n  Fix: do the fix"


def test_atomic_write_gives_normal_file_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "perm.json", {})
    finally:
        os.umask(mask)
    assert (tmp_path / "perm.json").stat().st_mode & 0o777 == 0o644


@pytest.fixture
def toy_recipe():
    """A throw-away recipe ``toy_for_report``, unregistered after the test whatever happens, so the
    config reference and ``recipes list`` tests of the same process see only the shipped recipes."""
    from kdforge.config import StrictModel as _Strict
    from kdforge.recipes import RECIPES, Recipe

    class _Cfg(_Strict):
        output_dir: str

    class _Toy(Recipe):
        config_model = _Cfg

        def run(self, config, output_dir):
            results = {"recipe": "toy_for_report", "primary_metric": "accuracy", "higher_is_better": True,
                       "models": [{"name": "teacher", "role": "teacher", "params": 1000,
                                   "metrics": {"accuracy": 0.9}},
                                  {"name": "student", "role": "student", "params": 10,
                                   "metrics": {"accuracy": 0.8}}]}
            output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(output_dir / "results.json", results)
            return results

    RECIPES.add("toy_for_report", _Toy, "test recipe")
    try:
        yield "toy_for_report"
    finally:
        RECIPES.unregister("toy_for_report")
    from kdforge.recipes import known_recipes

    assert "toy_for_report" not in known_recipes()


def test_kdforge_run_ends_by_writing_the_html_report_and_printing_its_path(toy_recipe, tmp_path, capsys):
    import json

    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"recipe: {toy_recipe}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["run", str(recipe)]) == 0
    html = tmp_path / "out" / "report" / "report.html"
    assert html.is_file()
    assert "student" in html.read_text()
    assert f"report: {html}" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["recipe"] == "toy_for_report"


def test_config_typo_inside_a_tagged_union_gets_a_suggestion():
    from typing import Annotated, Literal

    from pydantic import Field as F

    from kdforge.config import validate

    class _A(StrictModel):
        kind: Literal["a"] = "a"
        concurrency: int = 1

    class _B(StrictModel):
        kind: Literal["b"] = "b"
        depth: int = 1

    class _Job(StrictModel):
        backend: Annotated[_A | _B, F(discriminator="kind")]
        items: list[_Inner] = []

    with pytest.raises(ConfigError) as info:
        validate(_Job, {"backend": {"kind": "a", "concurency": 3}, "items": [{"hiden": 1}]})
    msg = str(info.value)
    assert "backend.a.concurency: unknown key (did you mean 'concurrency'?)" in msg
    assert "items.0.hiden: unknown key (did you mean 'hidden'?)" in msg


def test_kdforge_losses_lists_logit_and_feature_losses(capsys):
    from kdforge.cli.main import main

    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert "forward_kl" in out and "hidden_mse" in out and "attention_kl" in out


def test_set_overrides_index_into_lists_of_methods():
    from kdforge.errors import ConfigError
    from kdforge.recipes import _set_dotted

    data = {"methods": [{"name": "a"}, {"name": "b", "on_policy": {"lmbda": 0.5}}], "seeds": [0]}
    _set_dotted(data, "methods.1.on_policy.lmbda", 0.8)
    _set_dotted(data, "seeds.0", 3)
    _set_dotted(data, "train.lr", 1e-3)
    assert data["methods"][1]["on_policy"]["lmbda"] == 0.8 and data["seeds"] == [3]
    assert data["train"] == {"lr": 1e-3}
    with pytest.raises(ConfigError, match="index 0..1"):
        _set_dotted(data, "methods.2.name", "c")
    with pytest.raises(ConfigError, match="not a mapping or a list"):
        _set_dotted(data, "methods.0.name.x", 1)
