"""PSKDTeacher: the student's previous-epoch predictions, stored compactly (PS-KD, Kim et al. 2021)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdforge.errors import DataError
from kdforge.losses import cross_entropy, forward_kl
from kdforge.teachers.sources import IndexedDataset, PSKDTeacher
from kdforge.teachers.sources.pskd import PredictionStore

from ._standin_task import ClassifierTask

C = 10


def _data(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] * 3).long().clamp(-4, 5) + 4
    return x, y


class _Set(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, C))


def _batch(x, y, idx):
    return {"inputs": x[idx], "labels": y[idx], "index": torch.as_tensor(idx)}


def test_first_sight_is_the_label_then_the_previous_epochs_prediction():
    x, y = _data(8)
    model = _model()
    src = PSKDTeacher(model, 8)
    task = ClassifierTask()
    idx = [3, 5, 0]
    b = _batch(x, y, idx)
    out1 = model(b["inputs"])  # training forward (grad on): recorded
    sig = src.signal(b, task)
    assert torch.equal(sig.logits.argmax(-1), y[idx])  # unseen: one-hot of the label
    assert torch.allclose(sig.logits.softmax(-1), nn.functional.one_hot(y[idx], C).float())
    with torch.no_grad():  # a forward without grad (evaluation) records nothing ...
        model(b["inputs"] + 100.0)
    model(b["inputs"])  # ... the next training forward does
    sig2 = src.signal(b, task)
    assert torch.allclose(sig2.logits, torch.log_softmax(out1.detach(), -1))  # what epoch 1 predicted
    assert src.recorded == 2


def test_topk_store_in_memory_and_on_disk_agree(tmp_path):
    x, y = _data(8)
    model = _model()
    task = ClassifierTask()
    mem, disk = PSKDTeacher(model, 8, k=3), PSKDTeacher(model, 8, k=3, path=tmp_path / "store")
    b = _batch(x, y, [1, 2, 7])
    logits = model(b["inputs"])
    mem._captured = disk._captured = logits.detach()  # both hooks saw the same forward
    first = mem.signal(b, task)
    disk.signal(b, task)
    assert first.sparse is not None and first.sparse.ids.shape == (3, 3)
    # unseen: the label with all mass, the other slots zero-mass padding
    assert torch.equal(first.sparse.ids[:, 0], y[[1, 2, 7]])
    assert torch.isinf(first.sparse.logprobs[:, 1:]).all()
    mem._captured = disk._captured = logits.detach()
    s_mem, s_disk = mem.signal(b, task).sparse, disk.signal(b, task).sparse
    top = torch.log_softmax(logits.detach(), -1).topk(3, -1)
    assert torch.equal(s_mem.ids, top.indices) and torch.allclose(s_mem.logprobs, top.values)
    assert torch.equal(s_disk.ids, s_mem.ids) and torch.equal(s_disk.logprobs, s_mem.logprobs)
    assert (tmp_path / "store" / "ids.npy").is_file()


def test_store_state_roundtrip_gives_the_same_reads():
    store = PredictionStore(5, k=2)
    store.write(torch.tensor([0, 4]), torch.log_softmax(torch.randn(2, C), -1))
    other = PredictionStore(5, k=2)
    other.load_state_dict(store.state_dict())
    for a, b in zip(store.read(torch.tensor([4, 0, 1])), other.read(torch.tensor([4, 0, 1]))):
        assert torch.equal(a, b)
    assert store.read(torch.tensor([1]))[2].tolist() == [False]


def test_missing_index_is_a_data_error_with_the_fix():
    x, y = _data(4)
    model = _model()
    src = PSKDTeacher(model, 4)
    model(x)
    with pytest.raises(DataError, match="IndexedDataset"):
        src.signal({"inputs": x, "labels": y}, ClassifierTask())


def test_the_two_terms_equal_the_soft_target_cross_entropy_up_to_the_teachers_entropy():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(7, C, generator=g, requires_grad=True), torch.randn(7, C, generator=g)
    y = torch.randint(0, C, (7,), generator=g)
    a = 0.3
    ours = (1 - a) * cross_entropy(s, labels=y, reduction="sum") + a * forward_kl(s, t, reduction="sum")
    target = (1 - a) * nn.functional.one_hot(y, C).float() + a * t.softmax(-1)
    soft_ce = -(target * s.log_softmax(-1)).sum()
    entropy = -(t.softmax(-1) * t.log_softmax(-1)).sum()
    assert torch.allclose(ours, soft_ce - a * entropy, atol=1e-5)
    g1 = torch.autograd.grad(ours, s)[0]
    g2 = torch.autograd.grad(soft_ce, s)[0]
    assert torch.allclose(g1, g2, atol=1e-6)  # same gradient: PS-KD's update


def _train(objective, teacher_fn, steps=12, seed=0):
    from kdforge.train import ClassificationTask, Distiller

    x, y = _data(48)
    model = _model(seed)
    teacher = teacher_fn(model) if teacher_fn else None
    data = IndexedDataset(_Set(x, y))
    d = Distiller(model, teacher, task=ClassificationTask(), objective=objective,
                  config={"max_steps": steps, "batch_size": 16, "lr": 0.05, "seed": seed, "progress": False,
                          "log_every": 1},
                  train_data=data)
    state = d.train()
    return d.unwrapped_student, state


def test_pskd_at_alpha_zero_is_cross_entropy_bit_for_bit():
    ce_only, _ = _train([{"name": "cross_entropy", "weight": 1.0}], None)
    pskd, _ = _train([{"name": "cross_entropy", "weight": 1.0},
                      {"name": "forward_kl", "weight": 0.0, "params": {"temperature": 1.0}}],
                     lambda m: PSKDTeacher(m, 48))
    for a, b in zip(ce_only.state_dict().values(), pskd.state_dict().values()):
        assert torch.equal(a, b)


def test_pskd_trains_end_to_end_and_its_kd_term_follows_the_previous_epoch():
    objective = [{"name": "cross_entropy", "weight": {"schedule": "linear", "start": 1.0, "end": 0.3}},
                 {"name": "forward_kl", "weight": {"schedule": "linear", "start": 0.0, "end": 0.7},
                  "params": {"temperature": 1.0}}]
    holder = {}

    def make(m):
        holder["src"] = PSKDTeacher(m, 48)
        return holder["src"]

    model, state = _train(objective, make, steps=15)
    assert holder["src"].recorded == 15 and bool(holder["src"].store._seen.all())
    x, y = _data(48)
    init = _model(0)
    with torch.no_grad():
        before = cross_entropy(init(x), labels=y)
        after = cross_entropy(model(x), labels=y)
    assert after < before
    # epoch 1 (steps 1-3) has no previous prediction: the KD term is the CE against the label
    assert state.last_logs["loss/forward_kl"] > 0


def test_resume_through_the_distiller_is_bit_exact(tmp_path):
    from kdforge.train import ClassificationTask, Distiller

    x, y = _data(48)
    objective = [{"name": "cross_entropy", "weight": 0.5},
                 {"name": "forward_kl", "weight": 0.5, "params": {"temperature": 1.0}}]

    def run(out, steps, resume, model=None):
        model = model if model is not None else _model(0)
        d = Distiller(model, PSKDTeacher(model, 48), task=ClassificationTask(), objective=objective,
                      config={"max_steps": steps, "batch_size": 16, "lr": 0.05, "seed": 0, "progress": False,
                              "save_every": 4, "output_dir": str(out), "scheduler": "constant"},
                      train_data=IndexedDataset(_Set(x, y)))
        d.train(resume=resume)
        return d

    full = run(tmp_path / "a", 9, False)
    run(tmp_path / "b", 4, False)
    resumed = run(tmp_path / "b", 9, True)
    for a, b in zip(full.unwrapped_student.state_dict().values(), resumed.unwrapped_student.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(full.teacher_source.store._logprobs, resumed.teacher_source.store._logprobs)


def test_a_hooked_student_still_deep_copies():
    model = _model()
    PSKDTeacher(model, 4)
    copy.deepcopy(model)  # a hooked student still deep-copies (born-again / EMA copies it)
