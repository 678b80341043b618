"""EnsembleTeacher: the mixture of probabilities (exact for identical members and zero weights),
sparse merging by id, and each weighting rule (fixed, confidence, entropy, per-domain)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import CheckpointError, ConfigError, DataError, ShapeError
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers import CachedTeacher, EnsembleTeacher, OnlineTeacher, SelfTeacher, as_source
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource
from kdforge.teachers.sources.ensemble import mix_dense, mix_sparse

from ._standin_task import CausalLMTask
from .conftest import tiny_llama

TASK = CausalLMTask()


class Fixed(TeacherSource):
    """A source returning a given signal, counting its calls."""

    provides = frozenset({"dense"})
    scores_new_samples = True

    def __init__(self, signal: TeacherSignal) -> None:
        self._signal, self.calls, self.steps = signal, 0, []
        if signal.sparse is not None:
            self.provides = frozenset({"sparse"})

    def signal(self, batch, task, *, features=None):
        self.calls += 1
        return self._signal

    def on_step_end(self, student, step):
        self.steps.append(step)


def _batch(b: int = 3, t: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _dense(seed: int, shape=(3, 8, 50), scale: float = 1.0) -> TeacherSignal:
    return TeacherSignal(logits=torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale)


def _sparse(seed: int, k: int = 6, shape=(3, 8), vocab: int = 50) -> TeacherSignal:
    logits = torch.randn(*shape, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return TeacherSignal(sparse=SparseTeacher.from_logits(logits, k))


@pytest.mark.parametrize("weighting", ["fixed", "confidence", "entropy"])
def test_two_identical_dense_teachers_equal_one_exactly(weighting):
    model = tiny_llama()
    batch = _batch()
    one = OnlineTeacher(model).signal(batch, TASK)
    ens = EnsembleTeacher([OnlineTeacher(model), OnlineTeacher(model)], weighting=weighting)
    out = ens.signal(batch, TASK)
    assert out.kind == "dense" and out.logits.shape == (3, 8, 256)
    assert torch.equal(out.logits, torch.log_softmax(one.logits.float(), dim=-1))
    assert torch.equal(ens.last_weights, torch.full((2, 3), 0.5))


@pytest.mark.parametrize("weighting", ["fixed", "confidence", "entropy"])
def test_two_identical_sparse_teachers_equal_one_exactly(weighting):
    sig = _sparse(1)
    out = EnsembleTeacher([Fixed(sig), Fixed(sig)], weighting=weighting).signal(_batch(t=9), TASK)
    assert out.kind == "sparse"
    assert torch.equal(out.sparse.ids, sig.sparse.ids) and torch.equal(out.sparse.logprobs, sig.sparse.logprobs)
    assert out.sparse.vocab_size == 50


def test_identical_cached_teachers_equal_the_cache():
    g = torch.Generator().manual_seed(4)
    sparse = SparseTeacher.from_logits(torch.randn(2, 9, 40, generator=g) * 2, 5)
    batch = {"input_ids": torch.randint(0, 40, (2, 9), generator=g), "teacher_ids": sparse.ids,
             "teacher_logprobs": sparse.logprobs}
    one = CachedTeacher().signal(batch, TASK)
    out = EnsembleTeacher([CachedTeacher(), CachedTeacher()]).signal(batch, TASK)
    assert torch.equal(out.sparse.ids, one.sparse.ids) and torch.equal(out.sparse.logprobs, one.sparse.logprobs)


def test_fixed_weights_one_zero_equal_the_first_teacher_and_skip_the_second():
    a, b = Fixed(_dense(1)), Fixed(_dense(2))
    ens = EnsembleTeacher([a, b], weights=[1.0, 0.0])
    out = ens.signal(_batch(), TASK)
    assert torch.equal(out.logits, torch.log_softmax(_dense(1).logits, dim=-1))
    assert (a.calls, b.calls) == (1, 0)
    assert torch.equal(ens.last_weights, torch.tensor([[1.0] * 3, [0.0] * 3]))
    sa, sb = Fixed(_sparse(1)), Fixed(_sparse(2))
    out = EnsembleTeacher([sa, sb], weights=[1, 0]).signal(_batch(), TASK)
    assert torch.equal(out.sparse.ids, _sparse(1).sparse.ids) and sb.calls == 0


def test_dense_mixture_is_the_log_of_the_weighted_sum_of_softmaxes():
    a, b, c = _dense(1).logits, _dense(2).logits, _dense(3).logits * 4
    w = torch.tensor([[0.2, 0.5, 0.0], [0.3, 0.25, 1.0], [0.5, 0.25, 0.0]])  # [S, B], per sample
    out = mix_dense([a, b, c], w)
    ref = sum(w[s][:, None, None] * x.softmax(-1) for s, x in enumerate([a, b, c])).log()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, 8), rtol=0, atol=1e-6)
    assert torch.equal(out[2], torch.log_softmax(b[2], -1))  # one-hot sample weights are exact


def test_dense_mixture_is_stable_for_extreme_logits():
    a = torch.tensor([[[1000.0, 0.0, -1000.0]]])
    b = torch.tensor([[[-1000.0, 0.0, 1000.0]]])
    out = mix_dense([a, b], torch.tensor([0.5, 0.5]))
    assert torch.isfinite(out[..., [0, 2]]).all()
    torch.testing.assert_close(out[0, 0, [0, 2]], torch.full((2,), math.log(0.5)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 5.0), min_size=3, max_size=3).filter(lambda w: sum(w) > 1e-3),
       st.integers(0, 1000))
def test_sparse_merge_matches_the_dense_mixture_on_listed_ids(weights, seed):
    """Every merged entry is sum_s w_s p_s(i) over the members listing i (property test)."""
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(2, 4, 12, generator=g) * 2 for _ in range(3)]
    members = [SparseTeacher.from_logits(x, k) for x, k in zip(logits, (3, 4, 5), strict=True)]
    w = torch.tensor(weights) / sum(weights)
    out = mix_sparse(members, w, k=None)
    assert out.k == 12 and out.vocab_size == 12
    dense_known = sum(w[s] * m.to_dense_logprobs(fill=float("-inf")).exp() for s, m in enumerate(members))
    got = torch.zeros_like(dense_known).scatter_add(-1, out.ids, out.logprobs.exp())  # pads add exp(-inf)=0
    torch.testing.assert_close(got, dense_known, rtol=1e-5, atol=1e-6)
    finite = torch.isfinite(out.logprobs)
    assert (out.logprobs[..., :-1] >= out.logprobs[..., 1:]).all()  # sorted, padding last
    for row_ids, row_ok in zip(out.ids.reshape(-1, 12), finite.reshape(-1, 12), strict=True):
        assert len(set(row_ids[row_ok].tolist())) == int(row_ok.sum())  # each id once


def test_sparse_merge_by_hand_union_and_fixed_size():
    a = SparseTeacher(torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.3]]).log(), 10)
    b = SparseTeacher(torch.tensor([[2, 3]]), torch.tensor([[0.6, 0.2]]).log(), 10)
    w = torch.tensor([0.5, 0.5])
    union = mix_sparse([a, b], w)
    assert union.ids[0, :3].tolist() == [2, 1, 3] and torch.isneginf(union.logprobs[0, 3])
    torch.testing.assert_close(union.logprobs[0, :3].exp(), torch.tensor([0.45, 0.25, 0.10]))
    top2 = mix_sparse([a, b], w, k=2)
    assert top2.ids.tolist() == [[2, 1]]
    torch.testing.assert_close(top2.tail_mass(), torch.tensor([0.30]))  # id 3's 0.10 joins the tail


def test_sparse_k_option_and_dense_members_of_a_sparse_ensemble():
    dense, sparse = _dense(1), _sparse(2, k=4)
    ens = EnsembleTeacher([Fixed(dense), Fixed(sparse)], sparse_k="union")
    out = ens.signal(_batch(), TASK)
    assert out.kind == "sparse" and out.sparse.k == 8
    ref = mix_sparse([SparseTeacher.from_logits(dense.logits, 4), sparse.sparse], torch.tensor([0.5, 0.5]))
    assert torch.equal(out.sparse.ids, ref.ids) and torch.equal(out.sparse.logprobs, ref.logprobs)
    assert EnsembleTeacher([Fixed(dense), Fixed(sparse)], sparse_k=6).signal(_batch(), TASK).sparse.k == 6


def _peaked_and_flat():
    peaked = torch.zeros(3, 8, 50)
    peaked[..., 7] = 8.0  # p(7) ~ 0.98
    flat = torch.randn(3, 8, 50, generator=torch.Generator().manual_seed(0)) * 0.1
    return TeacherSignal(logits=flat), TeacherSignal(logits=peaked)


@pytest.mark.parametrize("weighting", ["confidence", "entropy"])
def test_confidence_and_entropy_weighting_prefer_the_confident_teacher(weighting):
    flat, peaked = _peaked_and_flat()
    ens = EnsembleTeacher([Fixed(flat), Fixed(peaked)], weighting=weighting)
    out = ens.signal(_batch(), TASK)
    w = ens.last_weights
    torch.testing.assert_close(w.sum(0), torch.ones(3))
    assert (w[1] > 0.95).all()
    assert (out.logits.argmax(-1) == 7).all()
    conf = torch.tensor([flat.logits[0].softmax(-1).amax(-1).mean(), peaked.logits[0].softmax(-1).amax(-1).mean()])
    if weighting == "confidence":  # w proportional to the mean max-probability
        torch.testing.assert_close(w[:, 0], conf / conf.sum(), rtol=1e-5, atol=1e-6)


def test_entropy_temperature_sharpens_or_flattens_the_weights():
    flat, peaked = _peaked_and_flat()
    weights = []
    for t in (0.01, 1.0, 1000.0):
        ens = EnsembleTeacher([Fixed(flat), Fixed(peaked)], weighting="entropy", temperature=t)
        ens.signal(_batch(), TASK)
        weights.append(float(ens.last_weights[1, 0]))
    assert weights[0] == pytest.approx(1.0) and weights[0] >= weights[1] > weights[2]
    assert weights[2] == pytest.approx(0.5, abs=0.01)


def test_statistics_ignore_masked_positions():
    flat, peaked = _peaked_and_flat()
    mixed = peaked.logits.clone()
    mixed[:, 4:] = flat.logits[:, 4:]  # confident only on the first half
    batch = _batch()
    batch["attention_mask"][:, 5:] = 0  # the stand-in maps it to loss positions [:, :-1]: 0..4 real
    ens = EnsembleTeacher([Fixed(TeacherSignal(logits=mixed)), Fixed(flat)], weighting="confidence")
    ens.signal(batch, TASK)
    p_mixed = mixed.softmax(-1).amax(-1)[:, :5].mean(-1)
    p_flat = flat.logits.softmax(-1).amax(-1)[:, :5].mean(-1)
    torch.testing.assert_close(ens.last_weights[0], p_mixed / (p_mixed + p_flat))


def test_per_domain_weights_follow_each_samples_domain():
    a, b, c = Fixed(_dense(1)), Fixed(_dense(2)), Fixed(_dense(3))
    ens = EnsembleTeacher([a, b, c], weighting="per_domain",
                          domain_weights={"math": [3, 1, 0], "code": [0, 0, 2]}, default_weights=[1, 1, 0])
    batch = dict(_batch(), domain=["math", "code", "prose"])
    out = ens.signal(batch, TASK)
    expected = torch.tensor([[0.75, 0.0, 0.5], [0.25, 0.0, 0.5], [0.0, 1.0, 0.0]])
    assert torch.equal(ens.last_weights, expected)
    torch.testing.assert_close(ens.last_weights.sum(0), torch.ones(3))
    torch.testing.assert_close(out.logits, mix_dense([_dense(s).logits for s in (1, 2, 3)], expected))
    # members with zero weight on the whole batch are not queried
    ens.signal(dict(_batch(), domain=["code", "code", "code"]), TASK)
    assert (a.calls, b.calls, c.calls) == (1, 1, 2)
    ids = EnsembleTeacher([a, b], weighting="per_domain", domain_weights={0: [1, 0], 1: [0, 1]})
    ids.signal(dict(_batch(), domain=torch.tensor([0, 1, 1])), TASK)
    assert ids.last_weights.tolist() == [[1, 0, 0], [0, 1, 1]]


def test_per_domain_errors_name_the_fix():
    ens = EnsembleTeacher([Fixed(_dense(1)), Fixed(_dense(2))], weighting="per_domain",
                          domain_weights={"math": [1, 0]})
    with pytest.raises(DataError, match="'domain'") as err:
        ens.signal(_batch(), TASK)
    assert "collator" in err.value.fix
    with pytest.raises(DataError, match="'prose' is not in"):
        ens.signal(dict(_batch(), domain=["math", "prose", "math"]), TASK)
    with pytest.raises(ConfigError, match="domain_weights"):
        EnsembleTeacher([Fixed(_dense(1))], weighting="per_domain")


def test_misuse_is_a_clear_error():
    with pytest.raises(ConfigError, match="weighting"):
        EnsembleTeacher([Fixed(_dense(1))], weighting="vote")
    with pytest.raises(ConfigError, match="2 finite non-negative"):
        EnsembleTeacher([Fixed(_dense(1)), Fixed(_dense(2))], weights=[1, -1])
    with pytest.raises(ConfigError, match="2 finite non-negative"):
        EnsembleTeacher([Fixed(_dense(1)), Fixed(_dense(2))], weights=[1])
    with pytest.raises(ConfigError, match="weights= is the fixed"):
        EnsembleTeacher([Fixed(_dense(1))], weighting="entropy", weights=[1])
    with pytest.raises(ConfigError, match="at least one"):
        EnsembleTeacher([])
    ens = EnsembleTeacher([Fixed(_dense(1)), Fixed(_dense(2, shape=(3, 8, 40)))])
    with pytest.raises(ShapeError, match="differ in shape"):
        ens.signal(_batch(), TASK)
    with pytest.raises(ConfigError, match="intermediate features"):
        ens.signal(_batch(), TASK, features=object())
    sampled = SparseTeacher(torch.zeros(3, 8, 2, dtype=torch.long), torch.zeros(3, 8, 2), 50, num_exact=1)
    with pytest.raises(ConfigError, match="sampled-tail"):
        EnsembleTeacher([Fixed(TeacherSignal(sparse=sampled)), Fixed(_sparse(1))]).signal(_batch(), TASK)


def test_contract_is_forwarded_to_every_member():
    model = tiny_llama()
    a, b = Fixed(_dense(1)), Fixed(_sparse(2))
    ens = EnsembleTeacher([a, b, OnlineTeacher(model), OnlineTeacher(model)])
    assert ens.provides == frozenset({"sparse"}) and ens.scores_new_samples
    assert ens.modules() == [model]  # shared modules listed once
    ens.on_step_end(model, 7)
    assert a.steps == [7] and b.steps == [7]
    assert EnsembleTeacher([OnlineTeacher(model), CachedTeacher()]).scores_new_samples is False
    assert EnsembleTeacher([OnlineTeacher(model)]).provides == frozenset({"dense"})


def test_state_dict_round_trips_through_the_members_and_a_checkpoint():
    import json

    from kdforge.train.checkpoint import state_dict_from_bytes, state_dict_to_bytes
    from kdforge.train.persistence import _split_state

    student = tiny_llama()
    ens = EnsembleTeacher([Fixed(_dense(1)), SelfTeacher(student, decay=0.0)])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    ens.on_step_end(student, 1)
    state = ens.state_dict()
    assert all(k.startswith("1.") for k in state) and state["1.updates"] == 1  # flat, prefixed by member
    tensors, meta = _split_state(state)
    restored = {**json.loads(json.dumps(meta)), **state_dict_from_bytes(state_dict_to_bytes(tensors))}
    fresh = EnsembleTeacher([Fixed(_dense(1)), SelfTeacher(tiny_llama(seed=5), decay=0.0)])
    fresh.load_state_dict(restored)
    mine, theirs = ens.sources[1].model.state_dict(), fresh.sources[1].model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(CheckpointError, match="for no member"):
        EnsembleTeacher([Fixed(_dense(1))]).load_state_dict(state)


def test_as_source_turns_a_list_into_an_equal_weight_ensemble():
    model = tiny_llama()
    ens = as_source([model, OnlineTeacher(model)])
    assert isinstance(ens, EnsembleTeacher) and ens.weighting == "fixed"
    assert torch.equal(ens.fixed, torch.tensor([0.5, 0.5]))
    assert isinstance(ens.sources[0], OnlineTeacher)


@pytest.mark.parametrize("policy", ["tail_bucket", "renormalize", "student_full"])
def test_mixtures_are_valid_loss_inputs_with_padding_entries(policy):
    from kdforge.losses import forward_kl, jsd

    student = torch.randn(3, 8, 50, requires_grad=True)
    union = EnsembleTeacher([Fixed(_sparse(1, k=4)), Fixed(_sparse(2, k=4))], sparse_k="union")
    sparse = union.signal(_batch(), TASK).sparse
    assert torch.isneginf(sparse.logprobs).any()  # overlapping ids leave -inf padding slots
    loss = jsd(student, sparse, sparse_policy=policy) + forward_kl(student, sparse, sparse_policy=policy)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    dense = EnsembleTeacher([Fixed(_dense(1)), Fixed(_dense(2))]).signal(_batch(), TASK).logits
    assert torch.isfinite(forward_kl(student, dense))


@pytest.mark.parametrize("weighting", ["fixed", "confidence", "entropy"])
def test_works_with_the_trainers_causal_lm_task(weighting):
    from kdforge.train.tasks import CausalLMTask as RealTask

    model = tiny_llama()
    batch = _batch()
    batch["attention_mask"][1, 6:] = 0
    one = OnlineTeacher(model).signal(batch, RealTask())
    out = EnsembleTeacher([OnlineTeacher(model), model], weighting=weighting).signal(batch, RealTask())
    assert torch.equal(out.logits, torch.log_softmax(one.logits.float(), dim=-1))
