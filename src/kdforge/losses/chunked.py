"""Fused LM-head + distillation loss over chunks of positions, for big vocabularies.

With ``N`` tokens and a vocabulary of ``V``, plain distillation materialises the student's
``[N, V]`` logits, the teacher's, their log-softmaxes and the autograd buffers of all of them:
at ``N = 4096, V = 131072`` each such float32 array is 2 GiB. This module never holds more than
one chunk of ``chunk_size`` positions of them:

for each chunk of positions ``c`` (masked positions are dropped before the LM head):
  1. student logits ``h_c W^T (+ b)`` (and, for a :class:`TeacherHead`, the teacher's) for the chunk,
  2. the loss on the chunk *and* its gradient ``g`` w.r.t. the chunk's logits:
     * a loss whose spec has a closed form (forward/reverse KL, generalised JSD, TVD, skew KLs)
       with a dense or head teacher, and cross-entropy: closed-form values and gradients in one
       pass (``LossSpec.kernel_for``, :mod:`kdforge.losses.closed_form`),
     * the same divergences with a sparse (top-k) teacher at T = 1 (or ``renormalize``): the
       registered loss under autograd on the ``k + 1`` buckets only, the vocabulary-sized gradient
       in closed form (:func:`_sparse_closed_form_chunk`),
     * every other loss (and a sparse teacher otherwise): the *same* registered pure function as
       the unchunked path under autograd (so every loss in :data:`~kdforge.losses.LOSSES` works,
       dense or sparse teacher, with its masking),
  3. ``g`` immediately turned into ``dL/dh_c = g W`` and accumulated ``dL/dW += g^T h_c``
     (``dL/db += sum g``), then the chunk's arrays are freed.

This all happens inside the forward of a :class:`torch.autograd.Function`; backward only scales
the stored gradients by the incoming gradient, in place. Same idea as Liger-Kernel's
``fused_linear_distillation`` and torchtune's chunked KD losses, but for every loss of the zoo, a
sparse (top-k) teacher, a teacher given as hidden states + head, and a CE term in one pass.

Cost: one ``[V, H]`` float32 buffer for the weight gradient (handed to autograd as is); the logits
are computed once. ``chunk_size="auto"`` (the default) bounds the rest: :func:`auto_chunk_size`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kdforge.errors import ConfigError, ShapeError, VocabMismatchError
from kdforge.losses._core import (
    _LOG_MASS_CAP,
    check_reduction,
    check_temperature,
    log1mexp,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.closed_form import ClosedForm, FusedKernel, compiled_kernel, resolve_compile
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import LossSpec, loss_spec
from kdforge.losses.supervised import IGNORE_INDEX, cross_entropy

__all__ = ["TeacherHead", "auto_chunk_size", "chunked_distillation_loss"]

# "auto" chunking: a chunk's float32 [rows, V] working set (AUTO_LIVE_ARRAYS arrays of that shape
# alive at its peak) fits AUTO_WORKING_SET_BYTES: 192 MiB on CPU, 768 MiB on an accelerator (where
# taller chunks keep the kernels busy); never fewer than AUTO_MIN_ROWS rows on the closed forms
# (half as many on the autograd path, which keeps twice as many arrays: the same floor in bytes),
# so that the LM-head matmuls stay efficient for big vocabularies (measured at V = 131072 on CPU:
# 256 rows take 12-17% less CPU time than 64 for forward and reverse KL, at 0.44x Liger's peak).
AUTO_WORKING_SET_BYTES = {"cpu": 192 << 20, "accelerator": 768 << 20}
AUTO_LIVE_ARRAYS = {"closed_form": 6, "autograd": 12}
AUTO_MIN_ROWS = 256


@dataclass(frozen=True)
class TeacherHead:
    """Teacher given as final hidden states and its LM head, so its logits are made per chunk.

    Attributes:
        hidden: ``[N, Ht]`` (or ``[..., Ht]``) teacher final hidden states (after the final norm).
        weight: ``[V, Ht]`` teacher LM-head weight.
        bias: optional ``[V]`` LM-head bias.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, rows: slice) -> torch.Tensor:
        h = self.hidden.reshape(-1, self.hidden.shape[-1])[rows].detach()
        b = None if self.bias is None else self.bias.detach()
        return torch.nn.functional.linear(h, self.weight.detach(), b)


class _Workspace:
    """``[rows, V]`` float32 buffers reused by every chunk of one call (closed forms, CPU, float32).

    On CPU a fresh ``[rows, V]`` array of the "auto" size (32 MiB) is a fresh ``mmap``: its pages
    are faulted in (and zeroed by the kernel) on first touch, every chunk (measured ~13 ms per
    array at 256 x 32768, 1 thread, about a tenth of that chunk's LM-head product). The student's
    logits (turned in place into ``log q``), ``q``, a :class:`TeacherHead`'s logits and the closed
    form's gradient (``ClosedForm(..., out=)``) are written into these buffers instead (``out=``),
    so only the first chunk pays. Accelerators' caching
    allocators reuse memory already: there the plain path runs.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.shape = (rows, vocab)
        self.device = device
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, r: int) -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None:
            buf = self.bufs[name] = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        return buf[:r]

    def linear(self, name: str, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``h w^T + b`` written into buffer ``name``."""
        out = self.get(name, h.shape[0])
        if b is None:
            return torch.mm(h, w.t(), out=out)
        return torch.addmm(b, h, w.t(), out=out)


