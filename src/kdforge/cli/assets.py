"""``kdforge assets fetch NAME...``: install the offline demo assets."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="install offline demo models and data")
    asub = p.add_subparsers(dest="assets_command", metavar="ACTION")
    f = asub.add_parser("fetch", help="install assets (names or groups, e.g. quickstart)")
    f.add_argument("names", nargs="+")
    f.set_defaults(func=handle_fetch)
    ls = asub.add_parser("list", help="list known assets and groups")
    ls.set_defaults(func=handle_list)


def handle_fetch(args: argparse.Namespace) -> int:
    from kdforge.assets import ensure, expand

    for name in expand(args.names):
        path = ensure(name)
        log.info("asset %s ready at %s", name, path)
    return 0


def handle_list(args: argparse.Namespace) -> int:
    from kdforge.assets import ASSET_GROUPS, ASSET_MODULES

    for name, module in sorted(ASSET_MODULES.items()):
        print(f"{name:18s} {module}")
    for group, members in ASSET_GROUPS.items():
        print(f"{group:18s} group: {', '.join(members)}")
    return 0
