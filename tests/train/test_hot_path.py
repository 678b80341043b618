"""The trainer's hot path: the first micro-batch of a batch layout is validated (errors with
kdforge's messages), later ones of the same layout run the losses with no host reads."""

from __future__ import annotations

import pytest
import torch
from tests.losses._host_reads import counted_host_reads

from kdforge.errors import ShapeError
from kdforge.losses import value_checks
from kdforge.teachers.sources import CachedTeacher
from kdforge.train import CausalLMTask, Distiller, LossTerm, Objective, TrainConfig

from ._tiny import TokenDataset, pad_collate, tiny_llama


def _batch(n=4, seed=3):
    data = TokenDataset(n=n, seed=seed)
    return pad_collate()([data[i] for i in range(n)])


def _distiller(chunked, teacher=None):
    objective = Objective([LossTerm("forward_kl", 0.8, {"temperature": 2.0}), LossTerm("cross_entropy", 0.2)],
                          chunked=chunked)
    return Distiller(tiny_llama(2), teacher if teacher is not None else tiny_llama(1, head_scale=3.0),
                     task=CausalLMTask(), collate_fn=pad_collate(), objective=objective,
                     config=TrainConfig(max_steps=2, batch_size=4, progress=False), train_data=TokenDataset(n=8))


def _cached(batch, k=5):
    """The batch with a top-k teacher cache (the teacher's log-probs at each position)."""
    teacher = tiny_llama(1, head_scale=3.0)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs, ids = torch.log_softmax(logits, -1).topk(k, dim=-1)
    return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}


def _loss_reads(d, batch):
    """Host reads inside the objective for one micro-batch (the student's forward excluded)."""
    out = d.task_output(batch)
    with counted_host_reads() as reads, value_checks(d._value_checks):
        value = d.objective(out, 40, values={}, check_finite=False)
    value.total.backward()
    return sum(reads.values()), value


@pytest.mark.parametrize("case", ["plain live teacher", "chunked live teacher", "top-k cache"])
def test_only_the_first_micro_batch_of_a_layout_reads_values(case):
    batch = _batch()
    if case == "top-k cache":
        d, batch = _distiller(False, CachedTeacher()), _cached(batch)
    else:
        d = _distiller(case.startswith("chunked"))
    first, v1 = _loss_reads(d, batch)
    second, v2 = _loss_reads(d, batch)
    assert first > 0 and d._value_checks is False
    assert second == 0
    assert torch.allclose(v1.total, v2.total, rtol=1e-6, atol=0)
    longer = _batch(n=4, seed=11)  # 12 tokens instead of 8: a grown batch is validated again
    longer = _cached(longer) if case == "top-k cache" else longer
    assert longer["input_ids"].shape[1] > batch["input_ids"].shape[1]
    assert _loss_reads(d, longer)[0] > 0 and _loss_reads(d, longer)[0] == 0


def test_bad_labels_in_the_first_batch_raise_kdforge_s_error():
    batch = _batch()
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] != -100, 999)
    d = _distiller(False)
    with pytest.raises(ShapeError, match="labels"):
        d.compute_loss(batch, 10)
