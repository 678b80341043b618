"""Machinery of the closed-form chunk kernels: a divergence's value *and* gradient in one pass.

:func:`kdforge.losses.chunked.chunked_distillation_loss` needs, for each chunk of ``r`` positions,
the loss *and* its gradient w.r.t. the chunk's student logits ``z_s`` (``[r, V]``). Running the
registered loss under autograd costs its forward (two log-softmaxes, the mixture, the KL terms)
plus autograd's backward, each a handful of passes over ``[r, V]`` with fresh temporaries. For the
main divergences the gradient has a short closed form, computed in the same pass as the value
(Liger-Kernel's approach for its fused JSD), reusing every ``exp``/``log`` and working in place.

The closed forms themselves live next to their loss (:mod:`kdforge.losses.divergences`), each
written once as ``fn(logq, q, t, *args) -> (per_pos, G)``; this module holds what they share:
:class:`KernelOut`, :class:`ClosedForm` (binds the parameters and the gradient's scale, and
compiles the *same* function with ``torch.compile`` on request) and :func:`rowdot`.

Notation (per position; sums run over the vocabulary): ``s = z_s / T``, ``t = z_t / T``,
``log q = log_softmax(s)``, ``log p = log_softmax(t)``. Every divergence loss is
``L = T^2 D(p, q)``, so ``dL/dz_s = T dD/ds``, and for any ``D`` that depends on ``s`` through ``q``,

    ``dD/ds_j = q_j (g_j - sum_i q_i g_i)``  with ``g = dD/dq``   (softmax Jacobian).

Numerics: everything is float32 (float64 stays float64) whatever the logits' dtype; ``log q``
and ``log p`` come from the log-softmax (never ``log(exp(.))``), so logits of ``+-1e4`` stay
finite; a mixture ``m`` is clamped at the dtype's smallest normal number (:func:`tiny`) before
its log, which changes terms only where ``q`` (and ``p``) are below ``1e-38`` and multiply them
to zero. A kernel returns per-position values; the caller checks them and falls back to the
autograd path (which handles ``-inf`` teacher logits and raises the diagnosed
:class:`~kdforge.errors.NonFiniteError`) when one is not finite, so the fast path never changes
what a user sees on bad inputs.

Writing a closed form: in-place ops on the kernel's own temporaries, ``out=`` into them and
overwriting ``logq`` are all fine, eagerly and under ``torch.compile`` (TorchInductor turns them
back into a functional graph); row sums go through :func:`rowdot`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kdforge.errors import ConfigError

__all__ = ["COMPILE_ENV", "ClosedForm", "FusedKernel", "KernelOut", "compiled_kernel", "compiler_available",
           "log_softmax_into", "resolve_compile", "rowdot", "softmax_into", "tiny"]

logger = logging.getLogger(__name__)

#: Environment variable overriding ``compile_kernels="auto"``: ``0`` keeps the kernels eager, ``1``
#: compiles them wherever ``auto`` would not decide so itself (an explicit True/False always wins).
COMPILE_ENV = "KDFORGE_COMPILE_KERNELS"


@dataclass
class KernelOut:
    """Result of a closed-form kernel on one chunk.

    Attributes:
        per_pos: ``[r]`` values of ``D`` (not yet times ``T^2``).
        grad: ``[r, V]`` buffer ``G`` with ``dD/ds = scale * G``.
        scale: python float multiplying ``grad``.
    """

    per_pos: torch.Tensor
    grad: torch.Tensor
    scale: float


#: ``kernel(logq, q, t) -> KernelOut``: ``logq``/``q`` the student's ``[r, V]`` log-probabilities
#: and probabilities at ``T`` (``q`` read only: the caller reuses it for a cross-entropy term),
#: ``t`` the teacher's logits divided by ``T`` (read only). The kernel may overwrite ``logq``.
FusedKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], KernelOut]

#: ``fn(logq, q, t, *args[, out=]) -> (per_pos [r], G [r, V])``: one closed form, as written in
#: :mod:`kdforge.losses.divergences`; one that takes ``out`` (a preallocated ``[r, V]`` buffer)
#: returns ``G`` in it when it is given (eagerly: no fresh ``[r, V]`` array).
ClosedFormFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j a_ij b_ij`` per row, ``[r, V] x [r, V] -> [r]``, without an ``[r, V]`` temporary.

    Eagerly on CPU one BLAS dot per row (measured 2x faster than ``(a * b).sum(-1)`` and 3.6x
    faster than a batched ``bmm`` at ``[80, 49152]``, 1 thread); elsewhere, and while
    ``torch.compile`` traces (a Python loop over a dynamic row count cannot be compiled),
    ``torch.linalg.vecdot``, which Inductor fuses into the surrounding loops.
    """
    if not torch.compiler.is_compiling() and a.device.type == "cpu" and a.shape[0] <= 4096:
        return torch.stack([torch.dot(x, y) for x, y in zip(a, b)]) if a.shape[0] else a.new_zeros(0)
    return torch.linalg.vecdot(a, b, dim=-1)


