"""Run the ``kdforge`` CLI in this process (plain, or one rank of ``accelerate launch``).

Usage: ``python tests/distributed/_recipe_worker.py run RECIPE.yaml -o OUT [...]``.

Test hooks, from the environment (they change no arithmetic):

* ``KDFORGE_WRITE_LOG=DIR``: every file this process publishes with ``os.replace`` (all of
  kdforge's atomic writes, the plot) is appended to ``DIR/rank<R>-pid<PID>.txt``, so a test can
  check which rank wrote what.
* ``KDFORGE_STEP_SLEEP=S``: sleep S seconds after each optimizer step, so a test can kill the run
  mid-way.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _record_writes(log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    record = log_dir / f"rank{os.environ.get('RANK', '0')}-pid{os.getpid()}.txt"
    record.touch()
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        with open(record, "a", encoding="utf-8") as fh:
            fh.write(os.fspath(dst) + "\n")

    os.replace = replace


def _slow_steps(seconds: float) -> None:
    from kdforge.train.distiller import Distiller

    step = Distiller.training_step

    def slow(self):
        out = step(self)
        time.sleep(seconds)
        return out

    Distiller.training_step = slow


def main() -> int:
    import torch

    torch.set_num_threads(1)
    if os.environ.get("KDFORGE_WRITE_LOG"):
        _record_writes(Path(os.environ["KDFORGE_WRITE_LOG"]))
    if os.environ.get("KDFORGE_STEP_SLEEP"):
        _slow_steps(float(os.environ["KDFORGE_STEP_SLEEP"]))
    from kdforge.cli.main import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    from _teardown import (
        exit_without_native_teardown,  # the launched script's folder is on sys.path
    )

    exit_without_native_teardown(main())
