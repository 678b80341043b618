"""Run several commands side by side (e.g. a 1-process and an ``accelerate launch`` run) and wait
for all of them, killing every one if one hangs, so a stuck process group fails the test instead
of hanging CI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_side_by_side(cmds: dict[str, tuple[list[str], dict[str, str]]], timeout: float
                     ) -> dict[str, subprocess.CompletedProcess]:
    """``{name: (argv, env)}`` -> ``{name: CompletedProcess}`` (stdout holds stdout + stderr)."""
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for name, (cmd, env) in cmds.items()}
    done = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"{name} did not finish in {timeout} s")
        done[name] = subprocess.CompletedProcess(cmds[name][0], proc.returncode, out)
    return done
