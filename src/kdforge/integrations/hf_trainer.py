"""kdforge losses inside Hugging Face ``Trainer`` (and TRL trainers built on it).

:class:`KDTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` distils: the teacher is
either a frozen module (put on the student's device, in eval mode, without gradients; never
wrapped by DDP/FSDP) or the cached top-k carried by the batch (``teacher_ids`` /
``teacher_logprobs``, see :mod:`kdforge.teachers.cache`). The loss is
:func:`~kdforge.integrations.loss.distillation_loss` (any loss of :data:`kdforge.losses.LOSSES`)
normalised by Trainer's ``num_items_in_batch``, so gradient accumulation gives the gradient of
the whole accumulated batch (4 micro-batches of 2 = 1 batch of 8, whatever the token counts).

The loss logic lives in :class:`KDLossMixin`, so other Trainer subclasses (TRL's ``SFTTrainer``:
``class KDSFTTrainer(KDLossMixin, SFTTrainer)``) get it by inheritance.

Logged during training (token-weighted over each logging window): ``kd`` and ``ce``.
Added to evaluation metrics: ``{prefix}_kd``, ``{prefix}_kl_to_teacher`` (forward KL at T = 1)
and ``{prefix}_nll`` (held-out cross-entropy), which :class:`TeacherHackingCallback` watches.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from kdforge.errors import ConfigError, DataError
from kdforge.integrations.callbacks import TeacherHackingCallback
from kdforge.integrations.loss import (
    KDLossOutput,
    distillation_loss,
    distillation_loss_from_hidden,
    sparse_teacher_from_batch,
)
from kdforge.losses.registry import LOSSES

__all__ = ["KDLossMixin", "KDTrainer", "TeacherHackingCallback", "distillation_loss"]

log = logging.getLogger(__name__)

#: Batch keys that are not student inputs.
_NOT_INPUTS = ("labels", "shift_labels", "num_items_in_batch")


class KDLossMixin:
    """``compute_loss`` that distils; mix in before a ``transformers.Trainer`` subclass.

    Keyword args (all others go to the Trainer):
        teacher: a frozen causal LM, or None to read the cached top-k from each batch.
        loss: a name of :data:`kdforge.losses.LOSSES`.
        kd_weight, ce_weight: weights of the KD and cross-entropy sums (no hidden mixing).
        temperature: KD temperature (None: the loss's default).
        loss_params: extra loss parameters (``{"beta": 0.5}``, ``{"sparse_policy": ...}``).
        chunk_size: None computes the student's logits; an int or ``"auto"`` uses the chunked
            path (hidden states + LM head, :func:`kdforge.losses.chunked_distillation_loss`).
        vocab_policy: ``"exact"`` or ``"shared_prefix"`` (dense teacher with padded embeddings).
        teacher_keys: the batch keys of a cache: ids, logprobs, num_exact.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        loss: str = "forward_kl",
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        temperature: float | None = None,
        loss_params: dict[str, Any] | None = None,
        chunk_size: int | str | None = None,
        vocab_policy: str = "exact",
        teacher_keys: tuple[str, str, str] = ("teacher_ids", "teacher_logprobs", "teacher_num_exact"),
        **kwargs: Any,
    ) -> None:
        if loss not in LOSSES:
            LOSSES.get(loss)  # raises the registry's did-you-mean error
        super().__init__(*args, **kwargs)
        self.kd_loss, self.kd_weight, self.ce_weight = loss, float(kd_weight), float(ce_weight)
        self.kd_temperature, self.kd_params = temperature, dict(loss_params or {})
        self.chunk_size, self.vocab_policy, self.teacher_keys = chunk_size, vocab_policy, tuple(teacher_keys)
        # Trainer counts num_items_in_batch (and trusts the loss to be normalised by it) only for
        # models "accepting loss kwargs"; this compute_loss always normalises by it.
        self.model_accepts_loss_kwargs = True
        self.teacher = self._freeze(teacher) if teacher is not None else None
        self._train_sums = torch.zeros(3, dtype=torch.float64)  # kd, ce, positions
        self._eval_sums = torch.zeros(4, dtype=torch.float64)  # kd, kl_to_teacher, nll, positions

    # ---- teacher --------------------------------------------------------------------------------

    def _freeze(self, teacher: nn.Module) -> nn.Module:
        if getattr(teacher, "hf_device_map", None) is None:  # a device_map teacher stays where it is
            teacher = teacher.to(self.args.device)
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    def teacher_signal(self, inputs: dict[str, Any]) -> Any:
        """Dense logits of the frozen teacher, or the batch's cached top-k as a SparseTeacher."""
        if self.kd_weight == 0:
            return None
        if self.teacher is None:
            ids, lp, exact = self.teacher_keys
            return sparse_teacher_from_batch(inputs, 0, ids_key=ids, logprobs_key=lp, num_exact_key=exact)
        device = next(self.teacher.parameters()).device
        kwargs = {k: inputs[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")
                  if torch.is_tensor(inputs.get(k))}
        with torch.no_grad():
            out = self.teacher(**kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    # ---- datasets keep the cache keys ----------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self.teacher_keys, "labels"]))

    # ---- the loss ---------------------------------------------------------------------------------

    def _train_params(self, num_items: Any) -> dict[str, Any]:
        return {"loss": self.kd_loss, "kd_weight": self.kd_weight, "ce_weight": self.ce_weight,
                "temperature": self.kd_temperature, "num_items_in_batch": num_items, **self.kd_params}

    def _loss(self, model: nn.Module, student_inputs: dict[str, Any], teacher: Any, labels: torch.Tensor,
              params: dict[str, Any]) -> tuple[KDLossOutput, Any]:
        if self.chunk_size is None:
            outputs = model(**student_inputs)
            return distillation_loss(outputs, teacher, labels, vocab_policy=self.vocab_policy, **params), outputs
        try:
            outputs = model(**student_inputs, output_hidden_states=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            outputs = model(**student_inputs, output_hidden_states=True)
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None:
            raise ConfigError(f"{type(model).__name__} returned no hidden_states, which chunk_size needs",
                              "use a Hugging Face causal LM, or chunk_size=None")
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        out = distillation_loss_from_hidden(hidden[-1], head.weight, teacher, labels, chunk_size=self.chunk_size,
                                            lm_head_bias=getattr(head, "bias", None), **params)
        return out, outputs

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """Distillation loss of one micro-batch (normalised by ``num_items_in_batch`` when given)."""
        labels = inputs.get("labels")
        if labels is None:
            raise DataError(f"the batch has no 'labels' (keys: {sorted(inputs)})",
                            "collate labels [B, T] (-100 where there is no target), e.g. with KDCollator")
        teacher = self.teacher_signal(inputs)
        skip = {*_NOT_INPUTS, *self.teacher_keys}
        student_inputs = {k: v for k, v in inputs.items() if k not in skip}
        out, outputs = self._loss(model, student_inputs, teacher, labels, self._train_params(num_items_in_batch))
        loss = out.loss
        if (num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False)
                and self.accelerator.num_processes > 1):
            # num_items_in_batch counts every rank's tokens; DDP averages gradients over ranks
            loss = loss * self.accelerator.num_processes
        self._record(model, out, outputs, student_inputs, teacher, labels)
        return (loss, outputs) if return_outputs else loss

    def _record(self, model: nn.Module, out: KDLossOutput, outputs: Any, student_inputs: dict[str, Any],
                teacher: Any, labels: torch.Tensor) -> None:
        n = out.num_items
        n = float(n.detach().float().mean()) if torch.is_tensor(n) else float(n)
        positions = float(out.num_positions)
        if model.training:
            self._train_sums += torch.tensor([float(out.kd) * n, float(out.ce) * n, positions], dtype=torch.float64)
            return
        fidelity = {"loss": "forward_kl", "temperature": 1.0, "kd_weight": 1.0 if teacher is not None else 0.0,
                    "ce_weight": 1.0, "num_items_in_batch": None}
        with torch.no_grad():  # held-out fidelity: forward KL at T = 1 and NLL, per token
            if self.chunk_size is None:  # the logits are there: no second forward
                fid = distillation_loss(outputs, teacher, labels, vocab_policy=self.vocab_policy, **fidelity)
            else:
                fid, _ = self._loss(model, student_inputs, teacher, labels, fidelity)
        m = max(positions, 1.0)
        self._eval_sums += torch.tensor([float(out.kd) * n, float(fid.kd) * m, float(fid.ce) * m, positions],
                                        dtype=torch.float64)

    # ---- logging ----------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._train_sums[2] > 0 and "loss" in logs:
            kd, ce, positions = self._train_sums.tolist()
            logs = {**logs, "kd": kd / positions, "ce": ce / positions}
            self._train_sums.zero_()
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        self._eval_sums.zero_()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        kd, kl, nll, positions = self._eval_sums.tolist()
        if positions > 0:
            output.metrics[f"{prefix}_kd"] = kd / positions
            output.metrics[f"{prefix}_nll"] = nll / positions
            if self.kd_weight != 0:
                output.metrics[f"{prefix}_kl_to_teacher"] = kl / positions
        return output


class KDTrainer(KDLossMixin, Trainer):
    """``transformers.Trainer`` that trains the student by distillation.

    Example:
        >>> trainer = KDTrainer(model=student, args=TrainingArguments("out", gradient_accumulation_steps=4),
        ...                     train_dataset=ds, data_collator=KDCollator(tok.pad_token_id),
        ...                     teacher=teacher, loss="forward_kl", kd_weight=1.0, ce_weight=0.0)
        >>> trainer.train()
    """
