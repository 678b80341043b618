"""``kdforge generate RECIPE.yaml``: teacher generation, labeling, expansion, curation, rationales."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="make a teacher generate/label/expand/curate/explain data (resumable; see docs/elicitation.md)",
    )
    p.add_argument("recipe", help="generation recipe YAML (see configs/generate_*.yaml)")
    p.add_argument("-o", "--output-dir", default=None, help="override output_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted path, YAML value), e.g. --set sampling.n=4")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and print it, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from kdforge.cli.run import parse_overrides
    from kdforge.config import read_yaml, validate
    from kdforge.elicit.job import GenerateJobConfig, run_job
    from kdforge.recipes import _set_dotted

    data = read_yaml(args.recipe)
    for key, value in parse_overrides(args.set).items():
        _set_dotted(data, key, value)
    if args.no_progress:
        data["progress"] = False
    cfg = validate(GenerateJobConfig, data, source=str(args.recipe))
    if args.dry_run:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    result = run_job(cfg, args.output_dir)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list | dict) or k == "errors"}, indent=2))
    failed = result.get("failed") or (result.get("generation") or {}).get("failed")
    return 1 if failed else 0
