"""Numerical safety of every registered loss, in one table: saturated ±1e4 logits, fp16/bf16
inputs, extreme temperatures, fully masked batches and garbage at masked positions, for each
teacher signal the loss accepts (dense logits, sparse top-k with the ``tail_bucket`` and the
``renormalize`` policies).

The table is built from :data:`kdforge.losses.LOSSES` at collection time, so a newly registered
loss is covered without editing this file. Cases already covered by the losses' own tests are
left out (see ``COVERED_ELSEWHERE``) rather than repeated.

What "safe" means here: the loss and its gradient are finite (no NaN, no inf, no 0/0 on empty
batches), masked positions get exactly zero gradient, a fully masked batch gives exactly zero
loss and gradient, half-precision inputs give the float32 answer of the same rounded inputs,
and saturated student/teacher pairs give ~0 when they agree and a positive finite value when
they do not.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch

from kdforge.losses import LOSSES, SparseTeacher

B, T, V, K = 2, 3, 16, 4
BIG = 1e4
REDUCTIONS = ("mean", "sum")


def _accepts_sparse(name: str) -> bool:
    """Whether a registered loss takes a sparse top-k teacher (probed once; a clear
    KdforgeError such as DKD's "needs dense teacher logits" means dense only)."""
    from kdforge.errors import KdforgeError

    lp = torch.log_softmax(torch.randn(1, V), dim=-1)
    values, ids = lp.topk(K, dim=-1)
    try:
        LOSSES.get(name)(torch.randn(1, V), SparseTeacher(ids, values, V), labels=torch.zeros(1, dtype=torch.long))
    except KdforgeError:
        return False
    return True


def _signals_of(name: str) -> list[str]:
    """Teacher signals a registered loss accepts: dense logits always, sparse top-k if it can
    (a supervised loss ignores the teacher: one entry is enough)."""
    if _kind(name) == "distillation" and _accepts_sparse(name):
        return ["dense", "sparse:tail_bucket", "sparse:renormalize"]
    return ["dense"]


def _kind(name: str) -> str:
    params = inspect.signature(LOSSES.get(name)).parameters
    return "supervised" if params["teacher"].default is None else "distillation"


@dataclass
class Case:
    student: torch.Tensor  # [B, T, V] leaf, requires grad
    teacher: torch.Tensor  # dense [B, T, V] logits (converted to a sparse signal when asked)
    labels: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool
    temperature: float = 1.0
    nan_teacher_at_masked: bool = False


def _one_hot_logits(index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """+BIG at ``index`` and -BIG elsewhere: a fully saturated softmax."""
    out = torch.full((*index.shape, V), -BIG, dtype=torch.float32)
    out.scatter_(-1, index.unsqueeze(-1), BIG)
    return out.to(dtype)


def _case(case: str) -> Case:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, V, (B, T), generator=g)
    b = (a + 1 + torch.randint(0, V - 1, (B, T), generator=g)) % V  # b != a everywhere
    everything = torch.ones(B, T, dtype=torch.bool)
    if case == "saturated_agree":
        return Case(_one_hot_logits(a, torch.float32), _one_hot_logits(a, torch.float32), a, everything)
    if case == "saturated_disagree":
        return Case(_one_hot_logits(a, torch.float32), _one_hot_logits(b, torch.float32), b, everything)
    if case == "saturated_disagree_fp16":
        return Case(_one_hot_logits(a, torch.float16), _one_hot_logits(b, torch.float16), b, everything)
    if case == "saturated_disagree_bf16":
        return Case(_one_hot_logits(a, torch.bfloat16), _one_hot_logits(b, torch.bfloat16), b, everything)
    if case == "random_fp16_T2":
        s = (torch.randn(B, T, V, generator=g) * 8).half()
        t = (torch.randn(B, T, V, generator=g) * 8).half()
        return Case(s, t, b, everything, temperature=2.0)
    if case == "random_bf16_T2":
        s = (torch.randn(B, T, V, generator=g) * 8).bfloat16()
        t = (torch.randn(B, T, V, generator=g) * 8).bfloat16()
        return Case(s, t, b, everything, temperature=2.0)
    if case == "saturated_tiny_temperature":
        return Case(_one_hot_logits(a, torch.float32), _one_hot_logits(b, torch.float32), b, everything,
                    temperature=1e-2)
    if case == "saturated_huge_temperature_fp16":
        return Case(_one_hot_logits(a, torch.float16), _one_hot_logits(b, torch.float16), b, everything,
                    temperature=100.0)
    if case == "garbage_at_masked_positions":
        mask = torch.tensor([[True, False, True], [False, False, True]])
        s = torch.randn(B, T, V, generator=g)
        s[~mask] = _one_hot_logits(a, torch.float32)[~mask] * 3  # ±3e4 where masked
        labels = torch.where(mask, b, torch.full_like(b, -100))
        return Case(s, torch.randn(B, T, V, generator=g), labels, mask, nan_teacher_at_masked=True)
    if case == "fully_masked":
        s = _one_hot_logits(a, torch.float32)
        return Case(s, _one_hot_logits(b, torch.float32), torch.full_like(a, -100),
                    torch.zeros(B, T, dtype=torch.bool), nan_teacher_at_masked=True)
    raise KeyError(case)


CASES = ["saturated_agree", "saturated_disagree", "saturated_disagree_fp16", "saturated_disagree_bf16",
         "random_fp16_T2", "random_bf16_T2", "saturated_tiny_temperature", "saturated_huge_temperature_fp16",
         "garbage_at_masked_positions", "fully_masked"]

# (loss kind, signal, case) already tested by tests/losses: dense bf16 inputs
# (test_bf16_inputs_are_computed_in_float32), dense fully masked batches
# (test_fully_masked_batch_gives_zero_loss_and_zero_grads); DKD's own extreme/bf16 test covers
# only dense, so DKD stays in the table.
COVERED_ELSEWHERE = {
    ("distillation", "dense", "random_bf16_T2"),
    ("distillation", "dense", "fully_masked"),
}

# losses that see only the sorted probability spectrum (ULD): two one-hot distributions on different
# tokens are identical to them, so "saturated_disagree" is 0 by definition (tests/losses/test_uld.py)
VOCABULARY_FREE = {"uld"}

TABLE = [
    pytest.param(name, signal, id=f"{name}-{signal}")
    for name in LOSSES.names()
    for signal in _signals_of(name)
]


def _cases_for(name: str, signal: str) -> list[str]:
    kind = "dkd" if name == "dkd" else _kind(name)
    return [c for c in CASES if (kind, signal, c) not in COVERED_ELSEWHERE]


def _signal(case: Case, signal: str) -> tuple[torch.Tensor | SparseTeacher, dict]:
    teacher = case.teacher.clone()
    if signal == "dense":
        if case.nan_teacher_at_masked:
            teacher[~case.mask] = float("nan")
        return teacher, {}
    lp = torch.log_softmax(teacher.float(), dim=-1)
    values, ids = lp.topk(K, dim=-1)
    if case.nan_teacher_at_masked:
        values[~case.mask] = float("nan")
    return SparseTeacher(ids, values, V), {"sparse_policy": signal.split(":")[1]}


def _call(name: str, student: torch.Tensor, case: Case, signal: str, reduction: str) -> torch.Tensor:
    teacher, extra = _signal(case, signal)
    return LOSSES.get(name)(student, teacher, mask=case.mask, labels=case.labels, temperature=case.temperature,
                            reduction=reduction, **extra)


@pytest.mark.parametrize(("name", "signal"), TABLE)
def test_registered_loss_is_finite_with_zero_gradient_where_masked(name, signal):
    for case_name in _cases_for(name, signal):
        for reduction in REDUCTIONS:
            _check(name, signal, case_name, reduction)


def _check(name: str, signal: str, case_name: str, reduction: str) -> None:
    where = f"{name} / {signal} / {case_name} / reduction={reduction}"
    case = _case(case_name)
    student = case.student.clone().requires_grad_()
    out = _call(name, student, case, signal, reduction)
    assert out.ndim == 0 and torch.isfinite(out), f"{where}: loss {out}"
    out.backward()
    grad = student.grad
    assert grad is not None and grad.dtype == student.dtype, where
    assert torch.isfinite(grad.float()).all(), f"{where}: non-finite gradient"
    assert torch.all(grad[~case.mask] == 0), f"{where}: masked positions got a gradient"

    if case_name == "fully_masked":
        assert out.item() == 0.0 and torch.all(grad == 0), f"{where}: an empty batch must give 0, not 0/0"
    elif case_name == "saturated_agree":
        assert abs(out.item()) < 1e-3 * (B * T if reduction == "sum" else 1), f"{where}: {out.item()}"
    elif case_name.startswith("saturated") and name not in VOCABULARY_FREE:
        assert out.item() > 0, f"{where}: {out.item()}"
    if student.dtype != torch.float32 and case_name != "fully_masked":
        # half-precision inputs are computed in float32: same answer as upcasting the inputs first
        ref = _call(name, case.student.float(), case, signal, reduction)
        torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4, msg=where)
    if case_name == "garbage_at_masked_positions":
        # the ±3e4 logits (and NaN teacher entries) at masked positions change nothing
        clean = case.student.clone()
        clean[~case.mask] = 0.0
        torch.testing.assert_close(out, _call(name, clean, case, signal, reduction), msg=where)


