"""Count the Python-level host reads of tensor values (each a blocking sync on an accelerator).

Shared by tests/losses/test_value_checks.py and tests/train/test_hot_path.py.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch

#: the Python-level ways a tensor value reaches the host (each a blocking sync on an accelerator)
HOST_READS = ("__bool__", "item", "__int__", "__float__", "__index__", "tolist")


@contextmanager
def counted_host_reads():
    """Count calls of :data:`HOST_READS` on any tensor while the block runs."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name):
        original = originals[name]

        def counting(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return counting

    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