def auto_chunk_size(vocab_size: int, num_positions: int, device: torch.device | str | None = None, *,
                    closed_form: bool = False) -> int:
    """Rows per chunk for ``chunk_size="auto"`` (the default): the chunk's working set fits a budget.

    ``rows = budget / (arrays * V * 4 bytes)``, rounded down to a multiple of 8, at least
    :data:`AUTO_MIN_ROWS` = 256 for the closed forms and 128 on the autograd path (the same floor in
    bytes), and at most ``num_positions``, with

    * ``budget`` = :data:`AUTO_WORKING_SET_BYTES` of the device: 192 MiB on CPU, 768 MiB on an
      accelerator;
    * ``arrays`` = :data:`AUTO_LIVE_ARRAYS`, the float32 ``[rows, V]`` arrays alive at a chunk's
      peak: 6 for the closed forms (``closed_form=True``: logits turned in place into the
      log-softmax, its exponential, the teacher's logits and log-probabilities, the gradient) and
      12 on the autograd path (the loss's temporaries and their gradients too).

    So the chunked path's extra memory is about the budget plus the ``[V, H]`` weight gradient,
    whatever the number of tokens, until the floor: e.g. ``V = 32768`` gives 256 rows (closed form)
    or 128 rows (autograd) on CPU and ``V = 131072`` the floor (256 / 128) on CPU as on a GPU; above
    ``V = 32768`` the CPU working set grows with ``V`` (768 MiB at 131072 for the closed forms).
    The floor is measured: the LM-head matmuls lose efficiency on short chunks (at ``V = 131072``,
    1 thread, forward + backward: 64 rows 10.4-11.5 CPU s, 128 rows 8.9-10.0, 256 rows 8.5-9.7
    against a GEMM floor of 7.7-9.5), while 256 rows still hold under half of Liger-Kernel's
    1024-row peak (0.44x for reverse KL, the tightest; docs/benchmarks.md).
    """
    kind = "cpu" if device is None or torch.device(device).type == "cpu" else "accelerator"
    arrays = AUTO_LIVE_ARRAYS["closed_form" if closed_form else "autograd"]
    floor = AUTO_MIN_ROWS * AUTO_LIVE_ARRAYS["closed_form"] // arrays
    rows = max(floor, AUTO_WORKING_SET_BYTES[kind] // (arrays * 4 * max(vocab_size, 1)))
    rows -= rows % 8
    return max(1, min(num_positions, rows))


def _teacher_chunk(teacher: torch.Tensor | SparseTeacher | TeacherHead, rows: slice,
                   idx: torch.Tensor | None = None, ws: _Workspace | None = None):
    """The teacher signal of positions ``rows`` (then ``idx`` within them, when given); a
    :class:`TeacherHead`'s float32 logits go into ``ws``'s ``"t"`` buffer when given."""
    if isinstance(teacher, TeacherHead):
        h = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])[rows].detach()
        if idx is not None:
            h = h.index_select(0, idx)
        b = None if teacher.bias is None else teacher.bias.detach()
        tw = teacher.weight.detach()
        if ws is not None and h.dtype == tw.dtype == torch.float32 and (b is None or b.dtype == torch.float32):
            return ws.linear("t", h, tw, b)
        return torch.nn.functional.linear(h, tw, b)
    if isinstance(teacher, SparseTeacher):
        return teacher[rows] if idx is None else teacher[rows][idx]
    t = teacher[rows].detach()
    return t if idx is None else t.index_select(0, idx)


def _check_labels(labels: torch.Tensor | None, vocab: int) -> None:
    if labels is None or not value_checks_enabled():
        return
    real = labels[labels != IGNORE_INDEX]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise ShapeError(
            f"labels outside [0, {vocab}) (other than ignore_index={IGNORE_INDEX})",
            "labels must index the student's vocabulary; use -100 for positions without a target",
        )


