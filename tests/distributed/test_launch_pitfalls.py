"""The CPU launch pitfalls that docs/scaling.md warns about, checked against this accelerate.

If accelerate changes behaviour, these tests fail and the docs (and ``cpu_2proc.yaml``) need a
look. They start real launchers, so they are marked ``slow``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("_probe.py")
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"

pytestmark = pytest.mark.slow


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(args: list[str], out: Path, use_cpu: bool) -> tuple[int, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "ACCELERATE_USE_CPU")}
    env.update(OMP_NUM_THREADS="1")
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args, str(PROBE), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("pid-*.json"))] if out.is_dir() else []
    return proc.returncode, reports


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_flag_with_two_processes_starts_only_one_process(tmp_path):
    rc, reports = _launch(["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no"], tmp_path, use_cpu=False)
    assert rc == 0 and len(reports) == 1 and reports[0]["num_processes"] == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only behaviour")
def test_two_processes_without_accelerate_use_cpu_are_refused_by_the_group_check(tmp_path):
    rc, reports = _launch(["--config_file", str(CPU_2PROC), "--main_process_port", _port()], tmp_path,
                          use_cpu=False)
    assert rc != 0 and len(reports) == 2
    for r in reports:  # each process saw a world of 1 and the check said so
        assert (r["launched"], r["num_processes"]) == (2, 1)
        assert "2 processes were launched" in r["error"]


def test_cpu_2proc_config_with_accelerate_use_cpu_forms_one_group_of_two(tmp_path):
    rc, reports = _launch(["--config_file", str(CPU_2PROC), "--main_process_port", _port()], tmp_path,
                          use_cpu=True)
    assert rc == 0 and len(reports) == 2
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["num_processes"] == 2 and r["error"] is None for r in reports)
