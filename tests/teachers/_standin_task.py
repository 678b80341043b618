"""A stand-in for the causal-LM task object a TeacherSource receives (until train/tasks.py has it).

It implements exactly the three methods the source contract uses:

* ``model_inputs(batch) -> ((), {"input_ids", "attention_mask"})``,
* ``to_loss_positions(x, batch, what=...)``: ``[B, T, ...]`` -> ``[B, T-1, ...]`` (position ``t``
  predicts token ``t + 1``); a tensor already ``[B, T-1, ...]`` is kept,
* ``check_inputs(model, batch, who)``: ids inside the model's vocabulary.
"""

from __future__ import annotations


class CausalLMTask:
    def model_inputs(self, batch):
        kwargs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        return (), kwargs

    def to_loss_positions(self, x, batch, what="tensor"):
        t = batch["input_ids"].shape[1]
        if x.shape[1] == t - 1:
            return x
        assert x.shape[1] == t, f"{what}: {tuple(x.shape)} does not fit input_ids {tuple(batch['input_ids'].shape)}"
        return x[:, :-1]

    def check_inputs(self, model, batch, who):
        vocab = model.get_input_embeddings().num_embeddings
        assert int(batch["input_ids"].max()) < vocab, f"{who}: ids outside the vocabulary"


class ClassifierTask:
    """Classifier semantics: ``model(inputs)``; one loss position per sample (kept as is)."""

    def model_inputs(self, batch):
        return (batch["inputs"],), {}

    def to_loss_positions(self, x, batch, what="tensor"):
        return x

    def check_inputs(self, model, batch, who):
        return None
