"""``kdforge run RECIPE.yaml [--resume] [--dry-run]``: check, then run a validated recipe.

Every run starts with the pre-flight (:mod:`kdforge.preflight`): the recipe's checks of
everything knowable without training and its estimate of memory and disk; all problems are
listed at once (exit 2) before anything is loaded or written. ``--dry-run`` stops there and
prints the resolved config (re-runnable, with its ``recipe:`` key) and the estimate. A real run
also copies every kdforge log record into ``OUTPUT_DIR/train.log``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kdforge.errors import ConfigError

log = logging.getLogger(__name__)


def _epilog() -> str:
    from kdforge.recipes import known_recipes

    return ("recipes (the `recipe:` key of a YAML): " + ", ".join(known_recipes()) + "\n"
            "shipped configs: `kdforge recipes list`; copy one to edit: `kdforge init NAME DIR`\n"
            "every key of every recipe: docs/config-reference.md (or --dry-run on a config)\n"
            "before training, every run checks the config (all problems at once, exit 2) and estimates "
            "memory and disk (docs/configs.md, 'Dry run and pre-flight')")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe YAML (`kdforge recipes list`, `kdforge init NAME DIR`)",
                       description="Check, then run, a recipe YAML.", epilog=_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to a recipe YAML file (`kdforge init quickstart .` writes one)")
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
    p.add_argument("--dry-run", action="store_true",
                   help="check everything knowable without training (every problem listed, exit 2), print the "
                        "resolved config (re-runnable, with its recipe: key) and the memory/disk estimate; run nothing")
    p.add_argument("--force", action="store_true",
                   help="run even when the pre-flight estimate says memory or disk will not suffice")
    p.add_argument("--probe", action="store_true",
                   help="time two optimizer steps of a stand-in student for the time estimate (a few seconds)")
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

    A folder holding only the start of a run that failed before finishing or checkpointing
    anything (``config.yaml``, an unfinished sub-run's log, a teacher cache: see
    :func:`kdforge.recipes.subrun.finished_work`) is not refused: the corrected rerun replaces it.

    Raises:
        ConfigError: ``output_dir`` holds finished or resumable work and ``resume`` is False.
    """
    if resume:
        return
    found = previous_run_entries(output_dir)
    if found and not _finished_work(output_dir):  # an earlier start failed before its first checkpoint
        log.warning("%s holds only the start of an earlier run that stopped before finishing or checkpointing "
                    "anything (%s): starting over", output_dir, ", ".join(found[:5]))
        return
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ConfigError(
            f"output folder {output_dir} already holds a run ({shown})",
            "pass --resume to continue it (finished sub-runs are kept, an interrupted one continues from its "
            "last checkpoint), or write to a new folder with -o NEW_DIR",
        )


