"""The recipes shipped inside the package: ``kdforge recipes list`` and ``kdforge init NAME DIR``.

Every ``*.yaml`` here (and the ``accelerate/`` launch configs) is installed with kdforge, so a
user of the wheel has them without the repository; the repository's ``configs/`` folder links
to these same files. A recipe's description is the first line of its top comment block; its
kind is read from its top-level key: ``recipe:`` (``kdforge run``), ``task:`` (``kdforge
generate``), or an ``accelerate launch`` config (``accelerate/NAME``).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kdforge.errors import ConfigError

__all__ = ["ShippedRecipe", "copy_recipe", "find_recipe", "shipped_recipes"]

#: The command each kind of YAML is given to.
COMMANDS = {"run": "kdforge run", "generate": "kdforge generate", "accelerate": "accelerate launch --config_file"}


@dataclass(frozen=True)
class ShippedRecipe:
    """One shipped YAML.

    Attributes:
        name: what ``kdforge init`` takes: the file stem, ``accelerate/STEM`` for launch configs.
        path: the installed file.
        kind: ``"run"``, ``"generate"`` or ``"accelerate"``.
        description: the first line of the file's top comment ("" when it has none).
        recipe: the value of its ``recipe:`` / ``task:`` key, when it has one.
    """

    name: str
    path: Path
    kind: str
    description: str
    recipe: str | None = None

    @property
    def command(self) -> str:
        return COMMANDS[self.kind]


def _root() -> Path:
    return Path(str(resources.files("kdforge.configs")))


def _describe(text: str) -> str:
    """The first sentence of the leading ``#`` comment block (its prose lines, joined).

    The block's prose ends at an empty comment line, an indented line (a command example) or the
    first non-comment line; the sentence ends at the first ``". "`` (or the prose's end).
    """
    prose: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped[1:]
        if not body.strip() or body.startswith("  "):
            if prose:
                break
            continue
        prose.append(body.strip())
    joined = " ".join(prose)
    end = re.search(r"\. (?=[A-Z])", joined)  # "et al. 2015", "e.g. on" do not end a sentence
    sentence = joined if end is None else joined[: end.start() + 1]
    return sentence.rstrip(":").strip()


def _top_key(text: str, key: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            value = line.split(":", 1)[1].split("#", 1)[0].strip().strip("'\"")
            return value or None
    return None


def _read(path: Path, name: str, accelerate: bool) -> ShippedRecipe:
    text = path.read_text(encoding="utf-8")
    if accelerate:
        return ShippedRecipe(name, path, "accelerate", _describe(text))
    task = _top_key(text, "task")
    if task is not None and _top_key(text, "recipe") is None:
        return ShippedRecipe(name, path, "generate", _describe(text), task)
    return ShippedRecipe(name, path, "run", _describe(text), _top_key(text, "recipe"))


def shipped_recipes(*, include_accelerate: bool = True) -> list[ShippedRecipe]:
    """Every shipped YAML, recipes first (by name), then the accelerate launch configs."""
    root = _root()
    out = [_read(p, p.stem, False) for p in sorted(root.glob("*.yaml"))]
    if include_accelerate:
        out += [_read(p, f"accelerate/{p.stem}", True) for p in sorted((root / "accelerate").glob("*.yaml"))]
    return out


def find_recipe(name: str) -> ShippedRecipe:
    """The shipped YAML called ``name`` (``quickstart``, ``quickstart.yaml``, ``accelerate/ddp_8gpu``).

    Raises:
        ConfigError: no such shipped recipe (the message lists the close names).
    """
    import difflib

    key = name.removesuffix(".yaml").removeprefix("configs/")
    recipes = shipped_recipes()
    for recipe in recipes:
        if recipe.name == key:
            return recipe
    names = [r.name for r in recipes]
    close = difflib.get_close_matches(key, names, n=1)
    raise ConfigError(
        f"no shipped recipe named {name!r}",
        f"{f'did you mean {close[0]!r}? ' if close else ''}`kdforge recipes list` shows them: {', '.join(names)}",
    )


def copy_recipe(name: str, directory: str | Path) -> Path:
    """Copy the shipped YAML ``name`` (comments included) into ``directory``; return the new file.

    Raises:
        ConfigError: unknown name, or the target file exists (nothing is overwritten).
    """
    recipe = find_recipe(name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a folder", "choose a folder to copy the recipe into")
    target = directory / recipe.path.name
    if target.exists():
        raise ConfigError(f"{target} already exists; kdforge init never overwrites a file",
                          "edit that file, delete it first, or init into another folder")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe.path, target)
    return target