def _closed_form_chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, teacher: torch.Tensor | None,
                       labels: torch.Tensor | None, kernel: FusedKernel | None, temperature: float,
                       c_kd: float, c_ce: float, ws: _Workspace | None = None, log_ce: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float] | None:
    """KD and CE sums of one chunk and ``alpha, G`` with ``d(c_kd KD + c_ce CE)/dz_s = alpha * G``.

    Closed forms (:mod:`kdforge.losses.closed_form`): the KD part is ``T * kernel.scale * G_kd`` per unit
    of ``c_kd``; cross-entropy's gradient is ``softmax(z_s) - onehot(y)`` on labelled rows. At
    ``T = 1`` both share the student's softmax: ``G = (c_kd T s / c_ce) G_kd + q * labelled - onehot``.
    Returns None when the KD values are not finite (the caller reruns the chunk under autograd,
    which handles ``-inf`` teacher logits and raises the diagnosed error). Without value checks
    (:func:`~kdforge.losses.value_checks`) nothing is read back: the CE terms are masked instead of
    indexed by the labelled rows, and a non-finite value is returned as is.

    ``log_ce`` (with ``c_ce == 0``): CE's value is computed too (logged only, no gradient): from
    the shared ``log q`` at ``T = 1``, else as ``logsumexp(z) - z[y]`` before ``z`` is scaled.
    """
    checks = value_checks_enabled()
    ce_wanted = c_ce != 0 or log_ce
    if kernel is None and not ce_wanted:  # nothing to compute (kd_weight = ce_weight = 0)
        zero = h.new_zeros((), dtype=h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32)
        return zero, zero, None, 1.0
    # The workspace (CPU, float32) serves the single-softmax path: KD alone, or KD + CE at T = 1.
    ws = ws if kernel is not None and (c_ce == 0 or temperature == 1.0) else None
    if ws is not None:
        logits = ws.linear("z", h, w, b)  # the reused buffer: modified in place below
    else:
        logits = upcast(torch.nn.functional.linear(h, w, b))  # a fresh buffer: modified in place below
    zero = logits.new_zeros(())
    rows_idx = targets = labelled = None
    all_labelled = True
    ce_val = zero
    g_ce = None
    if ce_wanted:
        labelled = labels != IGNORE_INDEX
        if checks:  # index the labelled rows (reads their count) and skip the mask when all are
            all_labelled = bool(labelled.all())
            rows_idx = labelled.nonzero().squeeze(1)
            targets = labels[rows_idx].long()
        else:  # every row, unlabelled ones weighted 0 (same values, no read)
            all_labelled = False
            targets = torch.where(labelled, labels, 0).long()
        if c_ce == 0 and (kernel is None or temperature != 1.0):  # logged only: value at T = 1, read-only
            ce_val = _ce_sum_from_logits(logits, rows_idx, targets, labelled)
            if kernel is None:
                return zero, ce_val, None, 1.0
        elif kernel is None or temperature != 1.0:  # CE at T = 1 on its own softmax
            logq1 = torch.log_softmax(logits, dim=-1)
            ce_val = _ce_sum(logq1, rows_idx, targets, labelled)
            g_ce = logq1.exp_()
            del logq1
            if not all_labelled:
                g_ce.mul_(labelled.unsqueeze(1))
            _minus_onehot(g_ce, rows_idx, targets, labelled)
            if kernel is None:
                return zero, ce_val, g_ce, c_ce
    assert kernel is not None and teacher is not None
    if temperature != 1.0:
        logits.div_(temperature)
    if ws is not None:  # softmax into a buffer, then log-softmax in place (each row is reduced before it is
        # written): two fused row passes, cheaper than an exp pass over log q (measured 5 vs 7.5 ms at 256 x 32768)
        q = torch.ops.aten._softmax.out(logits, -1, False, out=ws.get("q", logits.shape[0]))
        logq = torch.ops.aten._log_softmax.out(logits, -1, False, out=logits)
    else:
        logq = torch.log_softmax(logits, dim=-1)
        q = logq.exp()
    del logits
    if ce_wanted and temperature == 1.0:
        ce_val = _ce_sum(logq, rows_idx, targets, labelled)
    t = upcast(teacher.detach()).to(logq.dtype)
    if temperature != 1.0:
        t = t / temperature
    if ws is not None and isinstance(kernel, ClosedForm):  # the gradient into a reused buffer
        out = kernel(logq, q, t, out=ws.get("g", logq.shape[0]))
    else:
        out = kernel(logq, q, t)
    del logq, t
    if checks and not bool(torch.isfinite(out.per_pos).all()):
        return None
    kd_val = out.per_pos.sum() * (temperature**2)
    g, alpha = out.grad, c_kd * temperature * out.scale
    if c_ce == 0:
        return kd_val, ce_val, g, alpha
    g.mul_(alpha / c_ce)
    if g_ce is not None:
        g.add_(g_ce)
    else:
        if all_labelled:
            g.add_(q)
        else:
            g.addcmul_(q, labelled.unsqueeze(1))
        _minus_onehot(g, rows_idx, targets, labelled)
    return kd_val, ce_val, g, c_ce


def sparse_closed_form_applies(spec: LossSpec, teacher: Any, vocab: int, temperature: float,
                               params: dict[str, Any]) -> bool:
    """Whether :func:`_sparse_closed_form_chunk` computes ``spec`` exactly for this sparse teacher.

    It does for the divergences that have a dense closed form (they read the student only through
    :func:`~kdforge.losses._core.distill`'s bucketed pair; no labels) when the student's bucketed
    distribution is a function of its T = 1 probabilities: ``T == 1`` (every policy, sampled tails
    too) or ``sparse_policy="renormalize"`` (any ``T``), and the top-k is smaller than the vocabulary.
    """
    if not isinstance(teacher, SparseTeacher) or teacher.k >= vocab:
        return False
    return sparse_closed_form_by_config(spec, temperature, params)


def sparse_closed_form_by_config(spec: LossSpec, temperature: float, params: dict[str, Any]) -> bool:
    """The part of :func:`sparse_closed_form_applies` that the term's configuration decides (no
    teacher at hand: the top-k size is checked per batch): a closed-form divergence without labels,
    at ``T == 1`` or with ``sparse_policy="renormalize"``."""
    if spec.kernel is None or spec.needs_labels:
        return False
    policy = params.get("sparse_policy", spec.param_defaults.get("sparse_policy", "tail_bucket"))
    return temperature == 1.0 or policy == "renormalize"


