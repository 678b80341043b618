"""SIGKILL at a random moment, then resume: the result is bit-identical to an uninterrupted run.

Each test starts a real subprocess, waits until it has published a checkpoint (or cache shard)
at or after a randomly drawn point, waits a further random fraction of a step (so the kill can
land in the forward pass, the optimizer step or the middle of writing the next checkpoint),
kills the whole process group with SIGKILL, reruns the same command, and compares with a run
that was never interrupted.

The draw is seeded: ``KDFORGE_KILL_SEED`` (default below) picks the kill point; it is logged and
repeated in every failure message so a failure can be replayed. Set it to another value to
explore other kill points.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KILL_SEED = int(os.environ.get("KDFORGE_KILL_SEED", "20261123"))
STEPS = 8
STEP_PAUSE = 0.3  # seconds slept after each step / shard, so there is time to kill mid-run
TIMEOUT = 240


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               ACCELERATE_USE_CPU="1")
    return env


def _launcher(processes: int) -> list[str]:
    """Command prefix: plain Python, or ``accelerate launch`` with the 2-process CPU config."""
    if processes == 1:
        return [sys.executable]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(port)]


def _start(cmd: list[str]) -> subprocess.Popen:
    # own session: the kill reaches the process and anything it spawned, and nothing else
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, what: str) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail(f"{what} did not finish in {TIMEOUT} s")
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{out[-4000:]}"
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process it spawned (torchrun puts workers in their own sessions,
    so a process-group kill would miss them)."""
    import psutil  # a dependency of accelerate

    try:
        root = psutil.Process(proc.pid)
        victims = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float, what: str) -> None:
    """SIGKILL ``proc`` and its children ``delay`` seconds after ``ready()`` first holds."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"{what} ended (rc {proc.returncode}) before the kill point "
                        f"(KDFORGE_KILL_SEED={KILL_SEED}):\n{out[-3000:]}")
        if time.monotonic() > deadline:
            _kill_tree(proc)
            pytest.fail(f"{what} never reached the kill point")
        time.sleep(0.01)
    time.sleep(delay)
    _kill_tree(proc)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, (
        f"{what} was meant to be killed mid-run but exited with {proc.returncode} "
        f"(KDFORGE_KILL_SEED={KILL_SEED})")


def _steps_in(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_training_killed_at_a_random_step_resumes_to_bitwise_identical_weights(tmp_path, processes):
    """``processes=2``: two gloo processes under ``accelerate launch``, all killed at once (a
    node failure), resumed with two processes; each rank's RNG state must come back."""
    rng = random.Random(KILL_SEED)
    kill_after = rng.randint(1, STEPS - 3)  # a checkpoint >= this step exists when the kill comes
    delay = rng.uniform(0.0, 2 * STEP_PAUSE)
    logger.info("KDFORGE_KILL_SEED=%d: kill after checkpoint %d + %.3f s", KILL_SEED, kill_after, delay)
    ctx = (f"(KDFORGE_KILL_SEED={KILL_SEED}, {processes} process(es), kill after step {kill_after} "
           f"+ {delay:.3f} s)")
    script = str(HERE / "_train_run.py")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _start([*_launcher(processes), script, "--out", str(ref_dir), "--steps", str(STEPS)])
    victim = _start([*_launcher(processes), script, "--out", str(run_dir), "--steps", str(STEPS),
                     "--sleep", str(STEP_PAUSE)])
    _kill_when(victim, lambda: any(s >= kill_after for s in _steps_in(run_dir / "checkpoints")), delay,
               "the training run")
    survivors = _steps_in(run_dir / "checkpoints")
    assert not (run_dir / "final.safetensors").exists(), ctx
    assert survivors and max(survivors) < STEPS, ctx

    _finish(_start([*_launcher(processes), script, "--out", str(run_dir), "--steps", str(STEPS), "--resume"]),
            "the resumed run")
    _finish(ref, "the reference run")

    # it really resumed (from the newest complete checkpoint), it did not start over
    starts = [int(x) for x in (run_dir / "starts.txt").read_text().split()]
    assert starts[0] == 0 and starts[1] >= kill_after and starts[1] in survivors, (starts, survivors, ctx)
    if processes == 2:
        ckpt = run_dir / "checkpoints" / f"step-{STEPS}"
        assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in ckpt.iterdir()}, ctx
    want, got = load_file(ref_dir / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs {ctx}"
    # the metrics log reads as one uninterrupted run with the same losses
    ref_log, run_log = _metrics(ref_dir), _metrics(run_dir)
    assert [r["step"] for r in run_log] == list(range(1, STEPS + 1)), ctx
    assert [r["loss"] for r in run_log] == [r["loss"] for r in ref_log], ctx


def _cache_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_cache_build_killed_mid_way_resumes_to_identical_bytes_without_duplicates(tmp_path):
    from kdforge.teachers import TeacherCacheDataset

    sys.path.insert(0, str(HERE))
    try:
        from _build_cache import NUM_SEQ, SHARD, sequences
    finally:
        sys.path.remove(str(HERE))
    shards = NUM_SEQ // SHARD
    rng = random.Random(KILL_SEED + 1)
    kill_after = rng.randint(1, shards - 4)  # shards committed in the manifest before the kill
    delay = rng.uniform(0.0, 2 * STEP_PAUSE)
    ctx = f"(KDFORGE_KILL_SEED={KILL_SEED}, kill after shard {kill_after} + {delay:.3f} s)"
    logger.info("cache build: %s", ctx)
    script = str(HERE / "_build_cache.py")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _start([sys.executable, script, "--out", str(ref_dir)])

    def committed() -> int:
        try:
            return len(json.loads((run_dir / "manifest.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            return 0

    victim = _start([sys.executable, script, "--out", str(run_dir), "--sleep", str(STEP_PAUSE)])
    _kill_when(victim, lambda: committed() >= kill_after, delay, "the cache build")
    partial = json.loads((run_dir / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) < shards, ctx

    _finish(_start([sys.executable, script, "--out", str(run_dir)]), "the resumed cache build")
    _finish(ref, "the reference cache build")

    want, got = _cache_files(ref_dir), _cache_files(run_dir)
    assert sorted(got) == sorted(want), ctx  # no leftover temp files, no extra shards
    for name in want:
        assert got[name] == want[name], f"{name} differs {ctx}"
    manifest = json.loads(got["manifest.json"])
    rows = [tuple(s["rows"]) for s in manifest["shards"]]
    assert rows == [(i * SHARD, (i + 1) * SHARD) for i in range(shards)], ctx  # each row exactly once
    ds = TeacherCacheDataset(run_dir, sequences())  # verifies checksums and the corpus fingerprint
    assert len(ds) == NUM_SEQ
    assert torch.equal(torch.stack([ds[i]["input_ids"] for i in range(len(ds))]), sequences())
