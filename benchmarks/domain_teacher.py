"""A second LM teacher for the multi-teacher evidence: SmolLM2-135M-Instruct adapted to Austen.

Fine-tunes the offline ``smollm2`` asset (its last ``--train-layers`` decoder layers, AdamW, cross-entropy only, through
:class:`kdforge.train.Distiller` without a teacher) on packed blocks of Austen novels that are
neither the quickstart's training novel (Pride and Prejudice) nor its held-out one (Persuasion):
Emma, Sense and Sensibility, Mansfield Park and Northanger Abbey. The result is a "domain-adapted"
checkpoint with the same tokenizer (its held-out perplexity is in the ``llm_kd`` results, row
``teacher / austen``), saved once as a folder that ``teachers: [{name: ..., model:
FOLDER}]`` of ``llm_kd`` reads (``configs/multi_teacher_lm.yaml``).

Run (a few minutes on an idle 2-core CPU)::

    .venv/bin/python benchmarks/domain_teacher.py --out outputs/austen_teacher --steps 12 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

DOCS = ("emma", "sensesensibility", "mansfieldpark", "northangerabbey")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/austen_teacher")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--blocks", type=int, default=512, help="training blocks drawn from the novels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-layers", type=int, default=8,
                        help="train only the last N decoder layers and the final norm (0 = all weights)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


    from kdforge.data.text import LMBlockDataset, make_lm_splits
    from kdforge.models import ModelSource, load_model
    from kdforge.recipes.lm_data import load_corpus_documents
    from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig

    model, tokenizer = load_model(ModelSource(model="smollm2", dtype="float32"), role="student")
    docs = load_corpus_documents("austen")
    splits = make_lm_splits(docs, tokenizer, args.seq_len, train_docs=list(DOCS), eval_docs=["persuasion"],
                            max_train_blocks=args.blocks, max_eval_blocks=1, seed=args.seed)
    model.requires_grad_(args.train_layers == 0)
    if args.train_layers:  # a cheap adaptation: the top layers only (no backward through the rest)
        for layer in model.model.layers[-args.train_layers:]:
            layer.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    model.train()
    out = Path(args.out)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, scheduler="linear",
                      warmup_steps=max(1, args.steps // 10), max_grad_norm=1.0, log_every=2, seed=args.seed,
                      output_dir=str(out / "train"))
    distiller = Distiller(model, None, task=CausalLMTask(), objective=[LossTerm("cross_entropy", 1.0)],
                          config=cfg, train_data=LMBlockDataset(splits.train))

    distiller.train()
    trained = distiller.accelerator.unwrap_model(distiller.student)
    trained.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    record = {"docs": list(DOCS), "steps": args.steps, "lr": args.lr, "blocks": int(splits.train.shape[0])}
    (out / "domain_teacher.json").write_text(json.dumps(record, indent=2))
    logging.info("saved %s: %s", out / "model", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
