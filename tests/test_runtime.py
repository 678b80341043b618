"""kdforge.runtime: the allocator setting the CLI applies at start-up."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")

_PROBE = textwrap.dedent(
    """
    import resource, torch
    from kdforge.runtime import keep_freed_memory
    applied = keep_freed_memory()
    def churn():
        for _ in range(20):
            x = torch.empty(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
            x.fill_(1.0)
            del x
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(env_value: str) -> tuple[bool, int]:
    import os

    env = dict(os.environ, KDFORGE_MALLOC_TUNING=env_value)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_reused_big_blocks_stop_faulting_in_fresh_pages_and_opt_out_restores_glibc_default() -> None:
    applied, tuned = _faults("1")
    skipped, default = _faults("0")
    assert applied and not skipped
    pages_per_block = 64 * 2**20 // 4096
    # default glibc: every 64 MiB tensor is a fresh mmap, all its pages fault in again
    assert default >= 20 * pages_per_block * 0.9
    # tuned: the freed block is reused from the heap, nearly no new faults
    assert tuned < 2 * pages_per_block


def test_leave_distributed_returns_the_code_without_a_process_group() -> None:
    from kdforge.runtime import leave_distributed

    assert leave_distributed(0) == 0 and leave_distributed(2) == 2  # plain process: nothing to tear down


def test_leave_distributed_destroys_the_group_flushes_and_exits_with_the_code(tmp_path) -> None:
    """A one-process gloo group: the process ends with the command's code, after what it logged."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import logging, sys
        import torch.distributed as dist
        from kdforge.runtime import leave_distributed
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", world_size=1, rank=0)
        logging.getLogger("probe").info("work done")
        print("stdout line", end="")  # unflushed: leave_distributed flushes it
        leave_distributed(3)
        print("never reached")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr[-2000:]
    assert run.stdout == "stdout line" and "work done" in run.stderr
