"""Sharded optimizer state on resume: FSDP2 (``fully_shard``) on 2 CPU processes with gloo.

accelerate cannot run FSDP on CPU (an FSDP launch config with ``ACCELERATE_USE_CPU=1`` becomes
plain DDP, docs/scaling.md), so this drives torch's ``fully_shard`` directly under ``torchrun`` and
checkpoints it with the same functions the Distiller calls (``gather_*`` / ``restore_*`` in
:mod:`kdforge.train.checkpoint`). Proves:

* the checkpoint's ``optimizer.pt`` holds the *full* AdamW moments (the parameters' full shapes,
  keyed by parameter name, format ``full-fqn``), while rank 0's own ``optimizer.state_dict()``
  holds only its shard (what a rank-0-only writer saved before);
* a checkpoint written by 2 sharded processes, restored into fresh, differently initialised
  sharded models and optimizers in new processes, continues to final weights bit-identical to
  the uninterrupted run;
* control: restoring the rank-0-only optimizer state instead ends elsewhere, so the comparison
  has power.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_fsdp_worker.py")
TIMEOUT = 180


def _torchrun(phase: str, out: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(WORKER), phase, str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"phase {phase} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_fsdp2_checkpoint_gathers_full_optimizer_state_and_resumes_bit_exactly(tmp_path):
    _torchrun("save", tmp_path)
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved["format"] == "full-fqn"
    full = saved["full_shapes"]
    assert full["0.weight"]["exp_avg"] == [16, 8] and full["2.weight"]["exp_avg_sq"] == [4, 16]
    assert full["0.bias"]["exp_avg"] == [16]
    assert saved["rank0_local_shapes"]["0"]["exp_avg"] == [8, 8]  # rank 0 alone holds half of 0.weight
    trainer_state = json.loads((tmp_path / "ckpt" / "step-3" / "trainer_state.json").read_text())
    assert trainer_state["optimizer_format"] == "full-fqn"

    _torchrun("resume", tmp_path)  # also runs the control
    want = load_file(tmp_path / "final-save.safetensors")
    got = load_file(tmp_path / "final-resume.safetensors")
    naive = load_file(tmp_path / "final-naive.safetensors")
    assert want.keys() == got.keys() == naive.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    gap = max((want[k] - naive[k]).abs().max().item() for k in want)
    assert gap > 1e-4, f"the rank-0-only optimizer state resumed to within {gap}: the test would have no power"


def test_optimizer_state_format_is_checked_before_loading(tmp_path):
    from torch import nn

    from kdforge.errors import CheckpointError
    from kdforge.train.checkpoint import (
        gather_optimizer_state,
        is_fully_sharded,
        restore_optimizer_state,
    )

    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert not is_fully_sharded(model)
    fmt, state = gather_optimizer_state(model, opt)
    assert fmt == "torch" and state["state"][0]["exp_avg"].shape == (2, 3)
    fresh = torch.optim.AdamW(model.parameters())
    restore_optimizer_state(model, fresh, state, fmt)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="unknown optimizer state format"):
        restore_optimizer_state(model, fresh, state, "zero3-shards")
