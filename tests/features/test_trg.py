"""TRG (token-level relationship graph): its three parts against their definitions, invariances,
padding, the objective term on a tiny transformers decoder and on a conv map."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from kdforge.features import knn_graph, trg_contextual, trg_global, trg_local, trg_loss
from kdforge.train import CausalLMTask, ClassificationTask, Distiller, Objective, TrainConfig

from .test_taps import tiny_llama
from .test_terms import _batch


def test_knn_graph_hand_computed():
    x = torch.tensor([[[0.0], [1.0], [3.0], [7.0]]])
    a = knn_graph(x, k=1, sigma=0.5)  # exp(-d^2): the nearest neighbour only, no self loop
    expected = torch.zeros(4, 4)
    expected[0, 1] = expected[1, 0] = math.exp(-1)
    expected[2, 1] = math.exp(-4)
    expected[3, 2] = math.exp(-16)
    assert torch.allclose(a[0], expected)
    auto = knn_graph(x, k=3)  # sigma: the mean squared distance between distinct tokens
    sq = torch.tensor([[0, 1, 9, 49], [1, 0, 4, 36], [9, 4, 0, 16], [49, 36, 16, 0]], dtype=torch.float32)
    sigma = sq.sum() / 12
    assert torch.allclose(auto[0], torch.exp(-sq / (2 * sigma)) * (1 - torch.eye(4)))


def test_local_loss_is_the_kl_between_row_softmaxes_of_the_two_graphs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 5, 3, generator=g), torch.randn(1, 5, 4, generator=g)
    a_s, a_t = knn_graph(s, k=2), knn_graph(t, k=2)
    off = ~torch.eye(5, dtype=torch.bool)
    expected = 0.0
    for i in range(5):
        p = torch.softmax(a_s[0, i][off[i]], 0)
        q = torch.softmax(a_t[0, i][off[i]], 0)
        expected += (p * (p / q).log()).sum().item()
    assert trg_local(s, t, k=2, reduction="sum").item() == pytest.approx(expected, rel=1e-5)


def test_contextual_loss_hand_computed():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])
    cs_s = torch.softmax(torch.tensor([[1.0, 0.0], [0.0, 1.0]]) / math.sqrt(2), -1)
    cs_t = torch.full((2, 2), 0.5)
    expected = ((cs_t - cs_s) ** 2).mean(-1)
    assert torch.allclose(trg_contextual(s, t, reduction="none")[0], expected)


def test_global_infonce_hand_computed():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    cos = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])
    expected = -torch.diagonal(torch.log_softmax(cos / 0.5, -1))
    assert torch.allclose(trg_global(s, t, temperature=0.5, reduction="none")[0], expected, atol=1e-6)


tokens = st.lists(st.floats(-2, 2, allow_nan=False), min_size=24, max_size=24)


@settings(max_examples=25, deadline=None)
@given(tokens, tokens, st.integers(0, 10_000), st.floats(0.2, 5.0))
def test_trg_invariances(sv, tv, seed, a):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.tensor(sv, dtype=torch.float64).view(1, 6, 4), torch.tensor(tv, dtype=torch.float64).view(1, 6, 4)
    s = s + 0.1 * torch.randn(1, 6, 4, generator=g, dtype=torch.float64)  # no tied neighbour distances
    t = t + 0.1 * torch.randn(1, 6, 4, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    shift = torch.randn(4, generator=g, dtype=torch.float64)
    local = trg_local(s, t, k=3, reduction="none")
    assert (local >= -1e-12).all()
    for s2 in (s * a, s @ q + shift):
        assert torch.allclose(trg_local(s2, t, k=3, reduction="none"), local, atol=1e-8)
    assert torch.allclose(trg_local(s, t @ q * a, k=3, reduction="none"), local, atol=1e-8)
    ctx = trg_contextual(s, t, reduction="none")
    assert torch.allclose(trg_contextual(s @ q, t @ q.T, reduction="none"), ctx, atol=1e-9)
    glob = trg_global(s, t, reduction="none")
    assert torch.allclose(trg_global(s * a, t, reduction="none"), glob, atol=1e-8)
    # a student equal to its teacher: no graph or context loss
    assert trg_local(t, t, reduction="sum").abs().item() < 1e-10
    assert trg_contextual(t, t, reduction="sum").abs().item() < 1e-12
    # relabelling the tokens of both sides together changes nothing
    perm = torch.randperm(6, generator=g)
    both = trg_loss(s, t, reduction="sum")
    assert trg_loss(s[:, perm], t[:, perm], reduction="sum").item() == pytest.approx(both.item(), rel=1e-9)


def test_padding_tokens_are_no_nodes():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    proj = torch.randn(2, 6, 5, generator=g)
    together = trg_loss(s, t, mask, projected=proj, k=2, reduction="none")
    alone = trg_loss(s[1:, :3], t[1:, :3], projected=proj[1:, :3], k=2, reduction="none")
    assert torch.allclose(together[1, :3], alone[0], atol=1e-6)
    assert (together[1, 3:] == 0).all()
    s2 = s.clone()
    s2[1, 3:] = 100.0  # what padding holds does not matter
    assert torch.allclose(trg_loss(s2, t, mask, projected=proj, k=2, reduction="none"), together, atol=1e-6)


def test_trg_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: trg_loss(x, t, mask, k=2, reduction="sum"), (s,))


# -- as an objective term -------------------------------------------------------------------------------------


def test_trg_term_is_zero_in_graph_and_context_for_a_copy_of_the_teacher():
    teacher = tiny_llama(layers=2)
    student = copy.deepcopy(teacher)
    obj = Objective([{"name": "trg", "weight": 1.0, "params": {"global_weight": 0.0}}])
    extras = obj.bind(student, teacher)
    assert len(extras["features"].projectors) == 0  # no InfoNCE: no projector
    out = CausalLMTask().forward(student, teacher, _batch([[3, 4, 5, 6, 7], [8, 9, 10]]), extras=extras)
    assert out.extra_terms["trg"].item() == pytest.approx(0.0, abs=1e-6)


def test_trg_term_padding_equals_rows_one_by_one():
    teacher, student = tiny_llama(layers=2, seed=1), tiny_llama(layers=2, hidden=16, heads=2, kv=2, seed=2)
    obj = Objective([{"name": "trg", "weight": 1.0, "params": {"k": 2}}])
    extras = obj.bind(student, teacher)
    assert extras["features"].projectors["trg_0"].weight.shape == (32, 16)  # InfoNCE projector
    task = CausalLMTask()
    rows = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]
    together = task.forward(student, teacher, _batch(rows), extras=extras).extra_terms["trg"]
    apart = sum(task.forward(student, teacher, _batch([r]), extras=extras).extra_terms["trg"] for r in rows)
    assert together.item() == pytest.approx(apart.item(), rel=1e-4)


class Tokens(Dataset):
    def __init__(self, n: int = 32, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "attention_mask": torch.ones_like(self.rows[i])}


def test_trg_training_on_a_tiny_decoder_lowers_the_loss():
    teacher = tiny_llama(layers=4, hidden=32, seed=0)
    student = tiny_llama(layers=2, hidden=16, heads=2, kv=2, seed=1)
    objective = Objective([{"name": "forward_kl", "weight": 1.0},
                           {"name": "trg", "weight": 1.0, "params": {"layers": "uniform", "k": 4}}])
    distiller = Distiller(student, teacher, task=CausalLMTask(), objective=objective,
                          config=TrainConfig(max_steps=25, batch_size=8, lr=3e-3, scheduler="constant", progress=False,
                                             log_every=1),
                          train_data=Tokens(), eval_data=Tokens(n=8, seed=1))
    before = distiller.evaluate()["eval/loss/trg"]
    distiller.train()
    after = distiller.evaluate()["eval/loss/trg"]
    assert after < 0.8 * before, (before, after)


def test_trg_on_a_conv_map_uses_its_positions_as_tokens():
    from .test_nd_ofa import Images, Net

    torch.manual_seed(0)
    student, teacher = Net(4), Net(8)
    obj = Objective([{"name": "trg", "weight": 1.0,
                      "params": {"student_modules": ["body.3"], "teacher_modules": ["body.3"], "k": 4}}])
    extras = obj.bind(student, teacher)
    batch = {"inputs": Images(4).x, "labels": Images(4).y}
    value = ClassificationTask().forward(student, teacher, batch, extras=extras).extra_terms["trg"]
    s = student.body(batch["inputs"]).flatten(2).transpose(1, 2)
    t = teacher.body(batch["inputs"]).flatten(2).transpose(1, 2)
    proj = extras["features"].projectors["trg_0"](s)
    expected = trg_loss(s, t, projected=proj, k=4, reduction="none").mean(1).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
