"""Shipped recipes: the package holds every YAML the repository's configs/ shows (same bytes),
`kdforge recipes list` names and describes them, `kdforge init` copies one with its comments and
never overwrites, and every shipped run recipe validates against its config model."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdforge.cli.main import main
from kdforge.configs import copy_recipe, find_recipe, shipped_recipes
from kdforge.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_repository_configs_are_the_shipped_files():
    shipped = {f"{r.name}.yaml": r.path for r in shipped_recipes()}
    repo = {p.relative_to(REPO_CONFIGS).as_posix(): p
            for p in [*REPO_CONFIGS.glob("*.yaml"), *(REPO_CONFIGS / "accelerate").glob("*.yaml")]}
    assert set(repo) == set(shipped)
    for name, path in repo.items():
        assert path.read_bytes() == shipped[name].read_bytes(), name


def test_every_shipped_yaml_has_a_description_and_a_kind():
    recipes = shipped_recipes()
    assert {"quickstart", "fashion_mnist", "accelerate/cpu_2proc"} <= {r.name for r in recipes}
    for recipe in recipes:
        assert recipe.description, f"{recipe.name}: add a top comment saying what it does"
        assert recipe.kind in {"run", "generate", "accelerate"}
        if recipe.kind != "accelerate":
            assert recipe.recipe, recipe.name


@pytest.mark.parametrize("name", [r.name for r in shipped_recipes() if r.kind == "run"])
def test_every_shipped_run_recipe_validates(name):
    from kdforge.recipes import load_recipe_file

    load_recipe_file(find_recipe(name).path)


def test_recipes_list_prints_names_and_descriptions(capsys):
    assert main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "kdforge run" in out and "accelerate/" not in out
    assert main(["recipes", "list", "--all"]) == 0
    assert "accelerate/fsdp_8gpu" in capsys.readouterr().out


def test_init_copies_with_comments_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["init", "quickstart", str(tmp_path / "mine")]) == 0
    target = tmp_path / "mine" / "quickstart.yaml"
    assert target.read_text() == find_recipe("quickstart").path.read_text()
    assert target.read_text().startswith("#")
    assert f"kdforge run {target}" in capsys.readouterr().out
    target.write_text("recipe: llm_kd  # my edits\n")
    assert main(["init", "quickstart", str(tmp_path / "mine")]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert target.read_text() == "recipe: llm_kd  # my edits\n"


def test_init_accepts_yaml_suffix_and_accelerate_names_and_suggests_close_names(tmp_path):
    assert copy_recipe("taid.yaml", tmp_path).name == "taid.yaml"
    assert copy_recipe("accelerate/cpu_2proc", tmp_path).name == "cpu_2proc.yaml"
    with pytest.raises(ConfigError, match="did you mean 'quickstart'"):
        find_recipe("quikstart")
