"""``kdforge recipes list`` and ``kdforge init NAME DIR``: the recipes shipped in the package."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the recipes shipped with kdforge")
    actions = p.add_subparsers(dest="recipes_command", metavar="ACTION")
    listing = actions.add_parser("list", help="name, kind and one-line description of every shipped recipe")
    listing.add_argument("--all", action="store_true", help="also list the accelerate launch configs")
    listing.set_defaults(func=handle_list)
    p.set_defaults(func=handle_list, all=False)

    init = sub.add_parser("init", help="copy a shipped recipe (with its comments) into a folder to edit")
    init.add_argument("name", help="a name from `kdforge recipes list` (e.g. quickstart)")
    init.add_argument("directory", nargs="?", default=".", help="where to write NAME.yaml (default: here)")
    init.set_defaults(func=handle_init)


def handle_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kdforge.configs import shipped_recipes

    table = Table(title="kdforge recipes (copy one with `kdforge init NAME DIR`)")
    table.add_column("name", style="bold cyan")
    table.add_column("runs with")
    table.add_column("description")
    for recipe in shipped_recipes(include_accelerate=args.all):
        kind = recipe.command + (f" ({recipe.recipe})" if recipe.recipe else "")
        table.add_row(recipe.name, kind, recipe.description)
    Console().print(table)
    return 0


def handle_init(args: argparse.Namespace) -> int:
    from kdforge.configs import copy_recipe, find_recipe

    target = copy_recipe(args.name, args.directory)
    recipe = find_recipe(args.name)
    print(f"wrote {target}")
    if recipe.kind == "accelerate":
        print(f"launch with: accelerate launch --config_file {target} -m kdforge.cli.main run RECIPE.yaml")
    else:
        print(f"run it with: {recipe.command} {target}")
    return 0