def resolved_config(recipe: Any, config: Any, output_dir: str | None = None) -> str:
    """The config as a re-runnable YAML: its ``recipe:`` key first, every default filled in, and
    ``output_dir`` set to ``-o`` when one was given."""
    from kdforge.recipes import recipe_name

    data = {"recipe": recipe_name(type(recipe)), **rerunnable_dump(config)}
    if output_dir is not None and "output_dir" in data:
        data["output_dir"] = output_dir
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def rerunnable_dump(model: Any) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` that validates again into the same config.

    Every default is written out, except where a model rejects keys that were not given (a
    section whose validator refuses the fields of another ``kind``/``source``): there the keys set
    in the file are kept, plus each default that the section still accepts.
    """
    from pydantic import BaseModel, ValidationError

    def fix(obj: Any, data: Any) -> Any:
        if isinstance(obj, BaseModel) and isinstance(data, dict):
            for name in type(obj).model_fields:
                if name in data:
                    data[name] = fix(getattr(obj, name), data[name])
            try:
                type(obj).model_validate(data)
                return data
            except ValidationError:
                kept = {k: v for k, v in data.items() if k in obj.model_fields_set}
                for k, v in data.items():
                    if k not in kept:
                        try:
                            type(obj).model_validate({**kept, k: v})
                        except ValidationError:
                            continue
                        kept[k] = v
                return {k: kept[k] for k in data if k in kept}
        if isinstance(obj, list | tuple) and isinstance(data, list):
            return [fix(o, d) for o, d in zip(obj, data)]
        if isinstance(obj, dict) and isinstance(data, dict):
            return {k: fix(obj.get(k), v) for k, v in data.items()}
        return data

    return fix(model, model.model_dump(mode="json"))


def _finished_work(output_dir: Path) -> list[str]:
    from kdforge.recipes.subrun import finished_work

    return finished_work(output_dir)


def handle(args: argparse.Namespace) -> int:
    from kdforge.recipes import load_recipe_file

    recipe, config = load_recipe_file(args.recipe, parse_overrides(args.set))
    output_dir = Path(args.output_dir or getattr(config, "output_dir", None) or "outputs/run")
    if args.dry_run:
        sys.stdout.write(resolved_config(recipe, config, args.output_dir))
    report = _checked_together(lambda: _preflight(recipe, config, output_dir, args))
    if report.estimate is not None:
        for line in report.estimate.lines():
            if args.dry_run:
                print(f"# {line}")
            else:
                log.info("%s", line)
    report.raise_if_problems(str(args.recipe))
    if args.dry_run:
        print("# pre-flight: no problems found")
        return 0
    from kdforge.train.tracking import log_to_file

    with log_to_file(output_dir / "train.log", enabled=_is_main_process()):
        if report.estimate is not None:
            log.info("pre-flight estimate: %s", json.dumps(report.estimate.to_dict()))
        _run(recipe, config, output_dir, args)
    if not args.no_report and (output_dir / "results.json").is_file() and _is_main_process():
        from kdforge.eval.report import build_report

        paths = build_report([output_dir], output_dir / "report")
        print(f"report: {paths.html}")
    return 0


def _run(recipe: Any, config: Any, output_dir: Path, args: argparse.Namespace) -> None:
    kwargs = {}
    if "resume" in inspect.signature(recipe.run).parameters:
        kwargs["resume"] = args.resume
    elif args.resume:
        log.info("recipe %s has no --resume of its own: running it again (it reuses what it cached)",
                 type(recipe).__name__)
    recipe.run(config, output_dir, **kwargs)


def _preflight(recipe: Any, config: Any, output_dir: Path, args: argparse.Namespace) -> Any:
    """The recipe's pre-flight report, with "this folder already holds a run" as one more problem."""
    from kdforge.preflight import Problem, preflight

    extra = []
    try:
        check_output_dir(output_dir, args.resume)
    except ConfigError as exc:
        extra.append(Problem("output_dir", exc.problem, exc.fix))
    return preflight(recipe, config, output_dir, force=args.force, probe=args.probe, extra=extra)


def _checked_together(check: Callable[[], Any]) -> Any:
    """Run ``check`` on rank 0 of a launch (every process otherwise) and give its result to all.

    Under ``accelerate launch`` a fast rank 0 could otherwise create the output folder before a
    slower rank looked at it, and that rank alone would refuse to run: the group would hang. Rank
    0's verdict is shared, so all ranks raise or none does.
    """
    from kdforge.distributed import launched_world_size

    if launched_world_size() <= 1:
        return check()
    from kdforge.distributed import broadcast_from_main
    from kdforge.teachers.cache.parallel import join_launch_group

    group = join_launch_group()
    result = check() if group.rank == 0 else None
    result = broadcast_from_main(result)
    group.barrier()
    return result


def _is_main_process() -> bool:
    """Rank 0 (or not launched as a group): only one process renders the report."""
    from kdforge.distributed import launched_world_size

    return launched_world_size() <= 1 or os.environ.get("RANK", "0") == "0"
