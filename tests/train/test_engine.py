"""The engine's contracts: one teacher decision, signals from every source reach the same loss,
validation once, chunked by default where it applies, an open step, transforms, samplers,
callbacks with a context, a per-step finiteness check."""

import pytest
import torch

from kdforge.errors import NonFiniteError, VocabMismatchError
from kdforge.losses import SparseTeacher, forward_kl
from kdforge.teachers import OnlineTeacher
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources import CachedTeacher, TeacherSource, as_source
from kdforge.teachers.sources.cached import BatchLogitsTeacher
from kdforge.teachers.vocab import align_signal
from kdforge.train import (
    Callback,
    CausalLMTask,
    ClassificationTask,
    Distiller,
    EpochSampler,
    LossTerm,
    Objective,
    TrainConfig,
)
from kdforge.train.tasks import attach_teacher, pick_source

from ._tiny import MLP, ClassDataset, TokenDataset, pad_collate, tiny_llama


def _lm_batch(n=4, seed=3):
    collate = pad_collate()
    data = TokenDataset(n=n, seed=seed)
    return collate([data[i] for i in range(n)])


def _cfg(**kw):
    return TrainConfig(**{"max_steps": 2, "batch_size": 4, "progress": False, "log_every": 1, **kw})


# -- sources and signals ---------------------------------------------------------------------------
def test_as_source_is_the_one_place_that_wraps_what_the_user_passes():
    model = tiny_llama(1)
    assert as_source(None) is None
    wrapped = as_source(model)
    assert isinstance(wrapped, OnlineTeacher) and wrapped.model is model
    online = OnlineTeacher(model)
    assert as_source(online) is online
    assert isinstance(as_source("cache"), CachedTeacher)


def test_a_batch_with_cached_keys_is_read_from_the_cache_even_with_a_live_teacher():
    task, batch = CausalLMTask(), _lm_batch()
    online = OnlineTeacher(tiny_llama(1))
    assert pick_source(online, task, batch) is online
    cached = {**batch, "teacher_ids": torch.zeros(4, batch["input_ids"].shape[1], 2, dtype=torch.long),
              "teacher_logprobs": torch.zeros(4, batch["input_ids"].shape[1], 2)}
    assert isinstance(pick_source(online, task, cached), CachedTeacher)


def test_online_cached_and_precomputed_signals_reach_the_same_loss():
    """The same teacher distribution from three sources gives the same forward KL."""
    teacher, student, task = tiny_llama(1, head_scale=3.0), tiny_llama(2), CausalLMTask()
    batch = _lm_batch()
    online = attach_teacher(task, student, OnlineTeacher(teacher), batch)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits.float(), -1)
    vocab = logits.shape[-1]
    full_topk = {**batch, "teacher_ids": torch.arange(vocab).expand(*logits.shape[:2], vocab).contiguous(),
                 "teacher_logprobs": logprobs}
    cached = attach_teacher(task, student, CachedTeacher(), full_topk)
    precomputed = attach_teacher(task, student, BatchLogitsTeacher("t"), {**batch, "t": logits})
    assert online.signal.kind == "dense" and cached.signal.kind == "sparse"
    assert cached.teacher.vocab_size == vocab  # the alignment gave the cache the student's vocabulary
    values = [forward_kl(o.student_logits, o.teacher, mask=o.mask, reduction="sum").item()
              for o in (online, cached, precomputed)]
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert values[0] == values[2]


def test_the_vocabulary_policy_is_explicit():
    signal = TeacherSignal(logits=torch.randn(2, 3, 10))
    kw = {"positions": (2, 3), "device": torch.device("cpu"), "dtype": torch.float32}
    with pytest.raises(VocabMismatchError, match="shared_prefix"):
        align_signal(signal, vocab_size=8, **kw)
    aligned, student_slice = align_signal(signal, vocab_size=8, policy="shared_prefix", **kw)
    assert aligned.logits.shape[-1] == 8 and student_slice is None
    aligned, student_slice = align_signal(TeacherSignal(logits=torch.randn(2, 3, 6)), vocab_size=8,
                                          policy="shared_prefix", **kw)
    assert aligned.logits.shape[-1] == 6 and student_slice == 6
    sparse = TeacherSignal(sparse=SparseTeacher(torch.tensor([[[9]]]), torch.zeros(1, 1, 1), 0))
    with pytest.raises(VocabMismatchError, match="outside the student's vocabulary"):
        align_signal(sparse, vocab_size=8, positions=(1, 1), device=torch.device("cpu"), dtype=torch.float32)


