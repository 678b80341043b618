"""ND (norm and direction) and OFA-KD: the losses against their definitions, and as objective terms
on a CNN classifier (module taps, learned heads/projectors optimised, class means as buffers)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset

from kdforge.errors import ConfigError
from kdforge.features import ClassMeans, class_means, nd_loss, ofa_loss, ofa_targets
from kdforge.train import ClassificationTask, Distiller, Objective, TrainConfig

# -- ND -----------------------------------------------------------------------------------------------------


def test_nd_loss_hand_computed():
    centers = torch.tensor([[5.0, 0.0], [0.0, -2.0]])
    s = torch.tensor([[3.0, 4.0], [6.0, 8.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 10.0], [3.0, 4.0], [0.0, 0.5]])
    classes = torch.tensor([0, 0, 1])
    per = nd_loss(s, t, centers, classes, reduction="none")
    # norm below the teacher's: 1 - <s,e>/||t||; above: 1 - cos(s, e)
    assert per.tolist() == pytest.approx([1 - 3 / 10, 1 - 6 / 10, 1 - 0.0])
    assert nd_loss(s, t, centers, classes).item() == pytest.approx(per.mean().item())


def test_nd_loss_is_zero_on_the_class_direction_with_the_teachers_norm_or_more():
    centers = torch.tensor([[0.0, 2.0, 0.0]])
    t = torch.tensor([[1.0, 1.0, 1.0]])
    for scale in (math.sqrt(3), 5.0):
        assert nd_loss(torch.tensor([[0.0, scale, 0.0]]), t, centers, torch.tensor([0])).item() == pytest.approx(0.0)
    # a shorter student on the right direction still pays for its norm: the norm term
    assert nd_loss(torch.tensor([[0.0, 1.0, 0.0]]), t, centers, torch.tensor([0])).item() == \
        pytest.approx(1 - 1 / math.sqrt(3))


def test_nd_loss_masks_samples_without_a_class_and_pools_conv_maps():
    centers = torch.randn(3, 4)
    s, t = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    per = nd_loss(s, t, centers, torch.tensor([1, -100]), reduction="none")
    assert per[1].item() == 0.0
    assert per[0].item() == pytest.approx(nd_loss(s.mean((2, 3))[:1], t.mean((2, 3))[:1], centers,
                                                  torch.tensor([1])).item(), rel=1e-6)


vectors = st.lists(st.floats(-3, 3, allow_nan=False), min_size=12, max_size=12)


@settings(max_examples=30, deadline=None)
@given(vectors, vectors, st.integers(0, 10_000), st.floats(0.1, 10.0))
def test_nd_loss_invariances(sv, tv, seed, a):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.tensor(sv, dtype=torch.float64).view(3, 4), torch.tensor(tv, dtype=torch.float64).view(3, 4)
    centers = torch.randn(2, 4, generator=g, dtype=torch.float64)
    classes = torch.tensor([0, 1, 1])
    base = nd_loss(s, t, centers, classes, reduction="none")
    assert ((base >= -1e-9) & (base <= 2 + 1e-9)).all()
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))  # a rotation of the space
    assert torch.allclose(nd_loss(s @ q, t @ q, centers @ q, classes, reduction="none"), base, atol=1e-9)
    assert torch.allclose(nd_loss(s, t, centers * a, classes, reduction="none"), base, atol=1e-9)  # means: direction
    # scaling both sides together changes nothing; a student already past the teacher's norm: direction only
    assert torch.allclose(nd_loss(s * a, t * a, centers, classes, reduction="none"), base, atol=1e-9)
    longer = s * (1 + t.norm(dim=-1, keepdim=True) / s.norm(dim=-1, keepdim=True).clamp_min(1e-9))
    cos = torch.nn.functional.cosine_similarity(s, centers[classes], dim=-1)
    assert torch.allclose(nd_loss(longer, t, centers, classes, reduction="none"), 1 - cos, atol=1e-9)


def test_nd_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t, centers = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    classes = torch.tensor([0, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda x: nd_loss(x, t, centers, classes, reduction="sum"), (s,))


def test_running_class_means_equal_the_means_of_everything_seen():
    g = torch.Generator().manual_seed(0)
    feats, classes = torch.randn(10, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, -100, 0, 2, 2, 1])
    state = ClassMeans(num_classes=4, width=3)
    state.update(feats[:4], classes[:4])
    state.update(feats[4:], classes[4:])
    expected = class_means(feats, classes, 4)
    assert torch.allclose(state.means, expected, atol=1e-6)
    assert state.means[3].abs().sum() == 0  # never seen
    assert torch.allclose(expected[0], feats[[0, 3, 6]].mean(0))
    state.set(torch.ones(4, 3))
    assert torch.allclose(state.means, torch.ones(4, 3))


# -- OFA ----------------------------------------------------------------------------------------------------


def test_ofa_with_gamma_one_is_the_soft_cross_entropy_to_the_teacher():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    target = torch.tensor([0, 3, 6, 2, 2])
    ce = -(torch.softmax(zt / 2, -1) * torch.log_softmax(zs / 2, -1)).sum(-1)
    assert torch.allclose(ofa_loss(zs, zt, target, gamma=1.0, temperature=2.0, reduction="none"), ce, atol=1e-6)


def test_ofa_hand_computed_target_enhancement():
    zs = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    zt = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    got = ofa_loss(zs, zt, torch.tensor([0]), gamma=2.0).item()
    # target weight (1 + 0.6)^2 - 1 = 1.56; others 0.3^2, 0.1^2
    expected = -(1.56 * math.log(0.5) + 0.09 * math.log(0.25) + 0.01 * math.log(0.25))
    assert got == pytest.approx(expected, rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-4, 4, allow_nan=False), min_size=6, max_size=6), st.floats(1.0, 3.0),
       st.integers(0, 5))
def test_ofa_weights_enhance_the_target_and_damp_the_rest(logits, gamma, target):
    zt = torch.tensor([logits], dtype=torch.float64)
    pt = torch.softmax(zt, -1)[0]
    # the weights are the gradient of the loss with respect to log p_s (p_s fixed)
    log_ps = torch.log_softmax(torch.zeros(1, 6, dtype=torch.float64), -1).requires_grad_(True)
    onehot = torch.nn.functional.one_hot(torch.tensor(target), 6).double()
    weight = (pt + onehot) ** gamma - onehot
    assert weight[target] >= pt[target] - 1e-12
    others = torch.arange(6) != target
    assert (weight[others] <= pt[others] + 1e-12).all()
    loss = ofa_loss(torch.zeros(1, 6, dtype=torch.float64), zt, torch.tensor([target]), gamma=gamma)
    assert loss.item() == pytest.approx(-(weight * log_ps[0]).sum().item(), rel=1e-9)


def test_ofa_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ofa_loss(x, zt, torch.tensor([1, 0, 3]), gamma=1.7), (zs,))


def test_ofa_targets_are_labels_where_given_else_the_teachers_guess():
    zt = torch.tensor([[0.0, 2.0], [3.0, 1.0], [0.0, 5.0]])
    assert ofa_targets(torch.tensor([0, -100, 0]), zt).tolist() == [0, 0, 0]
    assert ofa_targets(None, zt).tolist() == [1, 0, 1]


# -- as objective terms on a CNN --------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, width: int, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2 * width), nn.ReLU(),
                                  nn.Linear(2 * width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Images(Dataset):
    def __init__(self, n: int = 32, seed: int = 0, unlabelled: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 1, 6, 6, generator=g) + self.y[:, None, None, None].float()
        self.labels = self.y.clone()
        self.labels[:unlabelled] = -100

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.labels[i]}


ND = {"name": "nd", "weight": 1.0, "params": {"student_modules": ["body"], "teacher_modules": ["head.3"]}}
OFA = {"name": "ofa", "weight": 1.0, "params": {"student_modules": ["body.1", "body.3"], "gamma": 1.5}}


def test_bind_makes_a_projector_and_class_means_for_nd_and_one_head_per_stage_for_ofa():
    torch.manual_seed(0)
    student, teacher = Net(4), Net(8)
    extras = Objective([{"name": "cross_entropy", "weight": 1.0}, ND, OFA]).bind(student, teacher)
    terms = extras["features"]
    assert terms.projectors["nd_0"].weight.shape == (16, 4)  # head.3 is a ReLU after Linear(8, 16)
    assert terms.states["nd"].sums.shape == (3, 16)  # 3 classes from the teacher's last Linear
    assert terms.projectors["ofa_0"].conv and terms.projectors["ofa_1"].fc.out_features == 3
    assert terms.teacher_request.modules == ("head.3",)  # ofa taps nothing on the teacher
    assert set(terms.student_request.modules) == {"body", "body.1", "body.3"}
    with pytest.raises(ConfigError, match="width"):
        Objective([{"name": "ofa", "weight": 1.0, "params": {"student_modules": ["head.0"]}}]).bind(student, teacher)


def test_nd_and_ofa_params_are_validated_when_the_config_is_read():
    with pytest.raises(ValueError, match="gamma"):
        Objective([{"name": "ofa", "weight": 1.0, "params": {"student_modules": ["a"], "gamma": 0.5}}])
    with pytest.raises(ValueError, match="teacher_modules"):
        Objective([{"name": "nd", "weight": 1.0, "params": {"student_modules": ["a"]}}])


def test_nd_on_a_language_model_batch_is_a_config_error():
    from .test_taps import tiny_llama
    from .test_terms import _batch

    teacher, student = tiny_llama(layers=2), tiny_llama(layers=2, seed=3)
    obj = Objective([{"name": "nd", "weight": 1.0, "params": {"student_modules": ["model.layers.1.mlp.down_proj"],
                                                               "teacher_modules": ["model.layers.1.mlp.down_proj"],
                                                               "num_classes": 5}}])
    from kdforge.train import CausalLMTask

    with pytest.raises(ConfigError, match="classifiers"):
        CausalLMTask().forward(student, teacher, _batch([[3, 4, 5]]), extras=obj.bind(student, teacher))


def _distiller(terms, steps, unlabelled=0, seed=0):
    torch.manual_seed(seed)
    teacher, student = Net(8), Net(4)
    with torch.no_grad():  # a confident teacher: its soft targets are far from uniform
        teacher.head[-1].weight.mul_(20)
    objective = Objective([{"name": "cross_entropy", "weight": 1.0}, *terms])
    distiller = Distiller(student, teacher, task=ClassificationTask(), objective=objective,
                          config=TrainConfig(max_steps=steps, batch_size=8, lr=1e-2, progress=False, log_every=1),
                          train_data=Images(unlabelled=unlabelled), eval_data=Images(16, seed=1))
    return distiller, student, teacher


def test_nd_training_lowers_the_nd_loss_and_keeps_the_class_means_as_a_buffer():
    distiller, _, teacher = _distiller([ND], steps=30, unlabelled=8)
    terms = distiller.extras["features"]
    projector = terms.projectors["nd_0"].weight.detach().clone()
    distiller.train()
    assert not torch.equal(projector, terms.projectors["nd_0"].weight)  # the projector joined the optimizer
    state = terms.states["nd"]
    assert state.counts.sum().item() == 30 * 8  # unlabelled samples counted under the teacher's class
    assert "states.nd.sums" in terms.state_dict()
    after = distiller.evaluate()["eval/loss/nd"]
    # the same held-out batches, with the final class means, under the initial student
    fresh, _, _ = _distiller([ND], steps=1, unlabelled=8)
    fresh.extras["features"].load_state_dict(terms.state_dict())
    before = fresh.evaluate()["eval/loss/nd"]
    assert after < 0.8 * before, (before, after)


def test_ofa_training_lowers_every_heads_loss_and_trains_the_heads():
    distiller, _, _ = _distiller([OFA], steps=30)
    heads = distiller.extras["features"].projectors
    before_w = heads["ofa_1"].fc.weight.detach().clone()
    before = distiller.evaluate()["eval/loss/ofa"]
    distiller.train()
    assert not torch.equal(before_w, heads["ofa_1"].fc.weight)
    after = distiller.evaluate()["eval/loss/ofa"]
    assert after < 0.8 * before, (before, after)


def test_nd_skip_leaves_unlabelled_samples_out_and_precomputed_means_are_used():
    torch.manual_seed(0)
    student, teacher = Net(4), Net(8)
    skip = {**ND, "params": {**ND["params"], "unlabeled": "skip"}}
    extras = Objective([skip]).bind(student, teacher)
    terms = extras["features"]
    data = Images(8, unlabelled=3)
    batch = {"inputs": data.x, "labels": data.labels}
    means = torch.randn(3, 16)
    terms.set_class_means("nd", means)
    terms.eval()  # no update: the precomputed means alone
    value = ClassificationTask().forward(student, teacher, batch, extras=extras).extra_terms["nd"]
    s = terms.projectors["nd_0"](student.body(data.x).mean((2, 3)))
    t = teacher.head[:4](teacher.body(data.x))
    expected = nd_loss(s, t, means, data.labels, reduction="sum")  # -100: left out
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(terms.states["nd"].counts, torch.ones(3))
    with pytest.raises(ConfigError, match="no nd term"):
        terms.set_class_means("ofa", means)


def test_nd_class_means_are_checkpointed_and_restored_on_resume(tmp_path):
    from safetensors.torch import load_file

    def run(steps):
        torch.manual_seed(0)
        teacher, student = Net(8), Net(4)
        return Distiller(student, teacher, task=ClassificationTask(),
                         objective=Objective([{"name": "cross_entropy", "weight": 1.0}, ND]),
                         config=TrainConfig(max_steps=steps, batch_size=8, lr=1e-2, progress=False, save_every=2,
                                            output_dir=str(tmp_path)), train_data=Images())

    run(2).train()
    saved = load_file(tmp_path / "checkpoints" / "step-2" / "extras.safetensors")
    assert saved["features.states.nd.counts"].sum().item() == 16
    resumed = run(3)
    resumed.train(resume=True)
    assert resumed.extras["features"].states["nd"].counts.sum().item() == 24


def test_a_flatten_takes_the_width_of_the_linear_that_reads_it():
    from kdforge.students.vision import SmallCNN, TeacherCNN

    student, teacher = SmallCNN(), TeacherCNN()
    nd = {"name": "nd", "weight": 1.0, "params": {"student_modules": ["classifier.0"],
                                                   "teacher_modules": ["classifier.3"]}}
    ofa = {"name": "ofa", "weight": 1.0, "params": {"student_modules": ["classifier.0"]}}
    terms = Objective([nd, ofa]).bind(student, teacher)["features"]
    assert terms.projectors["nd_0"].weight.shape == (256, 784)  # 16 x 7 x 7 flattened -> 256
    assert terms.projectors["ofa_0"].fc.in_features == 784 and not terms.projectors["ofa_0"].conv
    conv_then_flatten = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    with pytest.raises(ConfigError, match="width"):
        Objective([{"name": "ofa", "weight": 1.0, "params": {"student_modules": ["1"]}}]).bind(
            conv_then_flatten, teacher)