def _sparse_closed_form_chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, teacher: SparseTeacher,
                              labels: torch.Tensor | None, loss_fn: Callable[..., torch.Tensor],
                              loss_params: dict[str, Any], temperature: float, c_kd: float, c_ce: float,
                              want_grad: bool, ws: _Workspace | None = None, log_ce: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """KD (sparse top-k teacher) and CE sums of one chunk and ``G = d(c_kd KD + c_ce CE)/dz_s``.

    The sparse losses see the student only through its bucketed distribution ``Q'`` over
    ``k + 1`` buckets: the ``k`` teacher ids and the tail (every other token),
    ``R = log Q' = [log q[ids], log(1 - sum_k q[ids])]``. So the registered loss runs under
    autograd on ``R`` taken as the logits of a ``(k + 1)``-word vocabulary (``log_softmax(R) = R``,
    the teacher's ids renumbered ``0..k-1``): same value, and ``g_R = dKD/dR`` for ``[r, k + 1]``
    instead of an autograd pass over ``[r, V]``. The chain rule through
    ``R_b = log sum_{v in b} q_v`` (with ``sum_b g_R,b = 0``, the loss being shift invariant in ``R``)
    gives the vocabulary-sized gradient in closed form::

        dKD/dz_v = g_R[j]                      if v = ids[j] (a real, non-padding entry)
                 = q_v * g_R[tail] / Q'[tail]  otherwise

    i.e. one scaling pass over ``q`` plus a ``k``-column scatter; the teacher is never densified.
    Cross-entropy (T = 1) adds ``c_ce (q - onehot(y))`` on labelled rows into the same pass.
    ``-inf`` padding entries get ``R = -inf`` (zero mass, zero gradient). Exact while the tail mass
    exceeds the clamp of :func:`~kdforge.losses._core.sparse_pair` (``~1e-6``), as there.
    ``log_ce`` (with ``c_ce == 0``): CE's value from the same ``log q`` (a gather), no gradient.
    """
    if ws is not None:
        logq = torch.ops.aten._log_softmax.out(ws.linear("z", h, w, b), -1, False, out=ws.get("z", h.shape[0]))
    else:
        logq = torch.log_softmax(upcast(torch.nn.functional.linear(h, w, b)), dim=-1)
    ids = teacher.ids.long()
    pad = torch.isneginf(upcast(teacher.logprobs))
    a = logq.gather(1, ids).masked_fill_(pad, float("-inf"))
    zero = logq.new_zeros(())
    ce_val = zero
    labelled = targets = None
    if c_ce != 0 or log_ce:
        labelled = labels != IGNORE_INDEX
        targets = torch.where(labelled, labels, 0).long()
        ce_val = _ce_sum(logq, None, targets, labelled)
    q = logq.exp_()  # log q is no longer needed: q in the same buffer
    del logq
    tail = log1mexp(torch.logsumexp(a, dim=-1, keepdim=True).clamp(max=_LOG_MASS_CAP))
    k = ids.shape[1]
    red_ids = torch.arange(k, device=ids.device).expand_as(ids)
    red_teacher = SparseTeacher(red_ids, teacher.logprobs, k + 1, teacher.num_exact)
    reduced = torch.cat([a, tail], dim=1)
    with torch.enable_grad():
        reduced.requires_grad_(want_grad)
        kd = loss_fn(reduced, red_teacher, temperature=temperature, reduction="sum", **loss_params)
        g_r = torch.autograd.grad(kd, reduced)[0] if want_grad and kd.requires_grad else None
    kd = kd.detach()
    if g_r is None:
        return kd, ce_val, None, 1.0
    tail_coef = g_r[:, k:] * torch.exp(-tail)  # g_R[tail] / Q'[tail], [r, 1]
    coef = tail_coef * c_kd
    if c_ce != 0:
        coef = coef + labelled.unsqueeze(1).to(coef.dtype) * c_ce
    g = q.mul_(coef)  # every column as if in the tail (+ CE's q), in place
    # the k teacher columns: c_kd * g_R[j] (+ CE's c_ce q) instead of c_kd * q * tail_coef
    fix = (g_r[:, :k] - a.exp() * tail_coef).masked_fill_(pad, 0.0).mul_(c_kd)
    g.scatter_add_(1, ids, fix)
    if c_ce != 0:
        g.scatter_add_(1, targets.unsqueeze(1), labelled.to(g.dtype).unsqueeze(1).mul_(-c_ce))
    return kd, ce_val, g, 1.0


def _ce_sum(logq: torch.Tensor, rows_idx: torch.Tensor | None, targets: torch.Tensor,
            labelled: torch.Tensor) -> torch.Tensor:
    """``-sum log q[y]`` over labelled rows: ``rows_idx`` given (value checks on) or by mask."""
    if rows_idx is not None:
        return -logq[rows_idx, targets].sum()
    picked = logq.gather(1, targets.unsqueeze(1)).squeeze(1)
    return -torch.where(labelled, picked, 0.0).sum()


def _ce_sum_from_logits(logits: torch.Tensor, rows_idx: torch.Tensor | None, targets: torch.Tensor,
                        labelled: torch.Tensor) -> torch.Tensor:
    """``sum (logsumexp(z) - z[y])`` over labelled rows (CE at T = 1 without a ``[r, V]`` buffer)."""
    lse = torch.logsumexp(logits, dim=-1)
    if rows_idx is not None:
        return (lse[rows_idx] - logits[rows_idx, targets]).sum()
    per_row = lse - logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return torch.where(labelled, per_row, 0.0).sum()


def _minus_onehot(g: torch.Tensor, rows_idx: torch.Tensor | None, targets: torch.Tensor,
                  labelled: torch.Tensor) -> None:
    """``g[r, y_r] -= 1`` on labelled rows, in place."""
    if rows_idx is not None:
        minus_one = torch.full((rows_idx.numel(),), -1.0, dtype=g.dtype, device=g.device)
        g.index_put_((rows_idx, targets), minus_one, accumulate=True)
    else:
        g.scatter_add_(1, targets.unsqueeze(1), -labelled.to(g.dtype).unsqueeze(1))


