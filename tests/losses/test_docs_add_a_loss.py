"""docs/losses.md, "How to add a loss": its snippet (one function + one decorator line) works as the
page says: the name reaches objectives (params validated), dense and sparse teachers and the
chunked path, without editing anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.losses import LOSSES, SparseTeacher, chunked_distillation_loss, loss_spec
from kdforge.train import LossTerm, Objective, TaskOutput

DOC = Path(__file__).resolve().parents[2] / "docs" / "losses.md"


def _snippet() -> str:
    section = DOC.read_text(encoding="utf-8").split("## How to add a loss", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_the_documented_new_loss_works_everywhere(monkeypatch):
    monkeypatch.setattr(LOSSES, "_entries", dict(LOSSES._entries))  # the registration is undone afterwards
    exec(compile(_snippet(), str(DOC), "exec"), {})
    spec = loss_spec("mixed_kl")
    assert spec.sparse_ok and not spec.needs_labels and "gamma" in spec.param_names
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 9, generator=g, requires_grad=True), torch.randn(2, 4, 9, generator=g)
    fkl, rkl = LOSSES.get("forward_kl")(s, t), LOSSES.get("reverse_kl")(s, t)
    torch.testing.assert_close(spec(s, t, gamma=0.3), 0.3 * fkl + 0.7 * rkl)
    assert torch.isfinite(spec(s, SparseTeacher.from_logits(t, 3), gamma=0.3))
    objective = Objective([LossTerm("mixed_kl", 1.0, {"gamma": 0.3})])
    value = objective(TaskOutput(s, t, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool)), 8)
    torch.testing.assert_close(value.total, 0.3 * fkl + 0.7 * rkl)
    with pytest.raises(ConfigError, match="did you mean 'gamma'"):
        LossTerm("mixed_kl", 1.0, {"gama": 0.3})
    h, w = torch.randn(8, 5, generator=g), torch.randn(9, 5, generator=g)
    out = chunked_distillation_loss(h, w, t.reshape(8, 9), loss="mixed_kl", chunk_size=3, gamma=0.3)
    torch.testing.assert_close(out["loss"], spec(h @ w.T, t.reshape(8, 9), gamma=0.3, reduction="sum"))