def test_shared_prefix_trains_a_student_whose_embeddings_are_padded():
    teacher, student = tiny_llama(1, vocab=64), tiny_llama(2, vocab=72)  # student padded by 8 rows
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("forward_kl", 1.0)], config=_cfg(), train_data=TokenDataset(n=8),
                  vocab_policy="shared_prefix")
    assert d.train().step == 2
    with pytest.raises(VocabMismatchError):
        Distiller(tiny_llama(2, vocab=72), tiny_llama(1), task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("forward_kl", 1.0)], config=_cfg(), train_data=TokenDataset(n=8)).train()


# -- chunked by default ----------------------------------------------------------------------------------
def test_auto_chunking_applies_to_a_live_teacher_and_to_a_cache_where_a_closed_form_exists():
    task = CausalLMTask()
    online, cached = OnlineTeacher(tiny_llama(1)), CachedTeacher()
    assert Objective([LossTerm("forward_kl", 1.0), LossTerm("cross_entropy", 0.5)]).use_chunked(task, online)
    assert Objective([LossTerm("forward_kl", 1.0)]).use_chunked(task, cached)  # sparse closed form (T = 1)
    assert not Objective([LossTerm("forward_kl", 1.0, {"temperature": 2.0})]).use_chunked(task, cached)
    assert not Objective([LossTerm("adaptive_kl", 1.0)]).use_chunked(task, online)  # no closed form
    assert not Objective([LossTerm("forward_kl", 1.0)]).use_chunked(ClassificationTask(), online)
    assert not Objective([LossTerm("forward_kl", 1.0)], chunked=False).use_chunked(task, online)


def test_the_default_objective_trains_chunked_and_matches_the_plain_path():
    def run(chunked):
        student = tiny_llama(2)
        seen = []
        d = Distiller(student, tiny_llama(1, head_scale=3.0), task=CausalLMTask(), collate_fn=pad_collate(),
                      objective=Objective([LossTerm("forward_kl", 0.8), LossTerm("cross_entropy", 0.2)],
                                          chunked=chunked),
                      config=_cfg(max_steps=1), train_data=TokenDataset(n=8))
        real = d.task_output
        d.task_output = lambda batch, **kw: seen.append(real(batch, **kw)) or seen[-1]
        logs = d.train().last_logs
        return logs, seen[0].student_hidden is not None

    auto_logs, auto_chunked = run("auto")
    plain_logs, plain_chunked = run(False)
    assert auto_chunked and not plain_chunked
    assert auto_logs["loss"] == pytest.approx(plain_logs["loss"], rel=1e-5)


# -- the hot path -------------------------------------------------------------------------------------------
def test_inputs_are_validated_on_the_first_batch_and_when_the_layout_grows(monkeypatch):
    calls = []
    real = CausalLMTask.check_inputs
    monkeypatch.setattr(CausalLMTask, "check_inputs", lambda self, m, b, who: calls.append(
        (who, tuple(b["input_ids"].shape))) or real(self, m, b, who))
    data = TokenDataset(n=24, min_len=6, max_len=6)  # every batch the same shape
    Distiller(tiny_llama(2), tiny_llama(1), task=CausalLMTask(), collate_fn=pad_collate(),
              objective=[LossTerm("forward_kl", 1.0)], config=_cfg(max_steps=4, batch_size=4),
              train_data=data).train()
    assert sorted({who for who, _ in calls}) == ["student", "teacher"]
    assert len(calls) == 2  # once each, on the first batch of 4 steps