def _validate(student_hidden: torch.Tensor, lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None,
              teacher: torch.Tensor | SparseTeacher | TeacherHead | None, n: int) -> None:
    if student_hidden.ndim != 2:
        raise ShapeError(f"student_hidden must be [N, H] after flattening, got {tuple(student_hidden.shape)}",
                         "pass the student's final hidden states (after the final norm)")
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != student_hidden.shape[1]:
        raise ShapeError(
            f"lm_head_weight {tuple(lm_head_weight.shape)} does not fit hidden size {student_hidden.shape[1]}",
            "pass the student's LM head weight [vocab, hidden] (model.get_output_embeddings().weight)",
        )
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (vocab,):
        raise ShapeError(f"lm_head_bias {tuple(lm_head_bias.shape)} must be [{vocab}]", "pass the head's bias or None")
    if isinstance(teacher, TeacherHead):
        t_rows = teacher.hidden.reshape(-1, teacher.hidden.shape[-1]).shape[0]
        if teacher.weight.ndim != 2 or teacher.weight.shape[1] != teacher.hidden.shape[-1]:
            raise ShapeError(f"TeacherHead weight {tuple(teacher.weight.shape)} does not fit hidden "
                             f"{tuple(teacher.hidden.shape)}", "pass the teacher's LM head [vocab, hidden_t]")
        t_vocab = teacher.vocab_size
    elif isinstance(teacher, SparseTeacher):
        t_rows, t_vocab = teacher.flatten().ids.shape[0], teacher.vocab_size
    elif isinstance(teacher, torch.Tensor):
        t_rows, t_vocab = teacher.reshape(-1, teacher.shape[-1]).shape[0], teacher.shape[-1]
    elif teacher is None:
        return
    else:
        raise ShapeError(f"unsupported teacher type {type(teacher).__name__}",
                         "pass dense logits, a SparseTeacher or a TeacherHead")
    if t_rows != n:
        raise ShapeError(f"teacher covers {t_rows} positions, student {n}",
                         "flatten both over the same (batch, sequence) positions")
    if t_vocab != vocab:
        raise VocabMismatchError(
            f"teacher vocabulary {t_vocab} != student LM-head vocabulary {vocab}",
            "use models sharing a tokenizer; for same-family heads padded to different sizes, slice the heads "
            "to the tokenizer size: weight[:tokenizer_size]",
        )


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``; True when unknown)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):  # a private torch API: fall back to the copying path
        return True


