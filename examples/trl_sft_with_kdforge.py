"""Distil inside TRL's ``SFTTrainer`` with kdforge's cached teacher top-k and chunked loss.

TRL owns the loop (optimizer, accumulation, logging, saving, PEFT); kdforge supplies

* the teacher signal: a top-k cache built once with ``kdforge cache-teacher`` (no teacher in
  memory while the student trains), read here as a ``datasets.Dataset`` with the columns
  ``input_ids``, ``labels``, ``teacher_ids``, ``teacher_logprobs``;
* the loss: ``KDLossMixin.compute_loss`` -> any loss of ``kdforge.losses.LOSSES``, computed
  from the student's hidden states chunk by chunk (``chunk_size="auto"``: the ``[B, T, V]``
  logits never exist at once), normalised by Trainer's ``num_items_in_batch``;
* the collator that pads the cache columns with the tokens (``KDCollator``).

Run (after ``kdforge cache-teacher CACHE.yaml`` wrote ``CACHE_DIR``)::

    python examples/trl_sft_with_kdforge.py --cache CACHE_DIR --student PATH_OR_HUB_ID \\
        --output-dir outputs/trl_kd --max-steps 200 --loss forward_kl

The student must share the teacher's tokenizer (the cache stores token ids).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from kdforge.integrations import KDCollator, KDLossMixin

log = logging.getLogger("trl_sft_with_kdforge")

COLUMNS = ("input_ids", "labels", "teacher_ids", "teacher_logprobs")


class KDSFTTrainer(KDLossMixin, SFTTrainer):
    """TRL's SFTTrainer whose loss is kdforge's distillation loss (teacher = the cached top-k)."""


def cache_as_dataset(items: Iterable[Mapping[str, Any]]):
    """A ``datasets.Dataset`` of cached sequences (e.g. ``TeacherCacheDataset`` items)."""
    import datasets

    def rows():
        for item in items:
            yield {key: (item[key].tolist() if torch.is_tensor(item[key]) else item[key]) for key in COLUMNS}

    return datasets.Dataset.from_generator(rows)


def build_trainer(model: Any, train_dataset: Any, tokenizer: Any, *, output_dir: str,
                  loss: str = "forward_kl", chunk_size: int | str | None = "auto", max_steps: int = 100,
                  batch_size: int = 4, accumulation: int = 1, learning_rate: float = 1e-4,
                  ce_weight: float = 0.0, temperature: float | None = None, **sft_args: Any) -> KDSFTTrainer:
    """The core of the example: an SFTTrainer distilling from cached top-k with the chunked loss."""
    args = SFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=learning_rate, report_to=[],
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenised: the cache holds the tokens
        **sft_args,
    )
    return KDSFTTrainer(model=model, args=args, train_dataset=train_dataset,
                        processing_class=tokenizer, data_collator=KDCollator(pad_token_id=tokenizer.pad_token_id or 0),
                        teacher=None, loss=loss, ce_weight=ce_weight, temperature=temperature,
                        chunk_size=chunk_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="teacher cache folder (kdforge cache-teacher)")
    parser.add_argument("--student", required=True, help="student: local folder or Hub id")
    parser.add_argument("--output-dir", default="outputs/trl_kd")
    parser.add_argument("--loss", default="forward_kl", help="a name of `kdforge losses`")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--ce-weight", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.teachers import TeacherCacheDataset

    cache = TeacherCacheDataset(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    trainer = build_trainer(student, cache_as_dataset(cache[i] for i in range(len(cache))), tokenizer,
                            output_dir=args.output_dir, loss=args.loss,
                            max_steps=args.max_steps, batch_size=args.batch_size, accumulation=args.accumulation,
                            learning_rate=args.learning_rate, ce_weight=args.ce_weight)
    trainer.train()
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    log.info("student saved to %s", args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
