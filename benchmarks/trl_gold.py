"""TRL's ``GOLDTrainer`` side by side with kdforge's GOLD hybrid, on the cross_tokenizer_kd setup.

SmolLM2-135M-Instruct teacher -> the recipe's 4-layer student with a 4,096-token byte-level BPE
trained on *Pride and Prejudice*; the training texts are the recipe's 500-character excerpts cut
to what 128 student tokens cover, held-out = *Persuasion*. Both implementations start from the
same student initialisation (``build_student(..., seed)``), read the same texts (each shuffles
them with the seed, in its own order), with the same optimiser settings (AdamW, lr, linear schedule with warm-up,
grad-norm clip), and are scored by kdforge's evaluator (:func:`kdforge.recipes.cross_tokenizer.evaluate`:
held-out perplexity on the student's tokens, top-1 agreement at aligned positions).

* ``--impl trl``: ``trl.experimental.gold.GOLDTrainer`` with ``use_uld_loss`` +
  ``uld_use_hybrid_loss`` (exact matching on the shared tokens, ULD on the rest),
  ``uld_crossentropy_weight=1`` (the labels' CE, as kdforge's ``cross_entropy`` term) and
  ``lmbda=0`` (off-policy only: the dataset's texts, no student generation).
* ``--impl kdforge``: :class:`~kdforge.train.Distiller` with ``cross_entropy + gold`` and the live
  :class:`~kdforge.teachers.CrossTokenizerTeacher` (the teacher runs every step, as in TRL).
* ``--impl both`` (default): each in its own process (so peak RSS is per implementation), one JSON.

Prints JSON: held-out ppl / agreement, seconds per step (training loop only, after model
loading) and the process's peak RSS.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/trl_gold.py --steps 6 --texts 48 --eval-texts 16

Results and what GOLDTrainer needs here: docs/cross-tokenizer.md ("Side by side with TRL's GOLDTrainer").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    from kdforge.recipes.cross_tokenizer import (
        StudentSpec,
        build_student,
        cut_texts,
        teacher_top_tokens,
        train_bpe,
    )
    from kdforge.recipes.llm_kd import TeacherSpec, load_documents, load_teacher
    from kdforge.teachers import CrossTokenizerCollator, CrossTokenizerTeacher
    from kdforge.teachers.crosstok import encode_student

    docs = load_documents("austen")
    student_tok = train_bpe([docs["prideprejudice"]], 4096)
    texts = cut_texts(docs["prideprejudice"], 500, args.texts)[: args.texts]
    covered = encode_student(texts, student_tok, max_length=args.seq_len)[1]  # what the student's tokens cover
    eval_texts = cut_texts(docs["persuasion"], 500, args.eval_texts)[: args.eval_texts]
    teacher, teacher_tok = load_teacher(TeacherSpec(model="smollm2"))
    source = CrossTokenizerTeacher(teacher, teacher_tok, student_tok)
    collate = CrossTokenizerCollator(student_tok, teacher_tok, max_length=args.seq_len)
    eval_batches = [collate(eval_texts[i: i + 8]) for i in range(0, len(eval_texts), 8)]
    tops = [teacher_top_tokens(source, b) for b in eval_batches]
    student = build_student(StudentSpec(), len(student_tok), args.seed)
    return {"student_tok": student_tok, "teacher": teacher, "teacher_tok": teacher_tok, "texts": covered,
            "source": source, "collate": collate, "eval_batches": eval_batches, "tops": tops, "student": student}


def train_kdforge(student: torch.nn.Module, source: Any, collate: Any, texts: list[str],
                  args: argparse.Namespace) -> tuple[float, float]:
    """kdforge's GOLD arm (``cross_entropy + gold``, live teacher); returns the training ``(wall s, CPU s)``."""
    from kdforge.train import CausalLMTask, Distiller, TrainConfig

    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, scheduler="linear",
                      warmup_steps=args.warmup, max_grad_norm=1.0, seed=args.seed,
                      log_every=max(1, args.steps // 4), progress=False)
    distiller = Distiller(student, source, task=CausalLMTask(),
                          objective=[{"name": "cross_entropy", "weight": 1.0}, {"name": "gold", "weight": 1.0}],
                          config=cfg, train_data=texts, collate_fn=collate, vocab_policy="cross_tokenizer")
    return _timed(distiller.train)


def prompt_completion(text: str) -> dict[str, str]:
    """GOLDTrainer needs a non-empty prompt: the text's first word is the prompt, the rest the completion."""
    cut = text.find(" ")
    cut = cut if cut > 0 else 1
    return {"prompt": text[:cut], "completion": text[cut:]}


def train_trl(student: torch.nn.Module, student_tok: Any, teacher: torch.nn.Module, teacher_tokenizer_dir: str,
              texts: list[str], args: argparse.Namespace, output_dir: str) -> tuple[tuple[float, float], list[float]]:
    """TRL's GOLDTrainer (off-policy, ULD + hybrid, CE weight 1); returns the training seconds and logged losses."""
    from datasets import Dataset
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    config = GOLDConfig(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=args.warmup, max_grad_norm=1.0,
        weight_decay=0.0, seed=args.seed, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=max(1, args.steps // 4), dataloader_num_workers=0,
        lmbda=0.0, use_uld_loss=True, uld_use_hybrid_loss=True, uld_crossentropy_weight=1.0,
        uld_distillation_weight=1.0, teacher_tokenizer_name_or_path=teacher_tokenizer_dir,
        max_length=args.seq_len + 8, max_completion_length=args.seq_len, disable_dropout=True,
        gradient_checkpointing=False,  # TRL's SFT default is True; kdforge does not checkpoint
    )
    data = Dataset.from_list([prompt_completion(t) for t in texts])
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=config, processing_class=student_tok,
                          train_dataset=data)
    return _timed(trainer.train), [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _timed(train: Any) -> tuple[float, float]:
    """``(wall s, CPU s)`` of ``train()``; the process's CPU seconds are less swayed by a shared
    box's load than wall time."""
    t0, c0 = time.perf_counter(), time.process_time()
    train()
    return time.perf_counter() - t0, time.process_time() - c0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One implementation (``args.impl``) on the Austen setup, scored by kdforge's evaluator."""
    import tempfile

    from kdforge.recipes.cross_tokenizer import evaluate

    s = _setup(args)
    logged: list[float] = []
    if args.impl == "trl":
        with tempfile.TemporaryDirectory() as tmp:
            (train_s, cpu_s), logged = train_trl(s["student"], s["student_tok"], s["teacher"],
                                        s["teacher"].config._name_or_path, s["texts"], args, tmp)
    else:
        train_s, cpu_s = train_kdforge(s["student"], s["source"], s["collate"], s["texts"], args)
    return {"impl": args.impl, **evaluate(s["student"], s["eval_batches"], s["tops"]),
            "s_per_step": train_s / args.steps, "cpu_s_per_step": cpu_s / args.steps, "train_s": train_s, **({"logged_losses": logged} if logged else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=["trl", "kdforge", "both"], default="both")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--texts", type=int, default=160)
    ap.add_argument("--eval-texts", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.impl == "both":
        rows = []
        for impl in ("kdforge", "trl"):
            cmd = [sys.executable, __file__, *[a for a in sys.argv[1:] if not a.startswith("--impl")], "--impl", impl]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if done.returncode != 0:
                rows.append({"impl": impl, "error": done.stderr.strip().splitlines()[-1:]})
                sys.stderr.write(done.stderr[-4000:])
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = run(args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(steps=args.steps, texts=args.texts, seed=args.seed)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
