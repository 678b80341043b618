"""MutualTeacher: peers trained in the same optimizer step as the student (online / mutual KD)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge.errors import CheckpointError
from kdforge.losses import cross_entropy, forward_kl
from kdforge.teachers.sources import MutualTeacher
from kdforge.train import ClassificationTask, Distiller

C = 5
DML = [{"name": "cross_entropy", "weight": 1.0}, {"name": "forward_kl", "weight": 1.0, "params": {"temperature": 1.0}}]


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return x, y


class _Set(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def _net(seed, hidden=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, C))


def test_one_step_updates_the_peer_by_its_loss_against_the_pre_update_student():
    x, y = _data(8)
    student, peer = _net(0), _net(1, 16)
    ref_peer = _net(1, 16)
    src = MutualTeacher(student, [peer], terms=DML, lr=0.1)
    task = ClassificationTask()
    batch = {"inputs": x, "labels": y}
    s_logits = student(x)  # the trainer's student forward (hooked)
    sig = src.signal(batch, task)
    assert torch.allclose(sig.logits, ref_peer(x).detach())  # the peer's logits before its update
    # the same update by hand: AdamW step on mean(CE + KL(student || peer))
    opt = torch.optim.AdamW(ref_peer.parameters(), lr=0.1, weight_decay=0.0)
    z = ref_peer(x)
    loss = cross_entropy(z, labels=y) + forward_kl(z, s_logits.detach(), temperature=1.0)
    loss.backward()
    opt.step()
    src.on_step_end(student, 1)
    for a, b in zip(peer.parameters(), ref_peer.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert src.steps == 1


def test_evaluation_forwards_train_nothing():
    x, y = _data(8)
    student, peer = _net(0), _net(1)
    before = [p.clone() for p in peer.parameters()]
    src = MutualTeacher(student, [peer], terms=DML, lr=0.1)
    with torch.no_grad():
        student(x)
        src.signal({"inputs": x, "labels": y}, ClassificationTask())
    src.on_step_end(student, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, peer.parameters())) and src.steps == 0


def test_a_cohort_signal_is_the_mean_probability_of_the_peers():
    x, y = _data(6)
    student, peers = _net(0), [_net(1), _net(2)]
    src = MutualTeacher(student, peers, terms=DML, lr=0.0)
    student(x)
    sig = src.signal({"inputs": x, "labels": y}, ClassificationTask())
    with torch.no_grad():
        mean = (peers[0](x).softmax(-1) + peers[1](x).softmax(-1)) / 2
    assert torch.allclose(sig.logits.exp(), mean, atol=1e-6)


def _distiller(out, steps, peers_seed=1):
    x, y = _data(40)
    student = _net(0)
    src = MutualTeacher(student, [_net(peers_seed, 16)], terms=DML, lr=0.05,
                        lr_schedule=lambda s: 1.0 / (1 + 0.1 * s))
    return Distiller(student, src, task=ClassificationTask(),
                     objective=[{"name": "forward_kl", "weight": 1.0}, {"name": "cross_entropy", "weight": 1.0}],
                     config={"max_steps": steps, "batch_size": 8, "lr": 0.05, "seed": 0, "progress": False,
                             "scheduler": "constant", "save_every": 3, "output_dir": str(out), "log_every": 1},
                     train_data=_Set(x, y))


def test_mutual_training_lowers_both_losses_and_resumes_bit_for_bit(tmp_path):
    x, y = _data(40)
    full = _distiller(tmp_path / "a", 8)
    s0, p0 = _net(0), _net(1, 16)
    full.train()
    src = full.teacher_source
    with torch.no_grad():
        assert cross_entropy(full.unwrapped_student(x), labels=y) < cross_entropy(s0(x), labels=y)
        assert cross_entropy(src.peers[0](x), labels=y) < cross_entropy(p0(x), labels=y)
    assert src.steps == 8
    _distiller(tmp_path / "b", 4).train()
    resumed = _distiller(tmp_path / "b", 8)
    resumed.train(resume=True)
    for a, b in zip(full.unwrapped_student.state_dict().values(), resumed.unwrapped_student.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(src.peers[0].state_dict().values(), resumed.teacher_source.peers[0].state_dict().values()):
        assert torch.equal(a, b)


def test_resuming_with_another_cohort_is_refused():
    student = _net(0)
    one = MutualTeacher(student, [_net(1)], terms=DML)
    two = MutualTeacher(student, [_net(1), _net(2)], terms=DML)
    with pytest.raises(CheckpointError, match="same peers"):
        two.load_state_dict(one.state_dict())
