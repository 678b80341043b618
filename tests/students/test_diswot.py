"""DisWOT (kdforge.students.diswot): the two matrices against their definitions, the score's
invariances, the evolutionary search under a budget, and the recipe end to end on tiny data."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdforge.errors import ConfigError, ShapeError
from kdforge.students.diswot import (
    ConvNetSpace,
    DisWOTScore,
    class_activation_gram,
    diswot_score,
    evolutionary_search,
    sample_relation,
    spearman,
)
from kdforge.students.vision import build_vision_model


class _PoolHead(nn.Module):
    """conv features -> global average pool -> linear: Grad-CAM has a closed form here."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_class_activation_gram_matches_the_closed_form_of_a_pooled_linear_head():
    torch.manual_seed(0)
    model = _PoolHead()
    fmap = model.features(torch.randn(5, 1, 6, 6))
    logits = model.head(fmap.mean(dim=(2, 3)))
    got = class_activation_gram(fmap, logits)
    # d logit_k / d F_c[h, w] = W[k, c] / (H W): alpha_kc = W[k, c] / 36, CAM_k = ReLU(sum_c alpha_kc F_c)
    w = model.head.weight.detach()
    cams = torch.relu(torch.einsum("kc,bchw->kbhw", w / 36.0, fmap.detach())).reshape(4, -1)
    gram = cams @ cams.T
    want = gram / gram.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a class whose map ReLU zeroes: a zero row
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (4, 4)


def test_sample_relation_is_the_row_normalised_gram_of_flattened_features():
    f = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[1.0, 1.0]]])  # [3, 1, 2]
    g = torch.tensor([[1.0, 0.0, 1.0], [0.0, 4.0, 2.0], [1.0, 2.0, 2.0]])
    torch.testing.assert_close(sample_relation(f), g / g.norm(dim=1, keepdim=True))


def test_a_student_identical_to_the_teacher_scores_zero_and_beats_a_random_one():
    torch.manual_seed(0)
    teacher = build_vision_model("convnet", channels=[8, 16], hidden=[32])
    twin = build_vision_model("convnet", channels=[8, 16], hidden=[32])
    twin.load_state_dict(teacher.state_dict())
    other = build_vision_model("convnet", channels=[4], hidden=[])
    images = torch.randn(16, 1, 28, 28)
    same = diswot_score(teacher, twin, images)
    assert same.semantic == pytest.approx(0.0, abs=1e-6) and same.relation == pytest.approx(0.0, abs=1e-6)
    assert same.score == pytest.approx(0.0, abs=1e-6)
    assert diswot_score(teacher, other, images).score < -1e-3


def test_the_score_ignores_how_channels_are_numbered():
    """Permuting the last block's channels (and the head's inputs) is the same function: score 0."""
    torch.manual_seed(1)
    teacher = build_vision_model("convnet", channels=[6], hidden=[])
    student = build_vision_model("convnet", channels=[6], hidden=[])
    student.load_state_dict(teacher.state_dict())
    perm = torch.randperm(6)
    conv, head = student.features[0], student.classifier[-1]
    with torch.no_grad():
        conv.weight.copy_(conv.weight[perm])
        conv.bias.copy_(conv.bias[perm])
        w = head.weight.view(10, 6, 14 * 14)[:, perm].reshape(10, -1)
        head.weight.copy_(w)
    images = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(student(images), teacher(images), rtol=1e-5, atol=1e-5)
    assert diswot_score(teacher, student, images).score == pytest.approx(0.0, abs=1e-5)


def test_scoring_changes_no_parameter_and_restores_the_training_mode():
    torch.manual_seed(0)
    teacher = build_vision_model("convnet", channels=[8], hidden=[16], dropout=0.5)
    student = build_vision_model("convnet", channels=[4], hidden=[])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student.train()
    diswot_score(teacher, student, torch.randn(4, 1, 28, 28))
    assert student.training and all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


def test_a_model_without_a_conv_map_or_the_tap_is_a_clear_error():
    teacher = build_vision_model("convnet", channels=[4], hidden=[])
    with pytest.raises(ConfigError, match="no module 'features'"):
        diswot_score(teacher, build_vision_model("mlp", hidden=[8]), torch.randn(2, 1, 28, 28))
    with pytest.raises(ShapeError, match=r"\[B, C, H, W\]"):
        class_activation_gram(torch.randn(2, 3), torch.randn(2, 4))


