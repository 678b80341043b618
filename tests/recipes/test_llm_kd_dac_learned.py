"""llm_kd with a `dac_kl: {learned: true}` method: the recipe creates the clipping sub-network and
optimises it with the student (online dense teacher)."""

from __future__ import annotations

import pytest
import torch

from kdforge.config import validate
from kdforge.losses import DACClipNet
from kdforge.recipes import llm_kd
from kdforge.recipes.llm_kd import LLMKD, LLMKDConfig

from ._tiny import seeded_teacher_and_corpus

METHOD = {"name": "DAC learned", "teacher": "online",
          "objective": [{"name": "dac_kl", "weight": 1.0, "params": {"learned": True, "mass": 0.8, "temperature": 2.0}},
                        {"name": "cross_entropy", "weight": 0.5}]}


def _config(root, **overrides):
    return validate(LLMKDConfig, {
        "teacher": {"model": str(root / "teacher")},
        "student": {"layers": "first_last"},
        "data": {"corpus": str(root / "corpus"), "train_docs": ["book_a"], "eval_docs": ["book_b"],
                 "seq_len": 16, "train_sequences": 8, "eval_sequences": 4},
        "cache": {"k": 8, "batch_size": 4},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "progress": False},
        "eval": {"batch_size": 2, "during_training_sequences": 0, "speed_batch": 2, "speed_repeats": 1},
        **overrides,
    }, source="test")


def test_a_learned_dac_kl_method_trains_its_clipping_net(tmp_path, monkeypatch):
    root = seeded_teacher_and_corpus(tmp_path / "setup")
    nets: list[DACClipNet] = []
    real = llm_kd.attach_clip_nets

    def spy(objective, **kw):
        extras = real(objective, **kw)
        nets.extend(extras.values())
        return extras

    monkeypatch.setattr(llm_kd, "attach_clip_nets", spy)
    results = LLMKD().run(_config(root, methods=[METHOD]), tmp_path / "run")
    assert [m["name"] for m in results["models"]] == ["teacher", "student / DAC learned"]
    assert len(nets) == 1 and float(nets[0].mlp[2].weight.detach().abs().sum()) > 0  # moved off its zero start
    assert torch.isfinite(torch.tensor(results["models"][1]["metrics"]["perplexity"]))


def test_chunked_true_is_refused_for_a_learned_dac_kl_method(tmp_path):
    with pytest.raises(ValueError, match="learned module"):
        validate(llm_kd.MethodSpec, {**METHOD, "chunked": True}, source="test")
