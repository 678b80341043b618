"""`kdforge cache-teacher` / `build_teacher_cache(data_parallel=True)` with 2 gloo processes.

Launched as the issue asks: ``ACCELERATE_USE_CPU=1 accelerate launch --config_file
configs/accelerate/cpu_2proc.yaml`` (``--cpu --num_processes 2`` starts one process only: see
``test_launch_pitfalls.py``). Proves, against a 1-process build of the same config:

* the 2-process cache is the 1-process cache byte for byte (every shard and the manifest), and
  each rank wrote its own shards;
* a 2-process build whose ranks all die after their first shard (before the manifest merge)
  resumes with 2 processes to the same bytes, recomputing none of the finished shards.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from ._cache_worker import NUM_SEQ, SHARD, make_cli_setup
from ._launch import run_side_by_side

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_cache_worker.py")
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
TIMEOUT = 240
NUM_SHARDS = -(-NUM_SEQ // SHARD)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONHASHSEED="0")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def _launch(*args: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
            "--main_process_port", str(port), *args]


def _run_all(cmds: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Start the commands side by side, wait for all; kill all if one hangs."""
    return run_side_by_side({name: (cmd, _env()) for name, cmd in cmds.items()}, TIMEOUT)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _computed(log: Path) -> dict[str, list[int]]:
    """Shard indices computed, per ``rank<R>-pid<PID>`` (one entry per process that ran)."""
    return {p.stem.removeprefix("computed-"): [int(x) for x in p.read_text().split()]
            for p in sorted(log.glob("computed-*.txt"))}


def test_cli_under_two_processes_writes_the_one_process_cache_byte_for_byte(tmp_path):
    config = make_cli_setup(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    runs = _run_all({
        "the 1-process CLI build": [sys.executable, "-m", "kdforge.cli.main", "cache-teacher", str(config),
                                    "--set", f"output_dir={one}"],
        "the 2-process CLI build": _launch("-m", "kdforge.cli.main", "cache-teacher", str(config),
                                           "--set", f"output_dir={two}"),
    })
    for name, run in runs.items():
        assert run.returncode == 0, f"{name} failed:\n{run.stdout[-4000:]}"
    single, launched = _files(one), _files(two)
    assert sorted(launched) == sorted(single) == ["manifest.json", *(f"shard-{i:05d}.kdc" for i in range(7))]
    for name in single:
        assert launched[name] == single[name], f"{name} differs between 1 and 2 processes"
    # it really was data-parallel: each rank wrote its share (20 sequences / 3 per shard = 7 shards)
    out = runs["the 2-process CLI build"].stdout
    assert re.search(r"rank 0 of 2 writes 4 of the 7 unfinished shards", out), out[-3000:]
    assert re.search(r"rank 1 of 2 writes 3 of the 7 unfinished shards", out), out[-3000:]
    assert out.count("teacher cache ready") == 1  # rank 0 reports


def test_two_process_build_killed_after_first_shards_resumes_to_identical_bytes(tmp_path):
    from kdforge.teachers import TeacherCacheDataset

    ref, run = tmp_path / "ref", tmp_path / "run"
    first = _run_all({
        "the reference build": [sys.executable, str(WORKER), "--out", str(ref), "--log", str(tmp_path / "ref-log")],
        "the killed build": _launch(str(WORKER), "--out", str(run), "--log", str(tmp_path / "log1"),
                                    "--die-after-first"),
    })
    assert first["the reference build"].returncode == 0, first["the reference build"].stdout[-4000:]
    killed = first["the killed build"]
    assert killed.returncode != 0, killed.stdout[-4000:]
    died = _computed(tmp_path / "log1")
    assert sorted(i for v in died.values() for i in v) == [0, 1], died  # rank 0: shard 0, rank 1: shard 1
    assert not (run / "manifest.json").read_text().count('"complete": true')
    assert sorted(p.name for p in run.glob(".progress-rank*.json")) == [".progress-rank00000.json",
                                                                          ".progress-rank00001.json"]

    resumed = _run_all({"the resumed build": _launch(str(WORKER), "--out", str(run), "--log", str(tmp_path / "log2"))})
    assert resumed["the resumed build"].returncode == 0, resumed["the resumed build"].stdout[-4000:]
    again = _computed(tmp_path / "log2")
    assert len(again) == 2  # both ranks worked
    assert sorted(i for v in again.values() for i in v) == list(range(2, NUM_SHARDS))  # no shard twice
    assert _files(run) == _files(ref)  # no leftover records, same bytes as one uninterrupted process
    assert len(TeacherCacheDataset(run)) == NUM_SEQ