def test_evolutionary_search_respects_the_budget_scores_each_candidate_once_and_finds_the_optimum():
    space = ConvNetSpace(widths=(4, 8, 16), blocks=(1, 2), hidden=(0, 32), max_params=12_000)
    calls: list[str] = []
    target = space.params((0, 8, 16))  # 9,098 parameters, inside the budget

    def score_fn(kwargs):
        calls.append(json.dumps(kwargs, sort_keys=True))
        n = sum(p.numel() for p in build_vision_model("convnet", **kwargs).parameters())
        return DisWOTScore(semantic=abs(n - target) / 1000.0, relation=0.0)

    found = evolutionary_search(score_fn, space, population=4, cycles=30, sample_size=2, seed=0)
    assert len(calls) == len(set(calls)) == len(found)  # one score per configuration
    assert all(c.params <= 12_000 for c in found)
    assert [c.score for c in found] == sorted((c.score for c in found), reverse=True)
    assert found[0].genes == (0, 8, 16) and found[0].score == 0.0
    again = evolutionary_search(score_fn, space, population=4, cycles=30, sample_size=2, seed=0)
    assert [c.genes for c in again] == [c.genes for c in found]  # reproducible from the seed


def test_a_budget_nothing_fits_is_a_config_error():
    space = ConvNetSpace(widths=(32,), blocks=(3,), hidden=(64,), max_params=100)
    with pytest.raises(ConfigError, match="parameter budget"):
        evolutionary_search(lambda kw: DisWOTScore(0.0, 0.0), space, population=2, cycles=1, max_tries=5)


def test_mutation_changes_one_gene_and_keeps_depth_in_the_space():
    space = ConvNetSpace(widths=(4, 8), blocks=(1, 2, 3), hidden=(0, 32))
    rng = random.Random(0)
    genes = (0, 4, 8)
    for _ in range(50):
        child = space.mutate(genes, rng)
        assert len(child) - 1 in space.blocks and child[0] in space.hidden
        assert all(w in space.widths for w in child[1:])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(-5, 5)), min_size=2, max_size=12))
def test_spearman_matches_scipy(pairs):
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]
    got = spearman(x, y)
    with warnings.catch_warnings():  # scipy warns on a constant input (rho undefined: nan)
        warnings.simplefilter("ignore")
        want = scipy_stats.spearmanr(x, y).statistic
    if want != want:  # constant input: nan on both sides
        assert got != got
    else:
        assert got == pytest.approx(want, abs=1e-12)


# -- the recipe on tiny synthetic data -------------------------------------------------------------


def test_diswot_recipe_searches_checks_and_reuses_its_search(tmp_path):
    from kdforge.data.vision import write_synthetic_fashion_mnist
    from kdforge.recipes import load_recipe_file

    data = write_synthetic_fashion_mnist(tmp_path / "fm", n_train=200, n_test=40)
    overrides = {
        "data.root": str(data), "data.labelled": 40, "teacher.arch": "convnet",
        "teacher.kwargs": {"channels": [8], "hidden": []}, "teacher.epochs": 1, "teacher.batch_size": 64,
        "train.epochs": 1, "train.batch_size": 32, "seeds": [0, 1],
        "eval.latency_warmup": 1, "eval.latency_repeats": 2,
        "search.space.widths": [2, 4, 8], "search.space.blocks": [1, 2], "search.space.hidden": [0, 16],
        "search.space.min_params": 0, "search.space.max_params": 40000,
        "search.population": 4, "search.cycles": 4, "search.images": 16, "search.inits": 1,
        "evaluate.top": 1, "evaluate.bottom": 1, "evaluate.params_tolerance": 10.0,
    }
    recipe, config = load_recipe_file("configs/diswot.yaml", overrides)
    out = tmp_path / "run"
    results = recipe.run(config, out)
    ranking = results["ranking"]
    assert len(ranking) >= 4 and [c["score"] for c in ranking] == sorted((c["score"] for c in ranking), reverse=True)
    assert len(results["checked"]) == 2 and results["checked"][0]["score"] >= results["checked"][1]["score"]
    assert all(set(c["per_seed"]) == {0, 1} for c in results["checked"])
    assert -1.0 <= results["spearman"] <= 1.0
    distilled = json.loads((out / "distill" / "results.json").read_text())
    params = {m["method"]: m["params"] for m in distilled["models"] if m["role"] != "teacher"}
    assert sorted(params.values()) == sorted(c["params"] for c in results["checked"])  # each its own student
    assert (out / "search" / "search.json").is_file() and "Spearman" in (out / "results.md").read_text()
    mtime = (out / "search" / "search.json").stat().st_mtime_ns
    again = recipe.run(config, out)  # search, teacher and students reused
    assert again["ranking"] == ranking and (out / "search" / "search.json").stat().st_mtime_ns == mtime
