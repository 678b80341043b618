"""Chaos (a): a whole ``kdforge run`` killed with SIGKILL again and again ends bit-identical.

A tiny ``llm_kd`` run goes through every stage: teacher load, teacher-cache build, two trainings
(labels only, then KD, a checkpoint every step), evaluation, results, report. It is SIGKILLed at
``KILLS`` points drawn (seeded by ``KDFORGE_KILL_SEED``, as in ``test_sigkill_resume.py``) from
the stages it passes through, each kill ``delay`` seconds (drawn too) after the stage's marker
appears on disk; after each kill the same command is rerun with ``--resume``, and the last rerun
goes to the end and renders the report. Its results (timings aside) and the saved students'
weights, byte for byte, equal an uninterrupted run's. One torch thread per process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

from .test_recipe_resume import WORKER, _env, _tiny, _without_timings
from .test_sigkill_resume import KILL_SEED, REPO, TIMEOUT, _kill_when, _launcher, _steps_in

STEPS = 5
STEP_PAUSE = 0.3
KILLS = int(os.environ.get("KDFORGE_CHAOS_KILLS", "3"))


def _stages(run: Path, rng: random.Random) -> list[tuple[str, Callable[[], bool]]]:
    """The pipeline's kill markers, in the order a run passes them."""
    first, second = run / "labels-only" / "seed-0", run / "kd-top-64" / "seed-0"
    a, b = rng.randint(1, STEPS - 1), rng.randint(1, STEPS - 1)
    return [
        ("teacher cache written", lambda: (run / "teacher_cache" / "manifest.json").is_file()),
        (f"labels-only checkpoint {a}", lambda: any(s >= a for s in _steps_in(first / "checkpoints"))),
        ("labels-only finished", lambda: (first / "subrun.json").is_file()),
        (f"KD checkpoint {b}", lambda: any(s >= b for s in _steps_in(second / "checkpoints"))),
        ("KD finished (evaluating)", lambda: (second / "subrun.json").is_file()),
    ]


def _students(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("student/*.safetensors"))}


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([*_launcher(1), str(WORKER), *args], cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_full_run_killed_at_random_stages_and_resumed_each_time_ends_bit_identical(tmp_path):
    tiny = _tiny()
    root = tiny.make_teacher_and_corpus(tmp_path / "setup")
    config = str(tiny.recipe_yaml(root, tmp_path / "recipe.yaml", plot=False,
                                  train={"max_steps": STEPS, "save_every": 1, "keep_last": 2, "eval_every": None}))
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    rng = random.Random(KILL_SEED + 3)
    stages = _stages(run_dir, rng)
    picks = sorted(rng.sample(range(len(stages)), KILLS))
    delays = [rng.uniform(0.0, 2 * STEP_PAUSE) for _ in picks]
    plan = ", ".join(f"{stages[i][0]} + {d:.2f} s" for i, d in zip(picks, delays))
    ctx = f"(KDFORGE_KILL_SEED={KILL_SEED}; kills: {plan})"

    reference = _start(["run", config, "-o", str(ref_dir)])
    for n, (i, delay) in enumerate(zip(picks, delays)):
        args = ["run", config, "-o", str(run_dir), *(["--resume"] if n else [])]
        victim = _start(args, KDFORGE_STEP_SLEEP=str(STEP_PAUSE))
        _kill_when(victim, stages[i][1], delay, f"run {n + 1} {ctx}")  # asserts it died of the SIGKILL
        if i < len(stages) - 1:  # the last stage's kill may land after results.json, in the report
            assert not (run_dir / "results.json").exists(), ctx
    final = _start(["run", config, "-o", str(run_dir), "--resume"])
    out, _ = final.communicate(timeout=TIMEOUT)
    assert final.returncode == 0, f"{ctx}\n{out[-4000:]}"
    ref_out, _ = reference.communicate(timeout=TIMEOUT)
    assert reference.returncode == 0, ref_out[-4000:]

    want = _without_timings(json.loads((ref_dir / "results.json").read_text()))
    got = _without_timings(json.loads((run_dir / "results.json").read_text()))
    assert got["models"] == want["models"], ctx
    assert got["student_init"] == want["student_init"], ctx
    students = _students(ref_dir)
    assert len(students) == 2 and _students(run_dir) == students, ctx  # weights, byte for byte
    assert (run_dir / "report" / "report.html").is_file(), ctx
