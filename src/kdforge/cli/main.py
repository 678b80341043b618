"""Entry point of the ``kdforge`` console script.

Subcommands live one per module in this package. Each module defines
``register(subparsers)`` that adds its parser and sets ``func=handler`` with
``handler(args) -> int``. Modules are discovered automatically, so adding a command is adding a
file. Heavy imports (torch, transformers) happen inside handlers so ``kdforge --help`` is instant.

Errors derived from :class:`~kdforge.errors.KdforgeError` are printed as a short message (no
traceback) and exit with status 2; ``--debug`` shows the traceback. An ``OSError`` that reaches
this point (a folder that cannot be written, a full disk, too many open files...) is the
environment's doing, not a bug: it is explained the same way, as a
:class:`~kdforge.errors.FileSystemError` naming the path and the fix.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from kdforge import __version__
from kdforge.errors import KdforgeError, from_os_error

log = logging.getLogger("kdforge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdforge",
        description="Knowledge distillation toolkit: distill a large teacher into a small student.",
    )
    parser.add_argument("--version", action="version", version=f"kdforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import kdforge.cli as cli_pkg

    for mod in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if mod.name in ("main",) or mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"kdforge.cli.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from kdforge.runtime import keep_freed_memory, leave_distributed

    keep_freed_memory()  # ~20% faster CPU training steps; KDFORGE_MALLOC_TUNING=0 opts out
    # under accelerate launch / torchrun: tear the process group down and leave without the
    # interpreter's native teardown, which aborts launched CPU processes after their work is done
    return leave_distributed(_run(args))


def _run(args: argparse.Namespace) -> int:
    """The command's exit status: 0, or 2 for a kdforge error (its message and fix on stderr)."""
    try:
        return int(args.func(args) or 0)
    except KdforgeError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"kdforge: error: {exc}\n")
        return 2
    except OSError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"kdforge: error: {from_os_error(exc, doing='accessing')}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("kdforge: interrupted; finished work is saved and the job can resume\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