class _FusedChunkedLoss(torch.autograd.Function):
    """Forward computes loss *and* gradients chunk by chunk; backward rescales them.

    The gradients are intermediate tensors owned by this node (kept on ``ctx``, not saved inputs
    or outputs). A backward that frees the graph (the usual ``loss.backward()``) scales them by the
    incoming gradient in place and hands them on: no second ``[V, H]`` weight-gradient buffer, and
    autograd can make the tensor the weight's ``.grad`` without a copy. A backward that keeps the
    graph (``retain_graph=True``, ``gradcheck``) returns scaled copies, so that the next one starts
    from the same gradients.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                run: Callable[..., tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, kd, ce, g_hidden, g_weight, g_bias = run(hidden, weight, bias)
        ctx.grads = (g_hidden, g_weight, g_bias)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, _g_kd: Any, _g_ce: Any):
        if ctx.grads is None:
            raise ConfigError(
                "backward ran a second time through a chunked_distillation_loss whose first backward freed the "
                "graph (its gradients were scaled in place and handed on)",
                "pass retain_graph=True to the first backward, or compute the loss again",
            )
        keep = _graph_kept()
        g_hidden, g_weight, g_bias = ctx.grads
        if not keep:
            ctx.grads = None

        def scaled(g: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
            if not wanted or g is None or not g.numel():
                return None
            scale = g_loss.to(g.dtype)
            return g * scale if keep else g.mul_(scale)

        return (scaled(g_hidden, ctx.needs_input_grad[0]), scaled(g_weight, ctx.needs_input_grad[1]),
                scaled(g_bias, ctx.needs_input_grad[2]), None)


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher | TeacherHead | None,
    *,
    loss: str | LossSpec | Callable[..., torch.Tensor] = "forward_kl",
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float | None = None,
    chunk_size: int | str = "auto",
    lm_head_bias: torch.Tensor | None = None,
    reduction: str = "sum",
    closed_form: bool = True,
    compile_kernels: bool | str = "auto",
    log_ce: bool = False,
    **loss_params: Any,
) -> dict[str, torch.Tensor]:
    """``kd_weight * KD + ce_weight * CE`` from hidden states, chunked over positions.

    Exactly equal (values and gradients, up to float rounding) to
    ``kd_weight * LOSSES.get(loss)(h W^T + b, teacher, mask=, labels=, temperature=, reduction=)
    + ce_weight * cross_entropy(h W^T + b, labels=, mask=, reduction=)`` without ever holding the
    ``[N, V]`` logits.

    Args:
        student_hidden: ``[N, H]`` (or ``[..., H]``, flattened) student final hidden states.
        lm_head_weight: ``[V, H]`` student LM head (gets a gradient if it requires one).
        teacher: dense logits ``[N, V]``, a ``SparseTeacher`` ``[N, k]``, a :class:`TeacherHead`,
            or None when ``kd_weight == 0``. The teacher never receives gradients.
        loss: registered loss name (any of ``LOSSES``), its spec, or a callable with the same signature.
        labels: int ``[N]`` targets for CE (and DKD), ``-100`` to ignore. Already shifted.
        mask: bool ``[N]`` real positions (None: all real).
        kd_weight, ce_weight: weights of the KD and CE terms in ``"loss"``.
        temperature: passed to the KD loss (CE is always at T = 1); None uses the loss's own
            default (1 for most, 4 for DKD), exactly like calling the loss directly.
        chunk_size: positions per chunk, or ``"auto"`` (default; :func:`auto_chunk_size`: the
            chunk's float32 ``[chunk, V]`` working set within 192 MiB on CPU, 768 MiB on an
            accelerator). Peak extra memory is that working set plus a ``[V, H]`` float32
            weight-gradient buffer.
        lm_head_bias: optional ``[V]`` bias.
        reduction: ``"sum"`` (default: sums over real positions; divide by your global token
            count, e.g. across gradient-accumulation micro-batches) or ``"mean"`` (KD divided by
            the number of real positions, CE by the number of labelled real positions).
        closed_form: compute a loss whose spec has a closed form (forward/reverse KL,
            generalised JSD, TVD, skew KLs; dense or :class:`TeacherHead` teacher) and
            cross-entropy with their closed-form gradients in one pass
            (``LossSpec.kernel_for``), and with a ``SparseTeacher`` where
            :func:`sparse_closed_form_applies` (autograd on the ``k + 1`` buckets only); False runs
            every loss under autograd per chunk (the path every other loss always takes). Same results.
        compile_kernels: run the closed forms through ``torch.compile`` (the same functions,
            fused loops; compiled once per process and closed form, dynamic row count; the first
            call pays the compilation, 10-50 s on a CPU). ``"auto"`` (default): where a compiler
            is available (Triton on CUDA, a C++ compiler on CPU;
            :func:`kdforge.losses.closed_form.resolve_compile`, ``$KDFORGE_COMPILE_KERNELS=0``
            turns it off). A compile that fails logs a notice and runs eagerly (never an error).
        log_ce: compute cross-entropy's value (returned as ``"ce"``) even when ``ce_weight == 0``:
            a term logged only, with no gradient contribution (needs ``labels``). Without it, and
            at ``ce_weight == 0``, ``"ce"`` is 0. On the closed forms it costs a gather per chunk
            (plus one logsumexp pass over ``[rows, V]`` when the KD temperature is not 1).
        **loss_params: extra parameters of the KD loss (``beta``, ``alpha``, ``t``, ``sparse_policy``...).

    Returns:
        ``{"loss": differentiable weighted total, "kd": detached KD, "ce": detached CE}``.
    """
    spec = loss_spec(loss)
    temperature = _check_loss_args(spec, loss_params, kd_weight, temperature, reduction)
    hidden, flat_labels, flat_mask = _flatten_positions(student_hidden, labels, mask)
    _check_signals(teacher, flat_labels, kd_weight, ce_weight, log_ce)
    _validate(hidden, lm_head_weight, lm_head_bias, teacher if kd_weight != 0 else None, hidden.shape[0])
    plan = _plan_chunks(spec, hidden, lm_head_weight, teacher, flat_labels, flat_mask, loss_params=loss_params,
                        temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, reduction=reduction,
                        chunk_size=chunk_size, closed_form=closed_form, compile_kernels=compile_kernels,
                        log_ce=log_ce)
    run = functools.partial(_run_chunks, plan)
    if not (hidden.requires_grad or lm_head_weight.requires_grad
            or (lm_head_bias is not None and lm_head_bias.requires_grad)) or not torch.is_grad_enabled():
        with torch.no_grad():
            weighted, kd_out, ce_out, *_ = run(hidden, lm_head_weight, lm_head_bias)
        return {"loss": weighted, "kd": kd_out, "ce": ce_out}
    weighted, kd_out, ce_out = _FusedChunkedLoss.apply(hidden, lm_head_weight, lm_head_bias, run)
    return {"loss": weighted, "kd": kd_out, "ce": ce_out}


def trainable_module_params(params: Mapping[str, Any]) -> list[str]:
    """Names of the loss parameters that are modules with trainable parameters (a learned region or
    ratio network): the chunked path differentiates the logits only, so it cannot train them."""
    return [k for k, v in params.items() if isinstance(v, torch.nn.Module) and any(p.requires_grad for p in v.parameters())]


def _check_loss_args(spec: LossSpec, loss_params: dict[str, Any], kd_weight: float, temperature: float | None,
                     reduction: str) -> float:
    """Reject a loss the chunks cannot compute and a bad reduction; the KD temperature to use."""
    learned = trainable_module_params(loss_params)
    if learned and kd_weight != 0.0:  # the chunks differentiate the logits only: the module would never train
        raise ConfigError(f"loss {spec.name!r} has a learned module ({', '.join(learned)}) that trains through the "
                          "loss, which the chunked path cannot do", "train it with chunked: false")
    if not spec.separable and kd_weight != 0.0:
        raise ConfigError(f"loss {spec.name!r} couples the positions of a call (in-batch relations), so it cannot be "
                          "computed chunk by chunk", "train it with chunked: false")
    if temperature is None:
        temperature = spec.default_temperature  # the loss's own (DKD: 4), as calling it directly
    check_temperature(temperature)
    check_reduction(reduction)
    if reduction == "none":
        raise ConfigError("chunked_distillation_loss supports reduction 'sum' or 'mean', not 'none'",
                          "use reduction='sum' and divide by the token count yourself")
    return temperature


def _flatten_positions(student_hidden: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``[N, H]`` hidden states and ``[N]`` labels and mask (on the hidden states' device), checked to match."""
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = hidden.shape[0]
    flat_labels = None if labels is None else labels.reshape(-1).to(hidden.device)
    flat_mask = None if mask is None else mask.reshape(-1).to(hidden.device).bool()
    for name, x in (("labels", flat_labels), ("mask", flat_mask)):
        if x is not None and x.shape[0] != n:
            raise ShapeError(f"{name} covers {x.shape[0]} positions, student_hidden {n}",
                             f"flatten {name} over the same positions as the hidden states")
    return hidden, flat_labels, flat_mask


def _check_signals(teacher: torch.Tensor | SparseTeacher | TeacherHead | None, flat_labels: torch.Tensor | None,
                   kd_weight: float, ce_weight: float, log_ce: bool) -> None:
    """Each weighted (or logged) term has the signal it needs: a teacher for KD, labels for CE."""
    if kd_weight != 0 and teacher is None:
        raise ConfigError("kd_weight != 0 but no teacher was given", "pass the teacher signal or set kd_weight=0")
    if ce_weight != 0 and flat_labels is None:
        raise ConfigError("ce_weight != 0 needs labels", "pass labels=[N] (ignore_index -100)")
    if log_ce and flat_labels is None:
        raise ConfigError("log_ce=True needs labels to compute cross-entropy", "pass labels=[N] (ignore_index -100)")


