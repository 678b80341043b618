"""A student with a second (auxiliary) classifier head, for dual-head KD (:mod:`kdforge.losses.dual_head`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdforge.errors import ConfigError

__all__ = ["DualHeadStudent", "find_head"]


def find_head(model: nn.Module, head: str | None = None) -> tuple[str, nn.Linear]:
    """``(path, module)`` of the classifier head: the module at ``head``, or the last ``nn.Linear``."""
    if head is not None:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"dual-head student: {head!r} is not an nn.Linear of the model",
                              "name the classifier head's module path, e.g. 'head' or 'net.7'")
        return head, module
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("dual-head student: the model has no nn.Linear classifier head",
                          "give a model whose logits come from an nn.Linear, or name it with head=...")
    return linears[-1]


class DualHeadStudent(nn.Module):
    """``model`` plus an auxiliary head over the main head's input features.

    ``forward(x)`` returns the main head's logits, unchanged (so the trainer, the teacher-width
    checks and evaluation see the ordinary student); in training mode it also keeps the auxiliary
    head's logits of that forward pass, which :meth:`take_aux` hands to the ``dual_head_kd`` loss
    (``params: {heads: <this module>}``, set by the recipes). :attr:`model` is the original model,
    unchanged in structure: the deployed student (the auxiliary head exists for training only, as
    in the paper).

    Args:
        model: the student; its logits must be the output of an ``nn.Linear`` head.
        head: module path of that head (None: the last ``nn.Linear``).
        init: ``"copy"`` starts the auxiliary head as a copy of the main head, ``"fresh"`` with a
            newly initialised one (PyTorch's default init; draws from the global RNG).
    """

    def __init__(self, model: nn.Module, head: str | None = None, init: str = "fresh") -> None:
        super().__init__()
        if init not in ("fresh", "copy"):
            raise ConfigError(f"DualHeadStudent init must be 'fresh' or 'copy', got {init!r}", "use init='fresh'")
        self.model = model
        self.head_path, main = find_head(model, head)
        if init == "copy":
            self.aux_head = copy.deepcopy(main)
        else:
            self.aux_head = nn.Linear(main.in_features, main.out_features, bias=main.bias is not None,
                                      device=main.weight.device, dtype=main.weight.dtype)
        self._features: torch.Tensor | None = None
        self._aux: torch.Tensor | None = None
        main.register_forward_hook(self._keep_input)

    def _keep_input(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.training and torch.is_grad_enabled():
            self._features = args[0]

    def forward(self, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003 - the model's own inputs
        self._features = None
        main = self.model(*args, **kwargs)
        features, self._features = self._features, None
        if self.training and torch.is_grad_enabled():
            if features is None:
                raise ConfigError("DualHeadStudent: the main head did not run in the forward pass",
                                  "name the classifier head with head=... (the module whose output is the logits)")
            self._aux = self.aux_head(features)
        return main

    def take_aux(self) -> torch.Tensor:
        """The auxiliary logits of the last training forward pass (handed over once)."""
        aux, self._aux = self._aux, None
        if aux is None:
            raise ConfigError("dual_head_kd: the DualHeadStudent ran no training forward pass since the last loss",
                              "compute the loss right after the student's forward pass, in training mode")
        return aux
