"""The trainer survives the CPU mis-launch docs/scaling.md warns about, and refuses a broken group.

Two processes started with ``configs/accelerate/cpu_2proc.yaml`` but *without*
``ACCELERATE_USE_CPU=1`` on a machine without CUDA: a plain ``Accelerator()`` gives each process a
world of 1 (each trains alone, both write the same run folder; ``test_launch_pitfalls.py``). The
``Distiller`` builds its accelerator with ``cpu=needs_cpu_process_group()``, so the two processes
form one gloo group; an accelerator passed in that sees fewer processes than were launched is
refused with a ``DeviceError`` naming the fix.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdforge.distributed import WORLD_SIZE_VARS
from kdforge.errors import DeviceError

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("_distiller_probe.py")
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"


def _distiller(**kw):
    from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig

    data = [{"inputs": torch.zeros(4), "labels": torch.tensor(0)}] * 4
    return Distiller(nn.Linear(4, 3), task=ClassificationTask(), objective=[LossTerm("cross_entropy", 1.0)],
                     config=TrainConfig(max_steps=1, batch_size=2, progress=False), train_data=data, **kw)


@pytest.fixture
def launched_two(monkeypatch):
    for var in WORLD_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    return monkeypatch


def test_accelerator_passed_in_that_sees_one_of_two_launched_processes_is_refused(launched_two):
    with pytest.raises(DeviceError, match="2 processes were launched") as err:
        _distiller(accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    assert "ACCELERATE_USE_CPU=1" in err.value.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_own_accelerator_asks_for_a_cpu_group_when_launched_without_cuda(launched_two):
    import accelerate

    seen: dict = {}

    class Recorder:  # stands in for Accelerator: records the kwargs, forms no group
        def __init__(self, **kwargs) -> None:
            seen.update(kwargs)
            self.num_processes = 2

    launched_two.setattr(accelerate, "Accelerator", Recorder)
    from kdforge.train import Distiller

    Distiller._make_accelerator(SimpleNamespace(config=SimpleNamespace(mixed_precision="no", log_with=None),
                                                run_dir=None))
    assert seen.get("cpu") is True


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_two_processes_launched_without_accelerate_use_cpu_train_as_one_gloo_group(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (*WORLD_SIZE_VARS, "ACCELERATE_USE_CPU", "RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                           "--main_process_port", port, str(PROBE), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(reports) == 2
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["num_processes"] == 2 and r["backend"] == "gloo" and r["steps"] == 2 for r in reports)
