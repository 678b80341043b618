"""Cost of a model: parameters, bytes on disk, latency percentiles and throughput.

Generic over any ``torch.nn.Module`` and an example input (a tensor, a tuple of positional
arguments, or a dict of keyword arguments, e.g. a tokenizer's ``BatchEncoding``)::

    from kdforge.eval.cost import cost_report
    report = cost_report(model, torch.randn(1, 1, 28, 28))
    report["params"], report["size_mb"], report["latency_ms_p50"], report["throughput_per_s"]

Latency is measured on the *current* device of the model (CUDA is synchronised around each
call so the time covers the kernels, not just their launch), under ``torch.inference_mode`` in
eval mode, after ``warmup`` untimed calls; ``repeats`` timed calls give p50/p95/mean.
Throughput is ``batch_size / mean latency`` items per second. Numbers depend on the machine
and its load: compare models measured in the same process, and never assert them in tests.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def state_dict_bytes(model: nn.Module) -> int:
    """In-memory bytes of parameters and buffers: ``sum(numel * element_size)`` (shared once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def disk_size_bytes(model: nn.Module) -> int:
    """Size of the model's ``state_dict`` serialised as safetensors (header included).

    Tied/shared tensors are stored once. This is what a checkpoint of the weights costs on disk.
    """
    from safetensors.torch import save

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().cpu().contiguous()
    return len(save(state))


@dataclass(frozen=True)
class LatencyStats:
    """Timings of ``repeats`` calls, in milliseconds, for a batch of ``batch_size`` items."""

    device: str
    batch_size: int
    warmup: int
    repeats: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    throughput_per_s: float
    threads: int

    @property
    def per_item_ms(self) -> float:
        """Median latency divided by the batch size."""
        return self.p50_ms / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"per_item_ms": self.per_item_ms}


def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of sorted values (NumPy's default)."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _move(example: Any, device: torch.device) -> Any:
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, Mapping):
        return {k: _move(v, device) for k, v in example.items()}
    if isinstance(example, tuple | list):
        return type(example)(_move(v, device) for v in example)
    return example


def _batch_size(example: Any) -> int:
    if isinstance(example, torch.Tensor):
        return int(example.shape[0]) if example.ndim else 1
    if isinstance(example, Mapping):
        for v in example.values():
            if isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
    if isinstance(example, tuple | list):
        for v in example:
            if isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
    return 1


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def measure_latency(
    model: nn.Module,
    example_input: Any,
    *,
    warmup: int = 10,
    repeats: int = 50,
    batch_size: int | None = None,
) -> LatencyStats:
    """Time ``model(example_input)`` on the model's device.

    Args:
        model: any module; put it on the device (and dtype) to measure first.
        example_input: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a mapping
            (``model(**x)``); moved to the model's device.
        warmup: untimed calls first (allocator, kernel selection, lazy init).
        repeats: timed calls; p50/p95 are over these.
        batch_size: items per call for throughput (default: the first dim of the first tensor).

    Returns:
        :class:`LatencyStats` (milliseconds; ``throughput_per_s`` in items per second).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    device = _model_device(model)
    example = _move(example_input, device)
    n = batch_size if batch_size is not None else _batch_size(example)

    def call() -> Any:
        if isinstance(example, Mapping):
            return model(**example)
        if isinstance(example, tuple | list):
            return model(*example)
        return model(example)

    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                call()
            _sync(device)
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                _sync(device)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    times.sort()
    mean = statistics.fmean(times)
    return LatencyStats(
        device=str(device),
        batch_size=n,
        warmup=warmup,
        repeats=repeats,
        p50_ms=_percentile(times, 50),
        p95_ms=_percentile(times, 95),
        mean_ms=mean,
        min_ms=times[0],
        max_ms=times[-1],
        throughput_per_s=n / (mean / 1000.0) if mean > 0 else math.inf,
        threads=torch.get_num_threads(),
    )


def cost_report(
    model: nn.Module,
    example_input: Any | None = None,
    *,
    warmup: int = 10,
    repeats: int = 50,
) -> dict[str, Any]:
    """Parameters, sizes and (when ``example_input`` is given) latency in one flat dict.

    Keys: ``params``, ``trainable_params``, ``state_bytes``, ``size_bytes`` (safetensors),
    ``size_mb`` (``size_bytes / 2**20``), and with an input ``latency_ms_p50``,
    ``latency_ms_p95``, ``latency_ms_mean``, ``latency_per_item_ms``, ``throughput_per_s``,
    ``latency_batch_size``, ``device``.
    """
    size = disk_size_bytes(model)
    out: dict[str, Any] = {
        "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "state_bytes": state_dict_bytes(model),
        "size_bytes": size,
        "size_mb": size / 2**20,
    }
    if example_input is not None:
        lat = measure_latency(model, example_input, warmup=warmup, repeats=repeats)
        out |= {
            "latency_ms_p50": lat.p50_ms,
            "latency_ms_p95": lat.p95_ms,
            "latency_ms_mean": lat.mean_ms,
            "latency_per_item_ms": lat.per_item_ms,
            "throughput_per_s": lat.throughput_per_s,
            "latency_batch_size": lat.batch_size,
            "device": lat.device,
        }
    return out
