"""generalized_jsd agrees with TRL's GKD ``generalized_jsd_loss`` (same beta convention)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from kdforge.losses import generalized_jsd

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd")


def trl_loss(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gkd.GKDTrainer.generalized_jsd_loss(*args, **kwargs)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_generalized_jsd_matches_trl_on_random_inputs(beta, temperature):
    g = torch.Generator().manual_seed(int(beta * 100 + temperature * 10))
    s = torch.randn(3, 7, 40, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 7, 40, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 40, (3, 7), generator=g)
    labels[:, :2] = -100  # prompt positions
    mask = labels != -100
    # TRL: no T^2 factor; "sum" sums over unmasked positions, "batchmean" divides by their count.
    ours_sum = generalized_jsd(s, t, beta=beta, temperature=temperature, mask=mask, reduction="sum")
    theirs_sum = trl_loss(s, t, labels=labels, beta=beta, temperature=temperature, reduction="sum")
    torch.testing.assert_close(ours_sum / temperature**2, theirs_sum, rtol=1e-9, atol=1e-12)
    ours_mean = generalized_jsd(s, t, beta=beta, temperature=temperature, mask=mask, reduction="mean")
    theirs_mean = trl_loss(s, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    torch.testing.assert_close(ours_mean / temperature**2, theirs_mean, rtol=1e-9, atol=1e-12)


def test_generalized_jsd_gradient_matches_trl():
    s = torch.randn(2, 5, 30, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 30, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(generalized_jsd(s, t, beta=0.3, reduction="sum"), s)
    (g_trl,) = torch.autograd.grad(trl_loss(s, t, beta=0.3, reduction="sum"), s)
    torch.testing.assert_close(g_ours, g_trl)
