"""``kdforge run RECIPE.yaml``: run a validated recipe."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from kdforge.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe YAML (see configs/)")
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("-o", "--output-dir", default=None, help="where results go (default: the recipe's output_dir)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted path, YAML value), e.g. --set train.epochs=2",
    )
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and print it, run nothing")
    p.add_argument("--no-report", action="store_true", help="do not render the HTML report at the end")
    p.set_defaults(func=handle)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", "write e.g. --set train.epochs=2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def handle(args: argparse.Namespace) -> int:
    from kdforge.recipes import load_recipe_file

    recipe, config = load_recipe_file(args.recipe, parse_overrides(args.set))
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    output_dir = Path(args.output_dir or getattr(config, "output_dir", None) or "outputs/run")
    recipe.run(config, output_dir)
    if not args.no_report and (output_dir / "results.json").is_file() and _is_main_process():
        from kdforge.eval.report import build_report

        paths = build_report([output_dir], output_dir / "report")
        print(f"report: {paths.html}")
    return 0


def _is_main_process() -> bool:
    """Rank 0 (or not launched as a group): only one process renders the report."""
    from kdforge.distributed import launched_world_size

    return launched_world_size() <= 1 or os.environ.get("RANK", "0") == "0"
