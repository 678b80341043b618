"""``kdforge run --resume``: a recipe run SIGKILLed mid-way finishes with the uninterrupted numbers.

A tiny ``llm_kd`` run (2 methods x 1 seed, a checkpoint every step) is killed with SIGKILL while
the *second* sub-run trains (after a randomly drawn checkpoint, plus a random fraction of a step:
``KDFORGE_KILL_SEED``, as in ``test_sigkill_resume.py``). Then:

* rerunning without ``--resume`` refuses the non-empty folder with a ConfigError naming ``--resume``;
* ``--resume`` skips the finished sub-run (its weights are not retrained: the log says so and its
  metrics.jsonl is untouched), continues the interrupted one from its newest checkpoint, and the
  final ``results.json`` equals an uninterrupted run's, number for number (timings aside).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from .test_sigkill_resume import KILL_SEED, _kill_when, _launcher, _steps_in

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = REPO / "tests" / "distributed" / "_recipe_worker.py"
STEPS = 6
STEP_PAUSE = 0.3
TIMEOUT = 240
TIMING_KEYS = ("time", "per_s", "timings", "created")


def _tiny():
    sys.path.insert(0, str(REPO / "tests" / "distributed"))
    try:
        import _tiny_llm
    finally:
        sys.path.remove(str(REPO / "tests" / "distributed"))
    return _tiny_llm


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               ACCELERATE_USE_CPU="1", **extra)
    return env


def _cli(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([*_launcher(processes), str(WORKER), *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _losses(run: Path) -> list[tuple[int, str, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r.get("loss", r.get("eval/loss"))) for r in recs]


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_llm_kd_killed_in_its_second_sub_run_resumes_to_the_uninterrupted_results(tmp_path, processes):
    """``processes=2``: every run is a 2-process ``accelerate launch`` (gloo); the kill takes the
    launcher and both ranks at once, the resume is launched with 2 processes again."""
    tiny = _tiny()
    root = tiny.make_teacher_and_corpus(tmp_path / "setup")
    config = str(tiny.recipe_yaml(root, tmp_path / "recipe.yaml",
                                  train={"max_steps": STEPS, "save_every": 1, "keep_last": 2},
                                  save_students=False, plot=False))
    rng = random.Random(KILL_SEED + 2)
    kill_after = rng.randint(1, STEPS - 2)
    delay = rng.uniform(0.0, 2 * STEP_PAUSE)
    ctx = (f"(KDFORGE_KILL_SEED={KILL_SEED}, {processes} process(es), kill after KD checkpoint {kill_after} "
           f"+ {delay:.3f} s)")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    second = run_dir / "kd-top-64" / "seed-0"

    victim = subprocess.Popen([*_launcher(processes), str(WORKER), "run", config, "-o", str(run_dir), "--no-report"],
                              cwd=REPO, env=_env(KDFORGE_STEP_SLEEP=str(STEP_PAUSE)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    reference = subprocess.Popen([*_launcher(processes), str(WORKER), "run", config, "-o", str(ref_dir),
                                  "--no-report"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    _kill_when(victim, lambda: any(s >= kill_after for s in _steps_in(second / "checkpoints")), delay,
               "the recipe run")
    ref_out, _ = reference.communicate(timeout=TIMEOUT)
    assert reference.returncode == 0, ref_out[-4000:]
    survivors = _steps_in(second / "checkpoints")
    assert not (run_dir / "results.json").exists(), ctx
    assert (run_dir / "labels-only" / "seed-0" / "subrun.json").is_file(), ctx  # the first sub-run finished
    assert not (second / "subrun.json").exists() and survivors and max(survivors) < STEPS, ctx
    first_log = (run_dir / "labels-only" / "seed-0" / "metrics.jsonl").read_bytes()

    refused = _cli("run", config, "-o", str(run_dir), "--no-report", processes=processes)
    assert refused.returncode == 2 if processes == 1 else refused.returncode != 0, refused.stderr[-2000:]
    assert "already holds a run" in refused.stderr + refused.stdout and "--resume" in refused.stderr + refused.stdout

    resumed = _cli("run", config, "-o", str(run_dir), "--no-report", "--resume", processes=processes)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert "'labels only', seed 0 finished earlier" in out, ctx
    assert f"resumed from {second / 'checkpoints' / f'step-{max(survivors)}'}" in out, ctx
    assert (run_dir / "labels-only" / "seed-0" / "metrics.jsonl").read_bytes() == first_log  # not retrained
    final_state = json.loads((second / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text())
    assert final_state["num_processes"] == processes, ctx

    want = _without_timings(json.loads((ref_dir / "results.json").read_text()))
    got = _without_timings(json.loads((run_dir / "results.json").read_text()))
    assert got["models"] == want["models"], ctx
    assert got["student_init"] == want["student_init"], ctx
    assert _losses(second) == _losses(ref_dir / "kd-top-64" / "seed-0"), ctx


def test_resume_on_an_empty_folder_is_a_fresh_run_and_an_unfinished_sub_run_without_checkpoints_restarts(
        tmp_path):
    from kdforge.recipes.llm_kd import SUBRUN_RECORD

    tiny = _tiny()
    root = tiny.make_teacher_and_corpus(tmp_path / "setup")
    config = str(tiny.recipe_yaml(root, tmp_path / "recipe.yaml", train={"max_steps": 2, "save_every": None},
                                  save_students=False, plot=False,
                                  methods=[{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}]))
    run_dir = tmp_path / "run"
    first = _cli("run", config, "-o", str(run_dir), "--no-report", "--resume")
    assert first.returncode == 0, first.stderr[-3000:]
    record = run_dir / "kd" / "seed-0" / SUBRUN_RECORD
    results = json.loads((run_dir / "results.json").read_text())
    record.unlink()  # as if killed after training, before the record: the sub-run is not finished
    again = _cli("run", config, "-o", str(run_dir), "--no-report", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished earlier" not in again.stderr and record.is_file()
    rerun = json.loads((run_dir / "results.json").read_text())
    assert _without_timings(rerun["models"]) == _without_timings(results["models"])


#: what an earlier run finished or can resume from (each refuses a rerun without --resume)
FINISHED = ["results.json", "labels-only/seed-0/subrun.json", "kd/seed-0/checkpoints/step-2/trainer_state.json",
            "teacher/seed-0/teacher.json", "kd/seed-1/result.json", "rounds.json", "round-1/added.json"]
#: what a start that failed before its first checkpoint leaves (a rerun without --resume replaces it)
START = ["config.yaml", "kd/seed-0/config.yaml", "kd/seed-0/fingerprint.txt", "kd/seed-0/metrics.jsonl",
         "kd/seed-0/checkpoints/.tmp-step-2/student.safetensors", "teacher_cache/manifest.json",
         "teacher_cache/shard-00000.kdc", "report/report.html"]


def _touch(root, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")


@pytest.mark.parametrize("finished", FINISHED)
def test_kdforge_run_refuses_a_folder_with_finished_work_without_resume(tmp_path, finished):
    from kdforge.cli.run import check_output_dir
    from kdforge.errors import ConfigError
    from kdforge.recipes.subrun import finished_work

    out = tmp_path / "out"
    out.mkdir()
    check_output_dir(out, resume=False)  # empty: fine
    (out / ".hidden").write_text("x")
    for rel in START:
        _touch(out, rel)
    check_output_dir(out, resume=False)  # hidden files and a failed start do not count
    _touch(out, finished)
    assert finished_work(out) == [finished.split("/step-")[0]]  # a checkpoint: its checkpoints/ folder
    with pytest.raises(ConfigError, match="already holds a run") as err:
        check_output_dir(out, resume=False)
    assert "--resume" in err.value.fix and "-o" in err.value.fix
    check_output_dir(out, resume=True)


@pytest.mark.slow  # two tiny llm_kd runs (~25 s each on a busy 2-core box); the rule itself is tested above
def test_a_run_that_failed_before_its_first_checkpoint_reruns_into_the_same_folder_without_resume(tmp_path):
    """The first run diverges at step 2 (lr 1e30, no checkpoints): exit 2, its start left behind.
    The corrected rerun, same folder, no --resume, replaces that start and finishes."""
    tiny = _tiny()
    root = tiny.make_teacher_and_corpus(tmp_path / "setup")
    common = {"save_students": False, "plot": False,
              "methods": [{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}]}
    bad = tiny.recipe_yaml(root, tmp_path / "bad.yaml", train={"lr": 1e30, "save_every": None}, **common)
    good = tiny.recipe_yaml(root, tmp_path / "good.yaml", train={"save_every": None}, **common)
    run_dir = tmp_path / "run"
    failed = _cli("run", str(bad), "-o", str(run_dir), "--no-report")
    assert failed.returncode == 2 and "is nan (not finite) at step 2" in failed.stderr, failed.stderr[-2000:]
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "results.json").exists()
    rerun = _cli("run", str(good), "-o", str(run_dir), "--no-report")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "holds only the start of an earlier run" in rerun.stderr
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "results.json").is_file()
