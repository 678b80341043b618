"""Cost metrics: parameter counts and sizes exactly, latency as structure only (never wall-clock)."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdforge.eval.cost import (
    LatencyStats,
    cost_report,
    count_parameters,
    disk_size_bytes,
    measure_latency,
    state_dict_bytes,
)


def test_count_parameters_exact_and_trainable_only():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))  # 15 + 8
    model[0].weight.requires_grad_(False)  # 12 frozen
    assert count_parameters(model) == 23
    assert count_parameters(model, trainable_only=True) == 11


def test_tied_parameters_counted_once():
    a = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(a, nn.ReLU(), a)
    assert count_parameters(model) == 16
    assert state_dict_bytes(model) == 16 * 4


def test_disk_size_is_safetensors_payload_plus_header_and_scales_with_dtype():
    model = nn.Linear(100, 10)  # 1010 params
    fp32 = disk_size_bytes(model)
    assert 1010 * 4 < fp32 < 1010 * 4 + 1024
    bf16 = disk_size_bytes(model.to(torch.bfloat16))
    assert 1010 * 2 < bf16 < fp32


def test_measure_latency_returns_ordered_stats_for_tensor_input():
    model = nn.Linear(8, 2)
    stats = measure_latency(model, torch.randn(4, 8), warmup=2, repeats=7)
    assert isinstance(stats, LatencyStats)
    assert stats.batch_size == 4 and stats.repeats == 7 and stats.device == "cpu"
    assert 0 <= stats.min_ms <= stats.p50_ms <= stats.p95_ms <= stats.max_ms
    assert stats.throughput_per_s > 0 and math.isfinite(stats.mean_ms)
    assert stats.per_item_ms == stats.p50_ms / 4


def test_measure_latency_accepts_kwargs_and_tuple_inputs_and_restores_mode():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, a, b):
            return self.lin(a) + b

    model = TwoInputs().train()
    a, b = torch.randn(5, 3), torch.randn(5, 1)
    assert measure_latency(model, {"a": a, "b": b}, warmup=0, repeats=2).batch_size == 5
    assert measure_latency(model, (a, b), warmup=0, repeats=2, batch_size=10).batch_size == 10
    assert model.training


def test_cost_report_keys_with_and_without_input():
    model = nn.Linear(8, 2)
    assert set(cost_report(model)) == {"params", "trainable_params", "state_bytes", "size_bytes", "size_mb"}
    full = cost_report(model, torch.randn(1, 8), warmup=1, repeats=3)
    assert full["params"] == 18 and full["latency_batch_size"] == 1 and full["device"] == "cpu"
    assert full["latency_ms_p50"] <= full["latency_ms_p95"]
