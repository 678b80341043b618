"""Two processes (torchrun, gloo on CPU) x batch 4 give the same update as one process x batch 8."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_normalise_by_the_global_token_count_like_one_big_batch(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                    str(_free_port()), str(WORKER), str(tmp_path / "two.st"), "4"],
                   check=True, env=env, timeout=300, capture_output=True)
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.st"), "8"], check=True, env=env,
                   timeout=300, capture_output=True)
    n2, seen2, loss2 = (tmp_path / "two.st.txt").read_text().split()
    n1, seen1, loss1 = (tmp_path / "one.st.txt").read_text().split()
    assert (n2, n1) == ("2", "1")
    assert seen2 == seen1  # same real tokens seen overall
    assert float(loss2) == pytest.approx(float(loss1), rel=1e-6)
    two, one = load_file(tmp_path / "two.st"), load_file(tmp_path / "one.st")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