def log_softmax_into(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``log_softmax(x, -1)``, written into ``out`` when given (else a fresh array)."""
    if out is None:
        return torch.log_softmax(x, dim=-1)
    return torch.ops.aten._log_softmax.out(x, -1, False, out=out)


def softmax_into(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``softmax(x, -1)``, written into ``out`` when given (else a fresh array)."""
    if out is None:
        return torch.softmax(x, dim=-1)
    return torch.ops.aten._softmax.out(x, -1, False, out=out)


def tiny(x: torch.Tensor) -> float:
    """The smallest normal number of ``x``'s dtype (the clamp of a mixture before its log)."""
    return torch.finfo(x.dtype).tiny


@dataclass(frozen=True)
class ClosedForm:
    """A closed form bound to its parameters: a :data:`FusedKernel`.

    Attributes:
        fn: ``fn(logq, q, t, *args) -> (per_pos, G)``.
        args: the loss's parameters the closed form reads (e.g. ``(beta,)``), python floats.
        scale: ``dD/ds = scale * G``.
    """

    fn: ClosedFormFn
    args: tuple[float, ...] = ()
    scale: float = 1.0
    #: with an ``out`` buffer, run ``fn``'s own ``out=`` form eagerly even when compiled: for the
    #: closed forms whose eager in-place form allocates nothing and beats Inductor's code (forward
    #: KL, TVD on CPU: benchmarks/closed_form_chunk.py)
    eager_into: bool = False

    def __call__(self, logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor,
                 out: torch.Tensor | None = None) -> KernelOut:
        """The kernel on one chunk; ``out`` (optional, float32 ``[r, V]``, aliasing none of the
        inputs): a buffer the gradient may be written into instead of a fresh array (compiled:
        always, through a second graph or, with ``eager_into``, the eager ``out=`` form; eagerly:
        where the closed form takes ``out``). ``KernelOut.grad`` is then ``out`` or a fresh array;
        an ``out=`` form may also overwrite ``logq`` (as any kernel may)."""
        if out is None:
            per_pos, grad = self.fn(logq, q, t, *self.args)
        elif isinstance(self.fn, _CompiledOrEager) and not (self.eager_into and _takes_out(self.fn.fn)):
            per_pos, grad = self.fn.into(logq, q, t, out, *self.args)
        elif isinstance(self.fn, _CompiledOrEager):
            per_pos, grad = self.fn.fn(logq, q, t, *self.args, out=out)
        elif _takes_out(self.fn):
            per_pos, grad = self.fn(logq, q, t, *self.args, out=out)
        else:
            per_pos, grad = self.fn(logq, q, t, *self.args)
        return KernelOut(per_pos, grad, self.scale)

    def compiled(self) -> ClosedForm:
        """The same closed form through ``torch.compile`` (fused loops; compiled once per
        process and function, dynamic row count: the last chunk is shorter and the real
        positions change between batches). If compiling fails (no working compiler for the
        device), the first call logs a notice and the closed form runs eagerly from then on."""
        if isinstance(self.fn, _CompiledOrEager):
            return self
        if self.fn not in _COMPILED:
            _COMPILED[self.fn] = _CompiledOrEager(self.fn)
        return replace(self, fn=_COMPILED[self.fn])


@functools.lru_cache(maxsize=64)
def _takes_out(fn: Callable[..., Any]) -> bool:
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _written_into(fn: ClosedFormFn) -> Callable[..., torch.Tensor]:
    """``fn`` with its gradient copied into the caller's buffer ``out``: under ``torch.compile``
    the copy is fused into the loop that computes the gradient (no fresh ``[r, V]`` output, whose
    pages a CPU would fault in and zero on every chunk)."""

    def into(logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor, out: torch.Tensor, *args: Any) -> torch.Tensor:
        per_pos, grad = fn(logq, q, t, *args)
        out.copy_(grad)
        return per_pos

    into.__name__ = f"{getattr(fn, '__name__', 'closed_form')}_into"
    return into


class _CompiledOrEager:
    """``torch.compile(fn)``, falling back to ``fn`` for good once compiling it has failed.

    An exception from the compiled call is retried eagerly: if the eager call raises too, the
    input was at fault and its error propagates (compilation stays on); if it succeeds, the
    compiler was at fault, a notice is logged once and ``fn`` runs eagerly from then on. Compile
    errors happen before any kernel runs, so the inputs are untouched when the eager call starts.
    :meth:`into` is the same with the gradient written into a given buffer (a second compiled
    graph, :func:`_written_into`).
    """

    def __init__(self, fn: ClosedFormFn) -> None:
        self.fn = fn
        self.compiled: ClosedFormFn | None = torch.compile(fn, dynamic=True)
        self._into: Callable[..., torch.Tensor] | None = None

    def into(self, logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
             *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        def eager() -> tuple[torch.Tensor, torch.Tensor]:
            if _takes_out(self.fn):
                return self.fn(logq, q, t, *args, out=out)
            return self.fn(logq, q, t, *args)

        if self.compiled is None:
            return eager()
        if self._into is None:
            self._into = torch.compile(_written_into(self.fn), dynamic=True)
        try:
            return self._into(logq, q, t, out, *args), out
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            res = eager()  # raises the input's own error if the input was at fault
            self._give_up(exc)
            return res

    def __call__(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled is None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            out = self.fn(*args)  # raises the input's own error if the input was at fault
            self._give_up(exc)
            return out

    def _give_up(self, exc: Exception) -> None:
        if self.compiled is not None:
            self.compiled = None
            logger.warning("torch.compile of the closed form %s failed (%s: %s); running it eagerly from now on "
                           "(same results; pass compile_kernels=False to skip the attempt)",
                           getattr(self.fn, "__name__", self.fn), type(exc).__name__, str(exc).splitlines()[0][:200]
                           if str(exc) else "")


_COMPILED: dict[Any, _CompiledOrEager] = {}


@functools.lru_cache(maxsize=8)
def _compiler_for(kind: str) -> bool:
    if kind == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - older torch
            return False
        return bool(has_triton())
    if kind == "cpu":
        names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        return any(n and shutil.which(n) for n in names)
    return False


def compiler_available(device: torch.device | str | None) -> bool:
    """Whether ``torch.compile`` has a code generator for ``device``: Triton on CUDA, a C++
    compiler (``$CXX``, ``g++``, ``c++`` or ``clang++`` on the PATH) on CPU; False elsewhere."""
    return _compiler_for("cpu" if device is None else torch.device(device).type)


def resolve_compile(flag: bool | str, device: torch.device | str | None) -> bool:
    """``compile_kernels`` as a bool: True/False as given; ``"auto"`` (the default) compiles where
    :func:`compiler_available` says a compiler exists, unless ``$KDFORGE_COMPILE_KERNELS`` is
    ``0`` (eager) or ``1`` (compile). A failing compile still falls back to eager with a notice."""
    if isinstance(flag, bool):
        return flag
    if flag != "auto":
        raise ConfigError(f"compile_kernels must be true, false or 'auto', got {flag!r}",
                          "use compile_kernels: auto (compile where a compiler is available)")
    env = os.environ.get(COMPILE_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return compiler_available(device)


def compiled_kernel(kernel: FusedKernel) -> FusedKernel | None:
    """A ``torch.compile``-d equivalent of ``kernel`` (any :class:`ClosedForm`), or None."""
    return kernel.compiled() if isinstance(kernel, ClosedForm) else None