def test_a_non_finite_loss_stops_before_the_update_and_names_the_term():
    class NaNTeacher(TeacherSource):
        provides = frozenset({"dense"})

        def signal(self, batch, task, *, features=None):
            return TeacherSignal(logits=torch.full((batch["inputs"].shape[0], 4), float("nan")))

    student = MLP()
    before = [p.detach().clone() for p in student.parameters()]
    d = Distiller(student, NaNTeacher(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=_cfg(max_steps=1, batch_size=8), train_data=ClassDataset(n=16))
    with pytest.raises(NonFiniteError, match="forward_kl"):
        d.train()
    assert all(torch.equal(a, b) for a, b in zip(before, d.unwrapped_student.parameters()))


# -- an open step ------------------------------------------------------------------------------------------------
def test_a_regime_overrides_compute_loss_without_a_new_trainer():
    class HalfLoss(Distiller):
        def compute_loss(self, batch, normalizer):
            value = super().compute_loss(batch, normalizer)
            value.total = value.total * 0.5
            return value

    def loss_of(cls):
        torch.manual_seed(0)
        d = cls(MLP(), MLP(scale=2.0), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                config=_cfg(max_steps=1, batch_size=8), train_data=ClassDataset(n=16))
        return d.train().last_logs["loss"]

    assert loss_of(HalfLoss) == pytest.approx(0.5 * loss_of(Distiller))


def test_batch_transforms_run_in_order_on_every_micro_batch():
    seen = []

    def tag(name):
        def transform(batch, ctx):
            seen.append((name, ctx.step, ctx.micro))
            return batch
        return transform

    Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
              config=_cfg(max_steps=2, batch_size=4, grad_accum_steps=2), train_data=ClassDataset(n=16),
              transforms=[tag("a"), tag("b")]).train()
    assert seen == [("a", 0, 0), ("b", 0, 0), ("a", 0, 1), ("b", 0, 1),
                    ("a", 1, 0), ("b", 1, 0), ("a", 1, 1), ("b", 1, 1)]


class _CountingSampler(EpochSampler):
    """A sampler with state: how many epochs it has started (checkpointed and restored)."""

    def __init__(self, n):
        super().__init__(n, seed=0, shuffle=True)
        self.epochs_started = 0

    def set_epoch(self, epoch):
        self.epochs_started += 1
        super().set_epoch(epoch)

    def state_dict(self):
        return {"epochs_started": self.epochs_started}

    def load_state_dict(self, state):
        self.epochs_started = state["epochs_started"]


def test_a_custom_sampler_is_used_and_its_state_survives_a_resume(tmp_path):
    def make():
        sampler = _CountingSampler(16)
        d = Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                      config=_cfg(max_steps=3, batch_size=8, save_every=2, output_dir=str(tmp_path)),
                      train_data=ClassDataset(n=16), sampler=sampler)
        return d, sampler

    d, sampler = make()
    d.train()
    assert d.sampler is sampler and sampler.epochs_started >= 2
    saved = sampler.epochs_started
    d2, sampler2 = make()
    d2._resume(True)
    assert sampler2.epochs_started == saved


def test_callbacks_see_the_trainer_through_a_context():
    seen = {}

    class Peek(Callback):
        def on_train_begin(self, state):
            seen["objective"] = self.context.objective
            seen["source"] = self.context.teacher_source
            seen["state"] = self.context.state is state

    teacher = MLP()
    d = Distiller(MLP(), teacher, task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=_cfg(max_steps=1, batch_size=8), train_data=ClassDataset(n=16), callbacks=[Peek()])
    d.train()
    assert seen["objective"] is d.objective and seen["state"]
    assert isinstance(seen["source"], OnlineTeacher) and seen["source"].model is teacher


def test_a_task_that_overrides_count_sets_the_normaliser():
    class DoubleCount(ClassificationTask):
        def count(self, batch):
            return 2 * super().count(batch)

    def loss_of(task):
        torch.manual_seed(0)
        d = Distiller(MLP(), MLP(scale=2.0), task=task, objective=[LossTerm("forward_kl", 1.0)],
                      config=_cfg(max_steps=1, batch_size=8), train_data=ClassDataset(n=16))
        return d.train().last_logs["loss"]

    assert loss_of(DoubleCount()) == pytest.approx(0.5 * loss_of(ClassificationTask()))
