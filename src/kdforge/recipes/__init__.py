"""Recipes: complete, config-driven jobs that ``kdforge run RECIPE.yaml`` executes.

A recipe YAML names its kind in the top-level ``recipe:`` key; the rest is validated against
that recipe's pydantic config model (unknown keys rejected). A recipe module registers itself::

    @RECIPES.register("fashion_mnist_kd", "classic KD on Fashion-MNIST")
    class FashionMnistKD(Recipe):
        config_model = FashionMnistConfig
        def run(self, config, output_dir): ...

Recipe modules are imported lazily by name (see ``_RECIPE_MODULES``) so the CLI starts fast.
"""

from __future__ import annotations

import difflib
import importlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from kdforge.config import read_yaml, validate
from kdforge.errors import ConfigError
from kdforge.registry import Registry


class Recipe(ABC):
    """A runnable job: a config model plus a ``run`` method returning a results dict.

    The pre-flight hooks (``kdforge run --dry-run`` and the start of every run, see
    :mod:`kdforge.preflight`) default to the recipe's module in
    :data:`kdforge.preflight.CHECK_MODULES`; a recipe may override them:

    * :meth:`check` — every problem knowable without training, as a list (never raised one by one);
    * :meth:`estimate` — memory, disk (:class:`~kdforge.preflight.Estimate`), or None;
    * :meth:`probe` — seconds per optimizer step from two timed steps, or None.
    """

    config_model: ClassVar[type[BaseModel]]

    @abstractmethod
    def run(self, config: Any, output_dir: Path) -> dict[str, Any]: ...

    def check(self, config: Any, output_dir: Path) -> list[Any]:
        """Problems (:class:`kdforge.preflight.Problem`) of ``config`` found without training."""
        module = self._preflight_module()
        return module.check(config, Path(output_dir)) if module is not None else []

    def estimate(self, config: Any, output_dir: Path) -> Any:
        """The pre-flight :class:`~kdforge.preflight.Estimate` of a run, or None."""
        module = self._preflight_module()
        fn = getattr(module, "estimate", None)
        return fn(config, Path(output_dir)) if fn is not None else None

    def probe(self, config: Any) -> float | None:
        """Seconds per optimizer step measured on two steps of a stand-in run, or None."""
        module = self._preflight_module()
        fn = getattr(module, "probe", None)
        return fn(config) if fn is not None else None

    def _preflight_module(self) -> Any:
        from kdforge.preflight import checks_module

        return checks_module(recipe_name(type(self)))


def recipe_name(cls: type[Recipe]) -> str | None:
    """The name ``cls`` is registered under (None for an unregistered class)."""
    return next((e.name for e in RECIPES.entries() if e.obj is cls), None)


RECIPES: Registry[type[Recipe]] = Registry("recipe")

# recipe name -> module that registers it (imported on demand)
_RECIPE_MODULES: dict[str, str] = {
    "compare": "kdforge.recipes.compare",
    "cross_tokenizer_kd": "kdforge.recipes.cross_tokenizer",
    "diswot": "kdforge.recipes.diswot",
    "encoder_kd": "kdforge.recipes.encoder_kd",
    "fashion_mnist_kd": "kdforge.recipes.fashion_mnist",
    "llm_kd": "kdforge.recipes.llm_kd",
    "pgkd": "kdforge.recipes.pgkd",
    "preference": "kdforge.recipes.preference",
    "ranker_kd": "kdforge.recipes.ranker_kd",
    "stages": "kdforge.recipes.stages",
}


def load_recipe(name: str) -> type[Recipe]:
    module = _RECIPE_MODULES.get(name)
    if module is not None and name not in RECIPES:
        importlib.import_module(module)
    if name not in RECIPES:  # the registry alone knows only the recipes imported so far
        close = difflib.get_close_matches(name, known_recipes(), n=1)
        raise ConfigError(
            f"unknown recipe {name!r}",
            f"{f'did you mean {close[0]!r}? ' if close else ''}choose one of: {', '.join(known_recipes())}",
        )
    return RECIPES.get(name)


def known_recipes() -> list[str]:
    return sorted(set(_RECIPE_MODULES) | set(RECIPES.names()))


def load_recipe_file(
    path: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> tuple[Recipe, BaseModel]:
    """Read a recipe YAML, pick its recipe class by ``recipe:``, validate the rest."""
    data = read_yaml(path)
    name = data.pop("recipe", None)
    if name is None:
        raise ConfigError(
            f"{path}: missing top-level key 'recipe'",
            f"add e.g. `recipe: fashion_mnist_kd` (known recipes: {', '.join(known_recipes())})",
        )
    cls = load_recipe(str(name))
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    config = validate(cls.config_model, data, source=str(path))
    return cls(), config


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``--set a.b.c=v``; a number indexes a list (``methods.1.on_policy.lmbda=0.8``)."""
    parts = dotted.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {dotted!r}: {'.'.join(parts[:depth]) or 'the top level'} is a list of "
                    f"{len(node)} item(s), so {part!r} must be an index 0..{len(node) - 1}",
                    "check the key path (`kdforge run RECIPE.yaml --dry-run` prints the config)",
                )
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:depth])!r} is not a mapping or a list",
                              "check the key path")