def test_table_covers_every_registered_loss_and_the_sparse_policies_where_accepted():
    names = {p.values[0] for p in TABLE}
    assert names == set(LOSSES.names())
    sparse = {p.values[0] for p in TABLE if p.values[1].startswith("sparse:")}
    assert {"forward_kl", "reverse_kl", "generalized_jsd", "tvd"} <= sparse
    assert "dkd" not in sparse  # refuses a top-k teacher with a clear error (tested in tests/losses)
    assert sum(len(_cases_for(*p.values)) for p in TABLE) > 200  # (loss, signal, case) combinations


# ------------------------------------------------------------------------------------------
# The same losses through the chunked fused LM-head path (Objective(chunked=True)), which
# computes them from hidden states and the head weight chunk by chunk. tests/losses covers its
# equality with the plain path on moderate float64/bf16 inputs and an all-masked batch; here:
# saturated ±1e4 logits, fp16/bf16 hidden states and heads, garbage at masked rows.

CHUNK_CASES = ["saturated_fp32", "saturated_fp16", "saturated_bf16", "garbage_at_masked_rows"]
CHUNK_TABLE = [pytest.param(name, signal, id=f"{name}-{signal}")
               for name, signal in ((p.values[0], p.values[1]) for p in TABLE)
               if _kind(name) == "distillation" and LOSSES.get(name).separable]  # coupled losses are never chunked