@dataclass(frozen=True, eq=False)
class _ChunkPlan:
    """Everything one :func:`chunked_distillation_loss` call decided before its chunk loop."""

    n: int  # positions
    vocab: int
    rows: int  # positions per chunk
    teacher: torch.Tensor | SparseTeacher | TeacherHead | None  # flattened over the positions
    flat_labels: torch.Tensor | None
    flat_mask: torch.Tensor | None
    loss_fn: Callable[..., torch.Tensor]
    loss_params: dict[str, Any]
    temperature: float
    kd_scale: float  # kd_weight, ce_weight
    ce_scale: float
    kd_norm: int  # divisors of the "mean" reduction (1 for "sum")
    ce_norm: int
    c_kd: float  # per-position-sum coefficients: kd_scale / kd_norm, ce_scale / ce_norm
    c_ce: float
    log_ce: bool  # CE's value logged only (ce_weight == 0)
    kernel: FusedKernel | None
    use_closed_form: bool
    sparse_cf: bool
    checks: bool  # value checks on (host reads allowed)


def _plan_chunks(spec: LossSpec, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                 teacher: torch.Tensor | SparseTeacher | TeacherHead | None, flat_labels: torch.Tensor | None,
                 flat_mask: torch.Tensor | None, *, loss_params: dict[str, Any], temperature: float,
                 kd_weight: float, ce_weight: float, reduction: str, chunk_size: int | str, closed_form: bool,
                 compile_kernels: bool | str, log_ce: bool) -> _ChunkPlan:
    """The path (closed form, sparse closed form or autograd), the normalisers and the chunk size."""
    n = hidden.shape[0]
    checks = value_checks_enabled()  # off: no host read per chunk (see kdforge.losses.value_checks)
    if isinstance(teacher, torch.Tensor):
        teacher = teacher.reshape(-1, teacher.shape[-1])
    elif isinstance(teacher, SparseTeacher):
        teacher = teacher.flatten()
    vocab = lm_head_weight.shape[0]
    kd_scale, ce_scale = float(kd_weight), float(ce_weight)
    kd_norm, ce_norm = _normalisers(spec, reduction, n, hidden.device, flat_labels, flat_mask)
    c_kd, c_ce = kd_scale / kd_norm, ce_scale / ce_norm
    log_ce = bool(log_ce) and ce_scale == 0  # a weighted CE is computed anyway
    if ce_scale != 0 or log_ce:
        _check_labels(flat_labels, vocab)
    kernel = spec.kernel_for(teacher, loss_params) if closed_form and kd_scale != 0 else None
    if resolve_compile(compile_kernels, hidden.device) and kernel is not None:
        kernel = compiled_kernel(kernel) or kernel
    use_closed_form = closed_form and (kernel is not None or kd_scale == 0)
    # a sparse (top-k) teacher: closed-form vocabulary-sized gradient, autograd on k + 1 buckets only
    sparse_cf = (closed_form and kd_scale != 0 and sparse_closed_form_applies(spec, teacher, vocab, temperature,
                                                                              loss_params))
    if sparse_cf and checks and teacher.ids.numel() and (int(teacher.ids.min()) < 0
                                                         or int(teacher.ids.max()) >= vocab):
        raise ShapeError(f"sparse teacher ids outside [0, {vocab})",
                         "the cache was built with another tokenizer or vocabulary; rebuild it")
    rows = (auto_chunk_size(vocab, n, hidden.device, closed_form=use_closed_form or sparse_cf) if chunk_size == "auto"
            else chunk_size)
    if not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"chunk_size must be a positive int or 'auto', got {chunk_size!r}", "use chunk_size='auto' or e.g. 256")
    return _ChunkPlan(n, vocab, rows, teacher, flat_labels, flat_mask, spec.fn, loss_params, temperature, kd_scale,
                      ce_scale, kd_norm, ce_norm, c_kd, c_ce, log_ce, kernel, use_closed_form, sparse_cf, checks)


def _normalisers(spec: LossSpec, reduction: str, n: int, device: torch.device, flat_labels: torch.Tensor | None,
                 flat_mask: torch.Tensor | None) -> tuple[int, int]:
    """Divisors of KD and CE: real (and, for a loss needing labels, labelled) positions for ``"mean"``; 1, 1 for ``"sum"``."""
    if reduction != "mean":
        return 1, 1
    real = torch.ones(n, dtype=torch.bool, device=device) if flat_mask is None else flat_mask
    kd_count = real if not spec.needs_labels or flat_labels is None else (
        real & (flat_labels != IGNORE_INDEX))
    kd_norm = max(int(kd_count.sum()), 1)
    ce_norm = max(int((real & (flat_labels != IGNORE_INDEX)).sum()), 1) if flat_labels is not None else 1
    return kd_norm, ce_norm


