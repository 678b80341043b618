"""Bad-input rows: training on nothing, and non-finite numbers (issue 16, items 2 and 6).

Data whose labels are all ignored must stop with a DataError naming the data and the fix, not
"succeed" with weights that never moved; a NaN/Inf loss or gradient must stop before the update,
naming the term, the step and the micro-batch, and leave the last checkpoint as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError, DataError, NonFiniteError

from ._corpus import LLM_KD_OK, MLP, Case, Rows, World, cli_case, run_yaml, tiny_llama


class _Unlabelled(torch.utils.data.Dataset):
    """Token rows whose labels are all -100 (e.g. a chat mask that matched nothing)."""

    def __init__(self, n: int) -> None:
        self.ids = torch.randint(3, 256, (n, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": torch.full_like(self.ids[i], -100)}


def _lm_on_nothing(n: int, **cfg: Any):
    def setup(w: World):
        from kdforge.train import CausalLMTask, Distiller, TrainConfig

        d = Distiller(tiny_llama(seed=1), None, task=CausalLMTask(),
                      objective=[{"name": "cross_entropy", "weight": 1.0}],
                      config=TrainConfig(max_steps=40, batch_size=2, progress=False, **cfg), train_data=_Unlabelled(n))
        return d.train, []

    return setup


class _NanFrom(nn.Module):
    """An MLP whose logits are NaN (or whose gradient is Inf) from forward call ``at`` on."""

    def __init__(self, at: int, grad: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.at, self.grad, self.calls = MLP(), at, grad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        if self.calls >= self.at:
            out = _Blowup.apply(out) if self.grad else out * float("nan")
        return out


class _Blowup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * float("inf")


def _nonfinite_run(at: int, *, grad: bool = False, loss_checks: bool = True, **cfg: Any):
    """A run checkpointed at step 2 resumes; from step ``at`` (>= 3) on the logits are NaN (or
    the gradient Inf)."""

    def setup(w: World):
        from kdforge.train import ClassificationTask, Distiller, TrainConfig
        from kdforge.train.sampler import EpochSampler

        out = w.tmp / "run"
        term = {"name": "cross_entropy", "weight": 1.0, "params": {} if loss_checks else {"check_finite": False}}

        def make(student: nn.Module, steps: int) -> Distiller:
            return Distiller(student, None, task=ClassificationTask(), objective=[term],
                             config=TrainConfig(max_steps=steps, batch_size=4, progress=False, output_dir=str(out),
                                                save_every=2, keep_last=5, **cfg),
                             train_data=Rows(), sampler=EpochSampler(12, shuffle=False))

        make(_NanFrom(10**9), 2).train()
        d = make(_NanFrom(at - 2, grad), 12)  # forward call 1 after the resume is step 3
        return (lambda: d.train(resume=True)), [out / "checkpoints" / "step-2"]

    return setup


TRAINING_CASES: list[Case] = [
    # ---- training on nothing ----------------------------------------------------------------
    Case("noop-all-labels-ignored", "noop", DataError, ("first 32 micro-batches", "_unlabelled, 80 examples",
                                                        "no real position"),
         ("ignore_index", "empty_start_batches"), _lm_on_nothing(80)),
    Case("noop-whole-epoch-without-labels", "noop", DataError, ("a whole epoch", "4 micro-batches in a row"),
         ("ignore_index",), _lm_on_nothing(8, empty_start_batches=None)),
    Case("noop-few-empty-batches-still-a-whole-epoch", "noop", DataError, ("a whole epoch", "2 micro-batches"),
         ("chat template",), _lm_on_nothing(4, empty_start_batches=100)),
    # ---- non-finite numbers -----------------------------------------------------------------
    Case("nonfinite-loss-term-at-a-step", "nonfinite", NonFiniteError,
         ("loss term 'cross_entropy' is nan", "step 4", "micro-batch 0", "epoch 1, batch 0"),
         ("learning rate", "on_nonfinite: skip"), _nonfinite_run(4, loss_checks=False)),
    Case("nonfinite-student-logits-at-a-step", "nonfinite", NonFiniteError,
         ("student logits contain nan", "step 3", "epoch 0, batch 2"), ("learning rate", "checkpoint"),
         _nonfinite_run(3)),
    Case("nonfinite-gradient", "nonfinite", NonFiniteError, ("gradient is not finite", "step 3"),
         ("max_grad_norm",), _nonfinite_run(3, grad=True, max_grad_norm=None)),
    Case("nonfinite-gradient-under-clipping", "nonfinite", NonFiniteError, ("gradient is not finite", "step 5"),
         ("bf16",), _nonfinite_run(5, grad=True)),
    Case("nonfinite-too-many-skips", "nonfinite", NonFiniteError,
         ("3 steps in a row were not finite", "max_nonfinite_skips=2"), ("resume",),
         _nonfinite_run(3, loss_checks=False, on_nonfinite="skip", max_nonfinite_skips=2)),
    Case("nonfinite-too-many-skips-own-check", "nonfinite", NonFiniteError,
         ("student logits contain nan", "2 steps in a row", "max_nonfinite_skips=1"), ("on_nonfinite",),
         _nonfinite_run(3, on_nonfinite="skip", max_nonfinite_skips=1)),
    # ---- their settings ---------------------------------------------------------------------
    cli_case("config-bad-on-nonfinite", "config", ConfigError, ("train.on_nonfinite", "ignore"),
             ("edit the keys",), run_yaml(LLM_KD_OK + "train: {on_nonfinite: ignore, max_steps: 2}\n")),
    cli_case("config-zero-nonfinite-skips", "config", ConfigError, ("train.max_nonfinite_skips",),
             ("edit the keys",), run_yaml(LLM_KD_OK + "train: {max_nonfinite_skips: 0, max_steps: 2}\n")),
    cli_case("config-zero-empty-start-batches", "config", ConfigError, ("train.empty_start_batches",),
             ("edit the keys",), run_yaml(LLM_KD_OK + "train: {empty_start_batches: 0, max_steps: 2}\n")),
]
