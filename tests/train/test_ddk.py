"""DDK domain reweighting: the update's definition and bounds, the sampler, training and resume."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from kdforge.errors import CheckpointError, ConfigError
from kdforge.train import Callback, ClassificationTask, Distiller, LossTerm, TrainConfig
from kdforge.train.ddk import DDKSampler, ddk_update

from ._tiny import MLP


def test_update_by_hand():
    # d = [2, 1]; psi ∝ 0.5 * [e^2, e^1] -> [e/(e+1), 1/(e+1)]; w' = 0.5 * psi + 0.25
    got = ddk_update([0.5, 0.5], [2.0, 1.0], [1.0, 1.0], alpha=0.5)
    e = math.e
    assert got == pytest.approx([0.5 * e / (e + 1) + 0.25, 0.5 / (e + 1) + 0.25], abs=1e-12)
    # difference discrepancy: d = l_S - l_T
    assert ddk_update([0.5, 0.5], [3.0, 2.5], [2.0, 1.5], discrepancy="difference") == pytest.approx([0.5, 0.5])


def test_equal_gaps_keep_uniform_and_pull_toward_it():
    assert ddk_update([0.25] * 4, [2.0] * 4, [1.0] * 4) == [0.25] * 4
    w = [0.7, 0.2, 0.1]
    assert ddk_update(w, [1.0] * 3, [1.0] * 3, alpha=0.5) == pytest.approx([0.5 * x + 0.5 / 3 for x in w])


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="alpha"):
        ddk_update([1.0], [1.0], [1.0], alpha=1.5)
    with pytest.raises(ConfigError, match="one weight"):
        ddk_update([0.5, 0.5], [1.0], [1.0, 1.0])


_dist = st.lists(st.floats(0.01, 1.0), min_size=2, max_size=6)


@settings(max_examples=80, deadline=None)
@given(_dist, st.data(), st.floats(0.0, 1.0))
def test_update_invariants(raw, data, alpha):
    n = len(raw)
    w = np.array(raw) / sum(raw)
    s = np.array(data.draw(st.lists(st.floats(0.1, 8.0), min_size=n, max_size=n)))
    t = np.array(data.draw(st.lists(st.floats(0.1, 8.0), min_size=n, max_size=n)))
    new = np.array(ddk_update(w.tolist(), s.tolist(), t.tolist(), alpha=alpha))
    assert new.sum() == pytest.approx(1.0) and np.all(new >= (1 - alpha) / n - 1e-12)
    d = s / t
    neutral = alpha * w + (1 - alpha) / n  # the update under equal gaps
    # smooth: the gaps move at most alpha * tanh(Δ/2) of the mass away from the neutral update
    assert 0.5 * np.abs(new - neutral).sum() <= alpha * math.tanh((d.max() - d.min()) / 2) + 1e-9
    # toward the larger gap: the domain with the largest discrepancy never loses against neutral
    assert new[int(d.argmax())] >= neutral[int(d.argmax())] - 1e-12


# -- the sampler -----------------------------------------------------------------------------------

def test_draws_follow_the_weights_and_resume_mid_epoch():
    sampler = DDKSampler(["a"] * 30 + ["b"] * 10, {"a": [0], "b": [0]}, epoch_size=4000, seed=3,
                         initial_weights={"a": 0.2, "b": 0.8})
    order = list(sampler)
    share_b = np.mean([i >= 30 for i in order])
    assert abs(share_b - 0.8) < 0.03
    sampler.set_start(1234)
    assert list(sampler) == order[1234:]
    sampler.set_epoch(1)
    assert list(sampler)[:50] != order[1234:1284]


def test_sampler_state_roundtrip_and_domain_check():
    s = DDKSampler(["x", "y"], {"x": [0], "y": [0]})
    s.update([2.0, 1.0], [1.0, 1.0], step=5)
    t = DDKSampler(["x", "y"], {"x": [0], "y": [0]})
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.weights == s.weights and t.history == s.history
    with pytest.raises(CheckpointError, match="domains"):
        DDKSampler(["x", "z"], {"x": [0], "z": [0]}).load_state_dict(s.state_dict())
    with pytest.raises(ConfigError, match="held-out"):
        DDKSampler(["x", "y"], {"x": [0]})
    assert DDKSampler(["x", "y"], {"x": [0], "y": [0]}, teacher_loss={"y": 2.0, "x": 1.0}).teacher_loss == [1.0, 2.0]


def test_from_yaml_config():
    import yaml

    block = yaml.safe_load("ddk: {update_every: 3, alpha: 0.25, initial_weights: {x: 3, y: 1}}")["ddk"]
    s = DDKSampler.from_config(block, ["x", "y"], {"x": [0], "y": [0]}, seed=2)
    assert (s.update_every, s.alpha, s.weights, s.seed) == (3, 0.25, [0.75, 0.25], 2)
    with pytest.raises(ConfigError, match="alpah"):
        DDKSampler.from_config({"alpah": 0.5}, ["x"], {"x": [0]})


# -- training --------------------------------------------------------------------------------------

class Rows(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def _domain_inputs(n, domain, gen):
    x = torch.zeros(n, 8)
    cols = slice(0, 4) if domain == "A" else slice(4, 8)
    x[:, cols] = torch.randn(n, 4, generator=gen) * 2
    return x


def _setup(out_dir, *, same_domains=False, max_steps=8, callbacks=(), save_every=None):
    """Teacher: an MLP; labels are its argmax. Student: the teacher blind to features 4..7, so it
    matches the teacher on domain A (features 0..3) and lags it on domain B."""
    torch.manual_seed(11)
    teacher = MLP(scale=3.0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.net[0].weight[:, 4:] = 0
    gen = torch.Generator().manual_seed(5)
    parts, domains, held = [], [], {}
    for dom in ("A", "B"):
        src = "A" if same_domains else dom
        x = _domain_inputs(40, src, gen)
        hx = _domain_inputs(16, src, gen)
        with torch.no_grad():
            parts.append((x, teacher(x).argmax(-1)))
            held[dom] = Rows(hx, teacher(hx).argmax(-1))
        domains += [dom] * 40
    if same_domains:  # B is an exact copy of A: equal gaps
        parts[1], held["B"] = parts[0], held["A"]
    train = Rows(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    ddk = DDKSampler(domains, held, update_every=2, alpha=0.5, seed=7)
    cfg = TrainConfig(max_steps=max_steps, batch_size=8, lr=1e-2, progress=False, log_every=1, seed=7,
                      output_dir=str(out_dir), save_every=save_every, keep_last=3)
    d = Distiller(student, teacher, task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)], config=cfg,
                  train_data=train, sampler=ddk, callbacks=[*callbacks, ddk.callback])
    return d, ddk


def test_weights_move_toward_the_larger_gap_smoothly_and_are_logged(tmp_path):
    d, ddk = _setup(tmp_path)
    d.train()
    hist = ddk.history
    assert [h["step"] for h in hist] == [0, 2, 4, 6, 8]
    first = hist[1]
    gap = [s / t for s, t in zip(first["student_loss"], first["teacher_loss"])]
    assert gap[1] > gap[0]  # the student lags on B
    w_b = [h["weights"][1] for h in hist]
    assert w_b[1] > 0.5 and w_b[-1] > 0.5
    for prev, h in zip(hist, hist[1:]):  # bounded change per update (module docstring's bound)
        d_ = np.array(h["student_loss"]) / np.array(h["teacher_loss"])
        neutral = 0.5 * np.array(prev["weights"]) + 0.25
        assert 0.5 * np.abs(np.array(h["weights"]) - neutral).sum() <= 0.5 * math.tanh(np.ptp(d_) / 2) + 1e-9
    logs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["ddk/weight/B"] == pytest.approx(w_b[-1])
    assert json.loads((tmp_path / "ddk_weights.json").read_text())["history"] == json.loads(json.dumps(hist))
    assert (tmp_path / "ddk_weights.png").stat().st_size > 0


def test_equal_gaps_stay_uniform(tmp_path):
    d, ddk = _setup(tmp_path, same_domains=True, max_steps=4)
    d.train()
    assert all(h["weights"] == [0.5, 0.5] for h in ddk.history)


class Crash(RuntimeError):
    pass


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, logs):
        if state.step == self.step:
            raise Crash


def test_resume_is_bit_exact(tmp_path):
    ref, ref_ddk = _setup(tmp_path / "ref", save_every=3)
    ref.train()
    crashed, _ = _setup(tmp_path / "run", save_every=3, callbacks=[CrashAt(8)])
    with pytest.raises(Crash):
        crashed.train()
    resumed, ddk = _setup(tmp_path / "run", save_every=3)
    resumed.train(resume=True)  # from step-6: after the update at step 6
    assert ddk.history == ref_ddk.history
    for (name, a), (_, b) in zip(ref.unwrapped_student.state_dict().items(),
                                 resumed.unwrapped_student.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_callback_needs_its_sampler(tmp_path):
    d, ddk = _setup(tmp_path)
    other = DDKSampler(["A", "B"], {"A": [0], "B": [0]})
    d.callbacks.insert(0, other.callback)
    other.callback.context = d.context
    with pytest.raises(ConfigError, match="same DDKSampler"):
        d.train()