def _autograd_chunk(plan: _ChunkPlan, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t_c: Any,
                    y: torch.Tensor | None, want_any: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """The registered loss under autograd on one chunk: any loss, any teacher signal."""
    with torch.enable_grad():
        logits = upcast(torch.nn.functional.linear(h, w, b)).requires_grad_(want_any)
        total = logits.new_zeros(())
        kd = ce = total.detach()
        if plan.kd_scale != 0:
            kd = plan.loss_fn(logits, t_c, labels=y, temperature=plan.temperature, reduction="sum",
                              **plan.loss_params)
            total = total + kd * plan.c_kd
        if plan.ce_scale != 0:
            ce = cross_entropy(logits, None, labels=y, reduction="sum")
            total = total + ce * plan.c_ce
        elif plan.log_ce:  # logged only: its value, no gradient
            ce = cross_entropy(logits.detach(), None, labels=y, reduction="sum")
        g = torch.autograd.grad(total, logits)[0] if want_any and total.requires_grad else None
    return kd.detach(), ce.detach(), g, 1.0


def _chunk_loss(plan: _ChunkPlan, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t_c: Any,
                y: torch.Tensor | None, want_any: bool, ws: _Workspace | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """KD and CE sums of one chunk and ``alpha, G`` (``alpha * G`` the logits' gradient), by the planned path."""
    res = None
    if plan.sparse_cf:
        res = _sparse_closed_form_chunk(h, w, b, t_c, y, plan.loss_fn, plan.loss_params, plan.temperature, plan.c_kd,
                                        plan.c_ce, want_any, ws, plan.log_ce)
    elif plan.use_closed_form:
        res = _closed_form_chunk(h, w, b, t_c, y, plan.kernel, plan.temperature, plan.c_kd, plan.c_ce, ws,
                                 plan.log_ce)
    if res is None:  # another loss, a sparse teacher, or a non-finite value (diagnosed there)
        res = _autograd_chunk(plan, h, w, b, t_c, y, want_any)
    return res


class _GradSink:
    """Gradients of the hidden states, LM-head weight and bias, accumulated chunk by chunk."""

    def __init__(self, h_all: torch.Tensor, w: torch.Tensor, want_h: bool, want_w: bool, want_b: bool,
                 acc: torch.dtype) -> None:
        self.g_h = torch.zeros_like(h_all) if want_h else None
        self.g_w = torch.empty(w.shape, dtype=acc, device=w.device) if want_w else None
        self.g_w_written = False  # the first chunk's product is written into g_w (no [V, H] zero fill)
        self.g_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if want_b else None

    def add(self, g: torch.Tensor, alpha: float, h: torch.Tensor, w: torch.Tensor, sl: slice,
            idx: torch.Tensor | None) -> None:
        """``dL/dh_c = alpha g W`` into the chunk's rows, ``dL/dW += alpha g^T h_c``, ``dL/db += alpha sum g``."""
        g_low = g.to(h.dtype)
        if self.g_h is not None:
            gh = torch.mm(g_low, w)
            if alpha != 1.0:
                gh.mul_(alpha)
            if idx is None:
                self.g_h[sl] = gh
            else:
                self.g_h[sl].index_copy_(0, idx, gh)
        g_w = self.g_w
        if g_w is not None:  # beta=0 on the first write: g_w's uninitialised content is ignored
            if g_w.dtype == h.dtype:
                g_w.addmm_(g_low.t(), h, beta=1.0 if self.g_w_written else 0.0, alpha=alpha)
            elif self.g_w_written:
                g_w.add_((g_low.t() @ h).to(g_w.dtype), alpha=alpha)
            else:
                g_w.copy_(g_low.t() @ h).mul_(alpha)
            self.g_w_written = True
        if self.g_b is not None:
            self.g_b.add_(g.sum(0).to(self.g_b.dtype), alpha=alpha)

    def finish(self, h_all: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The gradients in the parameters' dtypes (empty tensors for those not wanted)."""
        g_h = torch.empty(0, device=h_all.device) if self.g_h is None else self.g_h
        if self.g_w is not None and not self.g_w_written:
            self.g_w.zero_()
        g_w = torch.empty(0, device=w.device) if self.g_w is None else self.g_w.to(w.dtype)
        g_b = None if self.g_b is None else self.g_b.to(b.dtype)
        return g_h, g_w, g_b


def _chunk_workspace(plan: _ChunkPlan, h_all: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
                     ) -> _Workspace | None:
    """Reused ``[rows, V]`` buffers for the closed forms on CPU in float32 (None otherwise)."""
    if ((plan.kernel is not None or plan.sparse_cf) and h_all.device.type == "cpu"
            and h_all.dtype == w.dtype == torch.float32 and (b is None or b.dtype == torch.float32)):
        return _Workspace(min(plan.rows, plan.n), plan.vocab, h_all.device)
    return None


def _run_chunks(plan: _ChunkPlan, h_all: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """The chunk loop: ``(weighted, kd, ce, g_hidden, g_weight, g_bias)`` of the whole call."""
    want_h = h_all.requires_grad
    want_w = w.requires_grad
    want_b = b is not None and b.requires_grad
    want_any = want_h or want_w or want_b
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    h_all, w = h_all.detach(), w.detach()
    b = None if b is None else b.detach()
    grads = _GradSink(h_all, w, want_h, want_w, want_b, acc)
    kd_total = torch.zeros((), dtype=acc, device=h_all.device)
    ce_total = torch.zeros((), dtype=acc, device=h_all.device)
    ws = _chunk_workspace(plan, h_all, w, b)
    flat_mask, flat_labels, n, rows = plan.flat_mask, plan.flat_labels, plan.n, plan.rows
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        idx = None  # masked positions are dropped before the LM head: no work, no gradient
        if flat_mask is not None and (not plan.checks or not bool(flat_mask[sl].all())):
            idx = flat_mask[sl].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
        h = h_all[sl] if idx is None else h_all[sl].index_select(0, idx)
        y = None if flat_labels is None else (flat_labels[sl] if idx is None else flat_labels[sl][idx])
        t_c = _teacher_chunk(plan.teacher, sl, idx, ws) if plan.kd_scale != 0 else None
        kd_c, ce_c, g, alpha = _chunk_loss(plan, h, w, b, t_c, y, want_any, ws)
        kd_total += kd_c.to(acc)
        ce_total += ce_c.to(acc)
        if g is None or not want_any:
            continue
        grads.add(g, alpha, h, w, sl, idx)
        del g
    kd_out = kd_total / plan.kd_norm
    ce_out = ce_total / plan.ce_norm
    weighted = plan.kd_scale * kd_out + plan.ce_scale * ce_out
    return (weighted, kd_out, ce_out, *grads.finish(h_all, w, b))
