"""Two gloo processes under ``accelerate launch`` train exactly like one process.

The worker (``_worker.py``) trains a classifier, a causal LM with an online teacher and a causal
LM from a cached sparse top-k teacher. Run once as 1 process with micro-batch ``B`` and once as
2 processes with micro-batch ``B/2`` (same global batch, same seed, 2 accumulation steps), the
final student weights agree to float round-off. The LM rows have uneven real-token counts per
rank and per micro-batch, so the equality holds only because the loss is normalised by the real
tokens of the whole accumulated batch across processes: a control run that normalises per rank
lands measurably elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ._launch import run_side_by_side

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_worker.py")
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
SCENARIOS = ["classifier", "lm_online", "lm_cached", "lm_empty_rank"]
GLOBAL_BATCH = 4
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Start the 1-process and the 2-process run side by side; return their output folders."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    common = ["--accum", "2", "--steps", "3", "--n", "24"]
    single = [sys.executable, str(WORKER), "--out", str(one), "--cache", str(root / "cache1"),
              "--batch", str(GLOBAL_BATCH), *common]
    launched = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                "--main_process_port", str(_free_port()), str(WORKER), "--out", str(two),
                "--cache", str(root / "cache2"), "--batch", str(GLOBAL_BATCH // 2), *common]
    runs = run_side_by_side({"the one-process run": (single, _env()), "the two-process run": (launched, _env())},
                            TIMEOUT)
    for name, run in runs.items():
        assert run.returncode == 0, f"{name} failed:\n{run.stdout[-4000:]}"
    return {"one": one, "two": two}


def _info(folder: Path, scenario: str, rank: int) -> dict:
    return json.loads((folder / f"{scenario}.rank{rank}.json").read_text())


def _assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)


def test_launch_config_starts_two_gloo_processes_with_the_student_wrapped_in_ddp(runs):
    for rank in (0, 1):
        info = _info(runs["two"], "classifier", rank)
        assert (info["world"], info["rank"], info["backend"]) == (2, rank, "gloo")
        assert info["distributed_type"].endswith("MULTI_CPU")
        assert info["student_is_ddp"] and info["student_wrapper"] == "DistributedDataParallel"
    assert not _info(runs["one"], "classifier", 0)["student_is_ddp"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_with_half_batch_match_one_process_final_weights(runs, scenario):
    _assert_weights_close(load_file(runs["one"] / f"{scenario}.safetensors"),
                          load_file(runs["two"] / f"{scenario}.safetensors"))
    assert _info(runs["two"], scenario, 0)["steps"] == _info(runs["one"], scenario, 0)["steps"] == 3


@pytest.mark.parametrize("scenario", ["lm_online", "lm_cached", "lm_empty_rank"])
def test_ranks_see_uneven_real_tokens_that_sum_to_the_single_process_counts(runs, scenario):
    single = _info(runs["one"], scenario, 0)
    r0, r1 = _info(runs["two"], scenario, 0), _info(runs["two"], scenario, 1)
    # one entry per micro-batch: 3 steps x 2 accumulation steps
    assert len(single["counts"]) == len(r0["counts"]) == len(r1["counts"]) == 6
    assert [a + b for a, b in zip(r0["counts"], r1["counts"])] == single["counts"]
    assert r0["counts"] != r1["counts"]  # uneven per rank: a per-rank mean would weight them wrongly
    assert len(set(single["counts"])) > 1  # and uneven per micro-batch
    # the trainer's position counter is global on every rank
    assert r0["positions_seen"] == r1["positions_seen"] == single["positions_seen"] == sum(single["counts"])


def test_a_rank_without_real_tokens_in_a_step_still_trains_in_lockstep(runs):
    r0, r1 = _info(runs["two"], "lm_empty_rank", 0), _info(runs["two"], "lm_empty_rank", 1)
    assert r1["counts"][:2] == [0, 0] and sum(r0["counts"][:2]) > 0  # step 1: rank 1 has nothing
    assert r0["steps"] == r1["steps"] == 3
    # (final weights equal to the 1-process run: test_two_processes_with_half_batch_match_...)


def test_per_rank_normalisation_control_does_not_match_so_the_equivalence_has_power(runs):
    ref = load_file(runs["one"] / "lm_online.safetensors")
    control = load_file(runs["two"] / "lm_online_local_norm.safetensors")
    worst = max((ref[k] - control[k]).abs().max().item() for k in ref)
    assert worst > 1e-3  # 50x the tolerance of the equivalence test


@pytest.mark.parametrize("scenario", ["classifier", "lm_online"])
def test_frozen_teacher_is_never_wrapped_in_ddp_nor_trained(runs, scenario):
    for rank in (0, 1):
        info = _info(runs["two"], scenario, rank)
        assert not info["teacher_is_ddp"] and info["teacher_wrapper"] is None
        assert not info["teacher_trainable"] and not info["teacher_in_optimizer"]
        assert info["teacher_hash_after"] == info["teacher_hash_before"]
