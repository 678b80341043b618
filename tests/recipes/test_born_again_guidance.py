"""Born-again generations with ground-truth guidance (``teacher: {source: born_again, label_weight:
auto | float}``, recipes/born_again_guidance.py): the mapping onto the method's terms, the config
errors, and a tiny end-to-end run that records one alpha per generation and trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdforge.config import validate
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.errors import ConfigError
from kdforge.losses import cross_entropy, forward_kl
from kdforge.recipes.born_again_guidance import (
    generation_label_weight,
    guidance_split,
    guidance_terms,
)
from kdforge.recipes.fashion_mnist import FashionMnistConfig, TermSpec
from kdforge.students.vision import build_vision_model

REPO = Path(__file__).resolve().parents[2]
CE_KL1 = [{"name": "cross_entropy", "weight": 1.0}, {"name": "forward_kl", "weight": 1.0, "params": {"temperature": 1.0}}]


def _config(data: Path | None, teacher: dict, terms: list[dict] = CE_KL1, **train) -> FashionMnistConfig:
    return validate(FashionMnistConfig, {
        "data": {"root": str(data) if data else None, "labelled": 60, "transfer": 0},
        "teacher": {"arch": "mlp", "kwargs": {"hidden": [32]}, "epochs": 1, "batch_size": 64},
        "student": {"arch": "mlp", "kwargs": {"hidden": [32]}},
        "train": {"epochs": 4, "batch_size": 16, **train},
        "seeds": [0],
        "methods": [{"name": "guided", "teacher": teacher, "terms": terms}],
        "eval": {"latency_warmup": 1, "latency_repeats": 2},
    }, source="test")


def test_the_terms_become_alpha_times_ce_plus_one_minus_alpha_times_kl():
    terms = [TermSpec(**t) for t in reversed(CE_KL1)]
    mapped = guidance_terms(terms, 0.3)
    assert [(t.name, t.weight) for t in mapped] == [("forward_kl", 0.7), ("cross_entropy", 0.3)]
    assert [t.weight for t in terms] == [1.0, 1.0]  # the method's own terms are untouched
    # the mapped objective equals cross-entropy against the mixed target, up to the teacher's entropy
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    p = torch.softmax(t, -1)
    target = 0.3 * torch.nn.functional.one_hot(y, 5) + 0.7 * p
    mixed_ce = -(target * torch.log_softmax(s, -1)).sum(-1).mean()
    entropy = -(p * p.log()).sum(-1).mean()
    fns = {"cross_entropy": cross_entropy, "forward_kl": forward_kl}
    total = sum(m.weight * fns[m.name](s, t, labels=y, **m.params) for m in mapped)
    torch.testing.assert_close(total, mixed_ce - 0.7 * entropy)


@pytest.mark.parametrize("terms, match", [
    ([{"name": "cross_entropy", "weight": 0.5}, {"name": "forward_kl", "weight": 0.5, "params": {"temperature": 2.0}}],
     "temperature 1"),
    ([{"name": "cross_entropy", "weight": 1.0}], "exactly two terms"),
    ([*CE_KL1, {"name": "reverse_kl", "weight": 1.0}], "exactly two terms"),
])
def test_terms_that_cannot_be_mapped_are_config_errors(terms, match):
    with pytest.raises(ConfigError, match=match):
        _config(None, {"source": "born_again", "label_weight": "auto"}, terms)


def test_label_weight_values_and_sources():
    with pytest.raises(ConfigError, match="label_weight"):
        _config(None, {"source": "born_again", "label_weight": 1.5})
    with pytest.raises(ConfigError, match="label_weight do\\(es\\) not apply to source 'pskd'"):
        _config(None, {"source": "pskd", "label_weight": "auto"})
    with pytest.raises(ConfigError, match="label_weight"):
        _config(None, {"source": "born_again", "label_weight": "half"})
    assert _config(None, {"source": "born_again", "label_weight": 0.25}).methods[0].teacher.label_weight == 0.25


def test_a_fixed_weight_is_recorded_without_an_estimate():
    model = build_vision_model("mlp", hidden=[8])
    rec = generation_label_weight(0.4, model, torch.randn(4, 1, 28, 28), torch.randn(4, 10),
                                  torch.zeros(4, dtype=torch.long), seed=0, generation=1)
    assert rec == {"generation": 1, "alpha": 0.4, "estimated": False}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=160, n_test=40)


def test_auto_records_an_alpha_per_generation_and_trains(data_dir, tmp_path):
    from kdforge.recipes.fashion_mnist import FashionMnistKD

    config = _config(data_dir, {"source": "born_again", "generations": 2, "label_weight": "auto"})
    FashionMnistKD().run(config, tmp_path / "run")
    seed_dir = tmp_path / "run" / "students" / "guided" / "seed-0"
    result = json.loads((seed_dir / "result.json").read_text())
    records = result["guidance"]
    assert [r["generation"] for r in records] == [1, 2]
    for r in records:
        assert r["estimated"] and 0.0 <= r["alpha"] <= 1.0 and r["n_fit"] + r["n_heldout"] == 60
        assert r["heldout_mse_alpha"] <= min(r["heldout_mse_labels"], r["heldout_mse_previous"]) + 1e-9
    for g in (1, 2):  # every generation trained: its loss fell from the first logged step to the last
        losses = [json.loads(line)["loss"] for line in (seed_dir / f"gen-{g}" / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert len(losses) >= 2 and losses[-1] < losses[0]
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
    # the estimate comes from a shadow chain that never saw the held-out rows (generations 0 and 1)
    assert (seed_dir / "shadow-0").is_dir() and (seed_dir / "shadow-1").is_dir()
    assert not (seed_dir / "shadow-2").exists()
    # benchmarks/born_again_guidance_table.py tabulates the run (accuracy and each generation's alpha)
    table = subprocess.run([sys.executable, str(REPO / "benchmarks" / "born_again_guidance_table.py"), "--run",
                            str(tmp_path / "run"), "--reference", "guided"], capture_output=True, text=True, check=True)
    row = next(line for line in table.stdout.splitlines() if line.startswith("| guided |"))
    assert f"{100 * result['metrics']['accuracy']:.2f}" in row and f"0: {records[0]['alpha']:.2f}" in row


def test_the_guidance_split_holds_out_labelled_rows_only():
    labels = torch.tensor([0, 1] * 10 + [-100] * 5)
    keep, held = guidance_split(labels, seed=3)
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(25))
    assert (labels[held] != -100).all() and len(held) == 4  # 20 % of each class's 10
    assert {i for i in range(20, 25)} <= set(keep.tolist())
    assert torch.equal(held, guidance_split(labels, seed=3)[1])
