"""``kdforge run RECIPE.yaml [--resume]``: run a validated recipe."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
from pathlib import Path

import yaml

from kdforge.errors import ConfigError

log = logging.getLogger(__name__)


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
    p.add_argument("--resume", action="store_true",
                   help="continue the run already in the output folder: finished (method, seed) sub-runs are "
                        "kept, an interrupted one continues from its last checkpoint (train.save_every)")
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


def previous_run_entries(output_dir: Path) -> list[str]:
    """Names in ``output_dir`` that show an earlier run wrote there (hidden files do not count)."""
    if not output_dir.is_dir():
        if output_dir.exists():
            raise ConfigError(f"output path {output_dir} exists and is not a folder", "choose another folder with -o")
        return []
    return sorted(p.name for p in output_dir.iterdir() if not p.name.startswith("."))


def check_output_dir(output_dir: Path, resume: bool) -> None:
    """Refuse to run over an earlier run's folder unless ``--resume`` says to continue it.

    Raises:
        ConfigError: ``output_dir`` is not empty and ``resume`` is False.
    """
    if resume:
        return
    found = previous_run_entries(output_dir)
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ConfigError(
            f"output folder {output_dir} already holds a run ({shown})",
            "pass --resume to continue it (finished sub-runs are kept, an interrupted one continues from its "
            "last checkpoint), or write to a new folder with -o NEW_DIR",
        )


def handle(args: argparse.Namespace) -> int:
    from kdforge.recipes import load_recipe_file

    recipe, config = load_recipe_file(args.recipe, parse_overrides(args.set))
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    output_dir = Path(args.output_dir or getattr(config, "output_dir", None) or "outputs/run")
    _checked_together(lambda: check_output_dir(output_dir, args.resume))
    kwargs = {}
    if "resume" in inspect.signature(recipe.run).parameters:
        kwargs["resume"] = args.resume
    elif args.resume:
        log.info("recipe %s has no --resume of its own: running it again (it reuses what it cached)",
                 type(recipe).__name__)
    recipe.run(config, output_dir, **kwargs)
    if not args.no_report and (output_dir / "results.json").is_file() and _is_main_process():
        from kdforge.eval.report import build_report

        paths = build_report([output_dir], output_dir / "report")
        print(f"report: {paths.html}")
    return 0


def _checked_together(check) -> None:
    """Run ``check`` on every launched process before any of them writes (then a barrier).

    Under ``accelerate launch`` a fast rank 0 could otherwise create the output folder before a
    slower rank looked at it, and that rank alone would refuse to run: the group would hang. Rank
    0's verdict is shared, so all ranks raise or none does.
    """
    from kdforge.distributed import launched_world_size

    if launched_world_size() <= 1:
        check()
        return
    from kdforge.distributed import broadcast_from_main
    from kdforge.teachers.cache.parallel import join_launch_group

    group = join_launch_group()
    error = None
    try:
        check()
    except ConfigError as exc:
        error = (exc.problem, exc.fix)
    error = broadcast_from_main(error)
    group.barrier()
    if error is not None:
        raise ConfigError(*error)


def _is_main_process() -> bool:
    """Rank 0 (or not launched as a group): only one process renders the report."""
    from kdforge.distributed import launched_world_size

    return launched_world_size() <= 1 or os.environ.get("RANK", "0") == "0"
