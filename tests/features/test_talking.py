"""Talking models (kdforge.features.talking): the loss against its definition, and as an objective term."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdforge.errors import ConfigError
from kdforge.features import TalkingChannel, TalkingWeights, talking_loss, talking_parts
from kdforge.features.talking import run_frozen
from kdforge.train import ClassificationTask, Distiller, Objective, TrainConfig

from .test_nd_ofa import Images, Net


def _set(layer: nn.Linear, weight: list[list[float]]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.zero_()


def _hand_channel() -> TalkingChannel:
    ch = TalkingChannel(2, 2, 1)
    _set(ch.enc_s, [[1.0, 0.0]])
    _set(ch.dec_s, [[1.0], [0.0]])
    _set(ch.enc_t, [[0.0, 1.0]])
    _set(ch.dec_t, [[0.0], [1.0]])
    return ch


def _identity_channel(width: int, dtype: torch.dtype = torch.float32) -> TalkingChannel:
    ch = TalkingChannel(width, width, width).to(dtype)
    for layer in (ch.enc_s, ch.dec_s, ch.enc_t, ch.dec_t):
        with torch.no_grad():
            layer.weight.copy_(torch.eye(width))
            layer.bias.zero_()
    return ch


def test_parts_hand_computed():
    h_s, h_t = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    z, zt = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    parts = talking_parts(_hand_channel(), h_s, h_t, torch.tensor([True]), answer_fn=lambda x: x,
                          student_logits=z, teacher_logits=zt, labels=torch.tensor([1]))
    # z_s = 1, z_t = 4; D_s(E_s(h_s)) = (1, 0) vs (1, 2): 4 / |h_s|^2 = 4/5; D_t(E_t(h_t)) = (0, 4) vs (3, 4): 9/25
    assert parts["reconstruction"].item() == pytest.approx(4 / 5 + 9 / 25)
    assert parts["agreement"].item() == pytest.approx(9 / ((1 + 16) / 2))  # (1-4)^2 over the mean message size
    assert parts["passing"].item() == pytest.approx(13 / 5)  # D_s(z_t) = (4, 0) vs (1, 2)
    # the answer: D_t(z_s) = (0, 1) through an identity head
    pa = [1 / (1 + math.e), math.e / (1 + math.e)]
    pt = [1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)]
    learn = sum(p * math.log(p / 0.5) for p in pa)
    fit = sum(p * math.log(p / q) for p, q in zip(pt, pa))
    ce = -math.log(pa[1])
    assert parts["interactive"].item() == pytest.approx(learn + fit + ce)
    total = talking_loss(_hand_channel(), h_s, h_t, torch.tensor([True]), answer_fn=lambda x: x,
                         weights=TalkingWeights(0.5, 2.0, 3.0, 0.25), student_logits=z, teacher_logits=zt,
                         labels=torch.tensor([1]), reduction="sum")
    expected = 0.5 * (4 / 5 + 9 / 25) + 2.0 * 9 / 8.5 + 3.0 * 13 / 5 + 0.25 * (learn + fit + ce)
    assert total.item() == pytest.approx(expected)


def test_temperature_scales_both_kls_by_t_squared():
    h = torch.tensor([[1.0, 2.0]])
    z, zt = torch.tensor([[0.3, -0.2]]), torch.tensor([[0.0, 2.0]])
    t = 3.0
    got = talking_parts(_hand_channel(), h, h, torch.tensor([True]), answer_fn=lambda x: x, student_logits=z,
                        teacher_logits=zt, temperature=t)["interactive"]
    a = torch.tensor([[0.0, 1.0]])  # D_t(z_s), z_s = 1

    def kl(p, q):
        lp, lq = torch.log_softmax(p / t, -1), torch.log_softmax(q / t, -1)
        return (lp.exp() * (lp - lq)).sum() * t * t

    assert got.item() == pytest.approx((kl(a, z) + kl(zt, a)).item(), rel=1e-6)


def test_zero_when_the_two_paths_agree():
    torch.manual_seed(0)
    h = torch.randn(5, 6)
    head = nn.Linear(6, 4)
    logits = head(h).detach()
    parts = talking_parts(_identity_channel(6), h, h.clone(), torch.ones(5, dtype=torch.bool),
                          answer_fn=lambda x: run_frozen([head], x), student_logits=logits, teacher_logits=logits,
                          labels=torch.tensor([0, 1, 2, 3, -100]), answer_labels=False)
    for name, value in parts.items():
        assert value.abs().max().item() < 1e-5, name
    # with labels, the answer's cross-entropy to them is all that is left
    y = torch.tensor([0, 1, 2, 3, -100])
    with_labels = talking_parts(_identity_channel(6), h, h.clone(), torch.ones(5, dtype=torch.bool),
                                answer_fn=lambda x: run_frozen([head], x), student_logits=logits,
                                teacher_logits=logits, labels=y)["interactive"]
    ce = torch.nn.functional.cross_entropy(logits[:4], y[:4], reduction="none")
    assert torch.allclose(with_labels[:4], ce, atol=1e-5) and with_labels[4].item() == pytest.approx(0.0, abs=1e-6)


def test_padding_positions_count_nothing_and_a_padded_batch_equals_its_real_rows():
    torch.manual_seed(1)
    ch = TalkingChannel(3, 5, 2)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    value = talking_loss(ch, s, t, mask, reduction="sum")
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 1e3, -1e3
    assert talking_loss(ch, s2, t2, mask, reduction="sum").item() == pytest.approx(value.item(), rel=1e-5)
    flat = talking_loss(ch, s[mask], t[mask], torch.ones(5, dtype=torch.bool), reduction="sum")
    assert flat.item() == pytest.approx(value.item(), rel=1e-5)


def test_conv_maps_use_channels_as_features_and_count_each_sample_once():
    torch.manual_seed(2)
    ch = TalkingChannel(3, 4, 2)
    s, t = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    per_sample = talking_loss(ch, s, t, torch.ones(2, dtype=torch.bool), reduction="none")
    assert per_sample.shape == (2,)
    # the same positions as tokens [B*H*W, C]: each sample's value is the mean over its 25 positions
    tokens = talking_loss(ch, s.permute(0, 2, 3, 1).reshape(2, 25, 3), t.permute(0, 2, 3, 1).reshape(2, 25, 4),
                          torch.ones(2, 25, dtype=torch.bool), reduction="none")
    assert torch.allclose(per_sample, tokens.mean(1), rtol=1e-5)
    with pytest.raises(Exception, match="same positions"):
        talking_loss(ch, s, torch.randn(2, 4, 3, 3), torch.ones(2, dtype=torch.bool))


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(0.05, 20.0), seed=st.integers(0, 10_000))
def test_invariant_to_the_scale_of_both_features_and_to_rotating_the_message_space(scale, seed):
    g = torch.Generator().manual_seed(seed)
    ch = TalkingChannel(4, 6, 3).double()
    for layer in (ch.enc_s, ch.dec_s, ch.enc_t, ch.dec_t):
        with torch.no_grad():
            layer.bias.zero_()  # linear maps: the message scales with the features
    s, t = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(7, dtype=torch.bool)
    weights = TalkingWeights(interactive=0.0)
    base = talking_loss(ch, s, t, mask, weights=weights, reduction="none")
    scaled = talking_loss(ch, scale * s, scale * t, mask, weights=weights, reduction="none")
    assert torch.allclose(base, scaled, rtol=1e-9)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    rotated = TalkingChannel(4, 6, 3).double()
    with torch.no_grad():
        for enc in ("enc_s", "enc_t"):
            getattr(rotated, enc).weight.copy_(q @ getattr(ch, enc).weight)
            getattr(rotated, enc).bias.zero_()
        for dec in ("dec_s", "dec_t"):
            getattr(rotated, dec).weight.copy_(getattr(ch, dec).weight @ q.T)
            getattr(rotated, dec).bias.copy_(getattr(ch, dec).bias)
    assert torch.allclose(base, talking_loss(rotated, s, t, mask, weights=weights, reduction="none"), rtol=1e-9)


def test_gradients_match_finite_differences():
    """Where no stop-gradient is on the path: the student's logits (everything on), the student's feature
    through the agreement, and every channel weight without the answer (whose detached copy the
    student learns from would otherwise differ from a finite difference by design)."""
    torch.manual_seed(3)
    ch = TalkingChannel(3, 4, 2).double()
    head = nn.Linear(4, 5).double()
    t = torch.randn(6, 4, dtype=torch.float64)
    zt = head(t).detach()
    y = torch.tensor([0, 1, -100, 3, 4, 2])
    mask = torch.tensor([True, True, True, False, True, True])
    s = torch.randn(6, 3, dtype=torch.float64)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def f(s_, z_, weights=None):
        weights = weights or TalkingWeights(temperature=2.0)
        return talking_loss(ch, s_, t, mask, answer_fn=lambda x: run_frozen([head], x), student_logits=z_,
                            teacher_logits=zt, labels=y, weights=weights, reduction="sum")

    assert torch.autograd.gradcheck(lambda z_: f(s, z_), (z,))
    agreement = TalkingWeights(0.0, 1.0, 0.0, 0.0)
    assert torch.autograd.gradcheck(lambda s_: f(s_, z.detach(), agreement), (s.clone().requires_grad_(),))
    no_answer = TalkingWeights(1.0, 0.7, 1.3, 0.0)
    for name in ("enc_s", "dec_s", "enc_t", "dec_t"):
        weight = getattr(ch, name).weight
        grad = torch.autograd.grad(f(s, z.detach(), no_answer), weight)[0]
        for i, j in ((0, 0), (1, 1)):
            with torch.no_grad():
                weight[i, j] += 1e-6
                plus = f(s, z.detach(), no_answer).item()
                weight[i, j] -= 2e-6
                minus = f(s, z.detach(), no_answer).item()
                weight[i, j] += 1e-6
            assert grad[i, j].item() == pytest.approx((plus - minus) / 2e-6, rel=1e-5, abs=1e-8), name


def test_who_learns_from_what():
    torch.manual_seed(4)
    ch = TalkingChannel(3, 4, 2)
    teacher_head = nn.Linear(4, 5)  # requires_grad stays True: run_frozen must still leave it alone
    s = torch.randn(6, 3, requires_grad=True)
    t = torch.randn(6, 4)
    z = torch.randn(6, 5, requires_grad=True)
    mask = torch.ones(6, dtype=torch.bool)
    talking_loss(ch, s, t, mask, weights=TalkingWeights(1.0, 0.0, 0.0, 0.0)).backward()
    assert s.grad is None or not s.grad.any()  # reconstruction trains the encoders/decoders only, not the student
    ch.zero_grad(set_to_none=True)
    talking_loss(ch, s, t, mask, weights=TalkingWeights(0.0, 0.0, 0.0, 1.0),
                 answer_fn=lambda x: run_frozen([teacher_head], x), student_logits=z,
                 teacher_logits=teacher_head(t).detach(), labels=None).backward()
    assert teacher_head.weight.grad is None  # the teacher never learns
    assert s.grad is not None and z.grad is not None and ch.dec_t.weight.grad is not None
    assert ch.enc_t.weight.grad is None or not ch.enc_t.weight.grad.any()  # nothing from the answer reaches E_t


# -- as an objective term --------------------------------------------------------------------------------------

TALK = {"name": "talking", "weight": 1.0, "params": {"student_modules": ["head.3"], "teacher_modules": ["head.3"],
                                                     "message_dim": 4}}


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    data = Images(n)
    return {"inputs": data.x, "labels": data.labels}


def test_bind_makes_a_channel_per_pair_and_finds_the_rest_of_the_teacher():
    torch.manual_seed(0)
    student, teacher = Net(4), Net(8)
    terms = Objective([TALK]).bind(student, teacher)["features"]
    ch = terms.projectors["talking_0"]
    assert (ch.enc_s.in_features, ch.enc_t.in_features, ch.dec_t.out_features) == (8, 16, 16)
    assert terms.teacher_heads["talking_0"] == (teacher.head[4],)
    assert not any("head" in k and "projectors" not in k for k in terms.state_dict())  # the teacher is not saved
    teacher.eval()
    out = ClassificationTask().forward(student, teacher, _batch(), extras={"features": terms})
    assert out.extra_terms["talking"].item() > 0


def test_a_teacher_head_that_is_not_the_rest_of_the_teacher_is_refused_on_the_first_batch():
    torch.manual_seed(0)
    student, teacher = Net(4), Net(8)
    teacher.eval()
    body = {"name": "talking", "weight": 1.0, "params": {"student_modules": ["body.3"], "teacher_modules": ["body.3"]}}
    terms = Objective([body]).bind(student, teacher)  # body.3 is the last of `body`: auto finds nothing after it
    with pytest.raises(ConfigError, match="teacher_head"):
        ClassificationTask().forward(student, teacher, _batch(), extras=terms)
    explicit = {**body, "params": {**body["params"], "teacher_head": ["head"]}}
    extras = Objective([explicit]).bind(student, teacher)
    out = ClassificationTask().forward(student, teacher, _batch(), extras=extras)
    assert torch.isfinite(out.extra_terms["talking"])
    off = {**body, "params": {**body["params"], "interactive_weight": 0.0}}
    assert Objective([off]).bind(student, teacher)["features"].teacher_heads == {}


def test_talking_params_are_validated_when_the_config_is_read():
    with pytest.raises(ValueError, match="message_dim"):
        Objective([{"name": "talking", "weight": 1.0, "params": {"message_dim": 0}}])
    with pytest.raises(ValueError, match="talk_weight"):
        Objective([{"name": "talking", "weight": 1.0, "params": {"talk_weight": 1.0}}])


def test_training_lowers_the_talking_loss_trains_the_channel_and_leaves_the_teacher():
    torch.manual_seed(0)
    teacher, student = Net(8), Net(4)
    objective = Objective([{"name": "cross_entropy", "weight": 1.0}, TALK])
    distiller = Distiller(student, teacher, task=ClassificationTask(), objective=objective,
                          config=TrainConfig(max_steps=40, batch_size=8, lr=1e-2, progress=False, log_every=1),
                          train_data=Images(), eval_data=Images(16, seed=1))
    ch = distiller.extras["features"].projectors["talking_0"]
    before_ch = ch.dec_t.weight.detach().clone()
    before_t = [p.detach().clone() for p in teacher.parameters()]
    before = distiller.evaluate()["eval/loss/talking"]
    distiller.train()
    after = distiller.evaluate()["eval/loss/talking"]
    assert after < 0.7 * before, (before, after)
    assert not torch.equal(before_ch, ch.dec_t.weight)  # the channel joined the optimizer
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher.parameters()))


def test_on_a_language_model_the_answer_goes_through_the_lm_head():
    from kdforge.train import CausalLMTask

    from .test_taps import tiny_llama
    from .test_terms import _batch as lm_batch

    teacher, student = tiny_llama(layers=2), tiny_llama(layers=1, hidden=16, heads=2, kv=1, seed=3)
    teacher.requires_grad_(False).eval()
    term = {"name": "talking", "weight": 1.0, "params": {"layers": "last", "message_dim": 8}}
    extras = Objective([term]).bind(student, teacher)
    terms = extras["features"]
    assert terms.teacher_heads["talking_0"] == (teacher.lm_head,)
    batch = lm_batch([[3, 4, 5, 6], [7, 8]])
    out = CausalLMTask().forward(student, teacher, batch, extras=extras)
    value = out.extra_terms["talking"]
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert terms.projectors["talking_0"].enc_s.weight.grad is not None
    with pytest.raises(ConfigError, match="last hidden state"):
        Objective([{**term, "params": {"layers": [1], "message_dim": 8}}]).bind(student, teacher)


def test_llm_kd_recipe_trains_a_talking_term_from_yaml(tmp_path, capsys):
    """``kdforge run`` on an llm_kd config: the term validates, trains with the live teacher (the answer
    through its LM head) and its channel is checkpointed with the feature terms."""
    import json

    import yaml
    from safetensors.torch import load_file

    from kdforge.cli.main import main

    from .test_training import tiny_llm_kd_config

    cfg = tiny_llm_kd_config(tmp_path, [{"name": "kd+talking", "objective": [
        {"name": "forward_kl", "weight": 1.0},
        {"name": "talking", "weight": 1.0, "params": {"layers": "last", "message_dim": 8}}]}])
    path = tmp_path / "talking.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--dry-run"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--no-report"]) == 0, capsys.readouterr().err
    run = tmp_path / "run" / "kd-talking" / "seed-0"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [r["loss/talking"] for r in rows if r.get("split") == "train" and "loss/talking" in r]
    assert len(values) == 3 and all(v > 0 for v in values)
    extras = load_file(str(next((run / "checkpoints").glob("step-*")) / "extras.safetensors"))
    assert {"features.projectors.talking_0.enc_s.weight", "features.projectors.talking_0.dec_t.weight"} <= set(extras)
    assert not any("lm_head" in name for name in extras)  # the teacher's head is used, never saved


def test_fashion_mnist_kd_recipe_trains_a_talking_method_from_its_config(tmp_path):
    """The classifier recipes (fashion_mnist_kd / compare): a talking term with the online teacher, the
    answer through the rest of an MLP teacher found by ``teacher_head: auto``; the shipped config validates."""
    import json
    from pathlib import Path

    from kdforge.config import validate
    from kdforge.data.vision import write_synthetic_fashion_mnist
    from kdforge.recipes import load_recipe_file
    from kdforge.recipes.fashion_mnist import FashionMnistConfig, FashionMnistKD

    _, shipped = load_recipe_file(Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist_features.yaml")
    assert any(t.name == "talking" for m in shipped.methods for t in m.terms)
    data = write_synthetic_fashion_mnist(tmp_path / "fm", n_train=96, n_test=32)
    talk = {"name": "talking", "weight": 1.0, "params": {"student_modules": ["classifier.0"],
                                                         "teacher_modules": ["net.2"], "message_dim": 8}}
    config = validate(FashionMnistConfig, {
        "data": {"root": str(data), "labelled": 32, "transfer": 0},
        "teacher": {"arch": "mlp", "kwargs": {"hidden": [16]}, "epochs": 1, "batch_size": 32},
        "train": {"epochs": 2, "batch_size": 16},
        "seeds": [0],
        "methods": [{"name": "labels only", "role": "baseline", "terms": [{"name": "cross_entropy", "weight": 1.0}]},
                    {"name": "talking", "teacher": {"source": "online"},
                     "terms": [{"name": "cross_entropy", "weight": 1.0}, talk]}],
        "eval": {"latency_warmup": 1, "latency_repeats": 2},
    }, source="test")
    rows = {m["name"]: m for m in FashionMnistKD().run(config, tmp_path / "run")["models"]}
    assert 0.0 <= rows["student / talking"]["metrics"]["accuracy"] <= 1.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "students" / "talking" / "seed-0" / "metrics.jsonl")
              .read_text().splitlines()]
    values = [r["loss/talking"] for r in logged if "loss/talking" in r]
    assert values and all(v > 0 for v in values)
