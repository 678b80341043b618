"""docs/config-reference.md and docs/kdforge-config.schema.json match the config models (rerun
`python tools/gen_config_reference.py` after changing a config), and the schema accepts every
shipped YAML and rejects a misspelt key, as `kdforge run` does."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "tools" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_checked_in_reference_and_schema_match_the_code():
    gen = _generator()
    markdown, schema = gen.render()
    assert (ROOT / "docs" / "config-reference.md").read_text() == markdown, \
        "docs/config-reference.md is stale: run python tools/gen_config_reference.py"
    assert (ROOT / "docs" / "kdforge-config.schema.json").read_text() == schema, \
        "docs/kdforge-config.schema.json is stale: run python tools/gen_config_reference.py"
    assert gen.main(["--check"]) == 0


def test_every_recipe_and_every_key_of_its_model_is_documented():
    from kdforge.recipes import known_recipes, load_recipe

    text = (ROOT / "docs" / "config-reference.md").read_text()
    for name in known_recipes():
        assert f"## recipe: {name}" in text
        for key in load_recipe(name).config_model.model_fields:
            assert f"| `{key}` |" in text, (name, key)


def test_schema_accepts_the_shipped_yamls_and_rejects_a_typo():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "kdforge-config.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    from kdforge.configs import shipped_recipes

    for recipe in shipped_recipes(include_accelerate=False):
        data = yaml.safe_load(recipe.path.read_text())
        errors = [e.message for e in validator.iter_errors(data)]
        assert not errors, (recipe.name, errors[:3])
    bad = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    bad["train"]["lrr"] = 1e-3
    assert not validator.is_valid(bad)
    bad = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    bad["recipe"] = "no_such_recipe"
    assert not validator.is_valid(bad)


def test_a_scheduled_weight_renders_as_its_schedule_not_as_a_number():
    """A default (or a resolved config) holding a term whose weight is a schedule shows the schedule."""
    from pydantic import Field

    from kdforge.config import StrictModel
    from kdforge.train.objective import LossTerm

    gen = _generator()
    schedule = {"schedule": "linear", "start": 0.0, "end": 1.0}
    term = LossTerm.model_validate({"name": "forward_kl", "weight": schedule,
                                    "params": {"temperature": {"schedule": "cosine", "start": 2.0, "end": 1.0}}})
    assert gen._plain(term)["weight"] == schedule
    assert gen._plain(term)["params"]["temperature"]["schedule"] == "cosine" and "scheduled" not in gen._plain(term)

    class _Method(StrictModel):
        objective: list[LossTerm] = Field(default_factory=lambda: [LossTerm.model_validate(
            {"name": "forward_kl", "weight": {"schedule": "linear", "start": 0.0, "end": 1.0}})])

    (row,) = [r for r in gen._rows(_Method, "", (_Method,)) if r[0] == "objective"]
    assert '"weight": {"schedule": "linear"' in row[2] and '"weight": 0.0' not in row[2]
    assert LossTerm.model_validate(term.model_dump(mode="json")) == term  # the dump reads back as the same term


def test_method_names_document_their_folder_rule():
    text = (ROOT / "docs" / "config-reference.md").read_text()
    assert "| `methods[].name` | `str` | **required** | any text; its folder under RUN_DIR" in text
