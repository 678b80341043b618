"""The ``llm_kd`` and ``fashion_mnist_kd`` recipes under ``accelerate launch`` with 2 gloo processes.

``kdforge run`` is launched with ``configs/accelerate/cpu_2proc.yaml`` and, side by side, as one
plain process with twice the per-process batch (the same global batch). Proves:

* the 2-process run trained as one group (its checkpoints record ``num_processes: 2``) and its
  ``results.json`` matches the 1-process one within float tolerance (every held-out metric of
  the teacher, the initial student and each trained student; the last training loss);
* only rank 0 publishes files: every atomic write (``os.replace``) of each rank is recorded; rank
  1 wrote nothing but its own RNG state into the checkpoint folders rank 0 publishes (``rng-rank1.pt``,
  by design; the tiny teacher cache is one shard, so rank 0 writes it); rank 0 wrote
  ``results.json`` exactly once; both ranks exit 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ._launch import run_side_by_side
from ._tiny_llm import make_teacher_and_corpus, recipe_yaml

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_recipe_worker.py")
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
TIMEOUT = 240
METRICS = ("perplexity", "nll", "agreement", "kl_to_teacher", "js_to_teacher", "token_accuracy", "accuracy")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONHASHSEED="0", **extra)
    return env


def _launch_prefix() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
            "--main_process_port", str(port)]


def _run_side_by_side(cmds: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, str]:
    outputs = {}
    for name, run in run_side_by_side(cmds, TIMEOUT).items():
        assert run.returncode == 0, f"{name} failed (rc {run.returncode}):\n{run.stdout[-5000:]}"
        outputs[name] = run.stdout
    return outputs


def _writes(log_dir: Path) -> dict[str, list[str]]:
    return {p.name.split("-")[0]: p.read_text().split() for p in sorted(log_dir.glob("rank*.txt"))}


def _rank1_extra(paths: list[str]) -> list[str]:
    """Rank 1's published files other than its per-rank checkpoint RNG state."""
    return [p for p in paths if not (Path(p).name == "rng-rank1.pt" and Path(p).parent.name.startswith(".tmp-step-"))]


def _assert_results_match(one: dict, two: dict) -> None:
    assert [m["name"] for m in two["models"]] == [m["name"] for m in one["models"]]
    for a, b in zip(one["models"], two["models"]):
        for key in METRICS:
            if key in a["metrics"]:
                assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-4, abs=1e-6), (a["name"], key)
        for sa, sb in zip(a.get("per_seed", []), b.get("per_seed", [])):
            for key in ("train_loss_last", *METRICS):
                if isinstance(sa.get(key), float):
                    assert sb[key] == pytest.approx(sa[key], rel=1e-4, abs=1e-6), (a["name"], key)


def test_llm_kd_under_two_processes_matches_one_process_and_only_rank_0_writes(tmp_path):
    root = make_teacher_and_corpus(tmp_path / "setup")
    config = recipe_yaml(root, tmp_path / "recipe.yaml")
    one, two, log = tmp_path / "one", tmp_path / "two", tmp_path / "writes"
    outputs = _run_side_by_side({
        "the 1-process run (batch 4)": ([sys.executable, str(WORKER), "run", str(config), "-o", str(one),
                                         "--no-report"], _env()),
        "the 2-process run (batch 2 each)": ([*_launch_prefix(), str(WORKER), "run", str(config), "-o", str(two),
                                              "--set", "train.batch_size=2", "--no-report"],
                                             _env(KDFORGE_WRITE_LOG=str(log))),
    })
    state = json.loads((two / "kd-top-64" / "seed-0" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["batch_size"] == 2

    _assert_results_match(json.loads((one / "results.json").read_text()),
                          json.loads((two / "results.json").read_text()))

    writes = _writes(log)
    assert sorted(writes) == ["rank0", "rank1"], writes
    assert any(Path(p).name == "rng-rank1.pt" for p in writes["rank1"])  # it did take part in checkpoints
    assert _rank1_extra(writes["rank1"]) == [], f"rank 1 published files: {writes['rank1']}"
    rank0 = [Path(p).relative_to(two).as_posix() for p in writes["rank0"]]
    assert rank0.count("results.json") == 1 and rank0.count("config.yaml") == 1
    assert "labels-only/seed-0/subrun.json" in rank0 and "kd-top-64/seed-0/subrun.json" in rank0
    assert (two / "kd-top-64" / "seed-0" / "student" / "model.safetensors").is_file()
    assert outputs["the 2-process run (batch 2 each)"].count(f"results ({two}):") == 1  # rank 0 logs the table


@pytest.mark.slow
def test_fashion_mnist_under_two_processes_matches_one_process_and_only_rank_0_writes(tmp_path):
    from kdforge.data.vision import write_synthetic_fashion_mnist

    data = write_synthetic_fashion_mnist(tmp_path / "fmnist", n_train=200, n_test=50)
    sets = ["--set", f"data.root={data}", "--set", "data.labelled=40", "--set", "data.transfer=60",
            "--set", "teacher.arch=mlp", "--set", "teacher.kwargs={hidden: [64]}", "--set", "teacher.epochs=1",
            "--set", "train.epochs=2", "--set", "seeds=[0]", "--set", "eval.latency_warmup=1",
            "--set", "eval.latency_repeats=2", "--no-report"]
    bundled = str(REPO / "configs" / "fashion_mnist.yaml")
    one, two, log = tmp_path / "one", tmp_path / "two", tmp_path / "writes"
    _run_side_by_side({
        "the 1-process run": ([sys.executable, str(WORKER), "run", bundled, "-o", str(one), *sets,
                               "--set", "teacher.batch_size=40", "--set", "train.batch_size=20"], _env()),
        "the 2-process run": ([*_launch_prefix(), str(WORKER), "run", bundled, "-o", str(two), *sets,
                               "--set", "teacher.batch_size=20", "--set", "train.batch_size=10"],
                              _env(KDFORGE_WRITE_LOG=str(log))),
    })
    _assert_results_match(json.loads((one / "results.json").read_text()),
                          json.loads((two / "results.json").read_text()))
    writes = _writes(log)
    assert sorted(writes) == ["rank0", "rank1"], writes
    assert _rank1_extra(writes["rank1"]) == [], f"rank 1 published files: {writes['rank1']}"
    rank0 = [Path(p).relative_to(two).as_posix() for p in writes["rank0"]]
    assert rank0.count("results.json") == 1 and rank0.count("teacher/teacher.json") == 1


@pytest.mark.slow
def test_two_processes_refuse_a_used_output_folder_together_without_hanging(tmp_path):
    """Rank 0 checks the folder and shares its verdict before anyone writes: both ranks raise the
    ConfigError (exit 2) instead of one refusing while the other waits at a barrier forever."""
    root = make_teacher_and_corpus(tmp_path / "setup")
    config = recipe_yaml(root, tmp_path / "recipe.yaml")
    out = tmp_path / "used"
    out.mkdir()
    (out / "results.json").write_text("{}")
    proc = subprocess.run([*_launch_prefix(), str(WORKER), "run", str(config), "-o", str(out), "--no-report"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert text.count("already holds a run") == 2, text[-3000:]  # both ranks, same message
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # nothing was written