def _chunk_inputs(case: str):
    """Hidden ``[N, V]`` of ±BIG and an identity head: student logits are exactly ±BIG.

    (The magnitude sits in the hidden states, not the head: with a head of norm 1e4 the true
    gradient with respect to fp16 hidden states exceeds the fp16 range, which no loss can fix.)
    """
    g = torch.Generator().manual_seed(1)
    n = B * T
    a = torch.randint(0, V, (n,), generator=g)
    b = (a + 1 + torch.randint(0, V - 1, (n,), generator=g)) % V
    hidden = torch.full((n, V), -BIG)
    hidden[torch.arange(n), a] = BIG
    head = torch.eye(V)
    teacher = _one_hot_logits(b, torch.float32)
    mask = torch.ones(n, dtype=torch.bool)
    if case == "garbage_at_masked_rows":
        mask[::2] = False
        hidden[~mask] = 3 * BIG  # logits 3e4 at every entry of masked rows
    dtype = {"saturated_fp16": torch.float16, "saturated_bf16": torch.bfloat16}.get(case, torch.float32)
    return hidden.to(dtype), head.to(dtype), teacher, b, mask


@pytest.mark.parametrize(("name", "signal"), CHUNK_TABLE)
def test_chunked_path_is_finite_and_equals_the_plain_loss_on_saturated_and_half_inputs(name, signal):
    from kdforge.losses import chunked_distillation_loss

    for case_name in CHUNK_CASES:
        where = f"{name} / {signal} / chunked / {case_name}"
        hidden, head, dense, labels, mask = _chunk_inputs(case_name)
        labels = labels.masked_fill(~mask, -100)
        case = Case(hidden, dense, labels, mask, nan_teacher_at_masked=case_name.startswith("garbage"))
        teacher, extra = _signal(case, signal)
        h = hidden.clone().requires_grad_()
        out = chunked_distillation_loss(h, head, teacher, loss=name, labels=labels, mask=mask, kd_weight=1.0,
                                        ce_weight=0.5, chunk_size=4, reduction="sum", temperature=2.0, **extra)
        assert torch.isfinite(out["loss"]) and out["loss"].item() > 0, f"{where}: {out['loss']}"
        out["loss"].backward()
        assert torch.isfinite(h.grad.float()).all(), f"{where}: non-finite gradient"
        assert torch.all(h.grad[~mask] == 0), f"{where}: masked rows got a gradient"
        # the plain path on the float32 logits of the same (rounded) inputs
        logits = (hidden.float() @ head.float().T).requires_grad_()
        plain = LOSSES.get(name)(logits, teacher, mask=mask, labels=labels, reduction="sum", temperature=2.0,
                                 **extra) \
            + 0.5 * LOSSES.get("cross_entropy")(logits, labels=labels, mask=mask, reduction="sum")
        torch.testing.assert_close(out["loss"].float(), plain.detach(), rtol=1e-4, atol=1e-3, msg=where)


def test_chunked_path_uses_each_loss_default_temperature_like_the_plain_path():
    from kdforge.losses import chunked_distillation_loss

    g = torch.Generator().manual_seed(2)
    hidden, teacher = torch.randn(6, V, generator=g) * 3, torch.randn(6, V, generator=g) * 3
    labels = torch.randint(0, V, (6,), generator=g)
    chunked = chunked_distillation_loss(hidden, torch.eye(V), teacher, loss="dkd", labels=labels,
                                        reduction="sum")["loss"]
    plain = LOSSES.get("dkd")(hidden, teacher, labels=labels, reduction="sum")
    torch.testing.assert_close(chunked, plain)
