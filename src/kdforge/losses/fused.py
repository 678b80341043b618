"""Closed-form chunk kernels by loss (kept for imports; the kernels now live with their loss).

The closed forms are written once, next to each divergence in :mod:`kdforge.losses.divergences`;
their shared machinery (:class:`KernelOut`, ``ClosedForm``, :func:`rowdot`, ``torch.compile``)
is :mod:`kdforge.losses.closed_form`; which loss has one, and for which parameter values, is
its spec's ``kernel`` (:meth:`kdforge.losses.spec.LossSpec.kernel_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kdforge.errors import ConfigError
from kdforge.losses.closed_form import FusedKernel, KernelOut, compiled_kernel, rowdot
from kdforge.losses.divergences import forward_kl_kernel, reverse_kl_kernel
from kdforge.losses.spec import loss_spec

__all__ = ["FusedKernel", "KernelOut", "compiled_kernel", "forward_kl_kernel", "fused_kernel_for",
           "reverse_kl_kernel", "rowdot"]


def fused_kernel_for(loss: str | Callable[..., torch.Tensor], teacher: Any, params: dict[str, Any]
                     ) -> FusedKernel | None:
    """The closed-form kernel computing ``loss(**params)`` on a dense teacher, or None.

    ``loss_spec(loss).kernel_for(teacher, params)``; None too for an unknown loss name.
    """
    try:
        spec = loss_spec(loss)
    except ConfigError:
        return None
    return spec.kernel_for(teacher, params)
