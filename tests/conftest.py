"""Shared pytest fixtures and markers."""

from __future__ import annotations

import os

import pytest
import torch

# Keep the suite deterministic and light on a 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# compile_kernels="auto" compiles the closed-form kernels wherever a compiler exists (tens of
# seconds per kernel and process on a CPU): the suite runs them eagerly; the compiled == eager
# tests pass compile_kernels=True explicitly (slow-marked).
os.environ.setdefault("KDFORGE_COMPILE_KERNELS", "0")

# Tiny models spend more time synchronising threads than computing; one thread is faster on a
# 2-core CI machine and keeps results bit-identical between runs.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kdforge_cache(tmp_path, monkeypatch):
    """An empty, private KDFORGE_CACHE for tests that write derived assets."""
    path = tmp_path / "kdforge-cache"
    monkeypatch.setenv("KDFORGE_CACHE", str(path))
    return path
