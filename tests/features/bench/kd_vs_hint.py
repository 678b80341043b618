"""Measure KD vs KD + hidden_mse on the quickstart regime, cut short (online teacher).

SmolLM2-135M-Instruct teacher, the quickstart's 6-layer `every_k` student (frozen embeddings/head),
Austen (Pride and Prejudice train, Persuasion held out), seq 128, batch 8, lr 1e-3, linear schedule.
Both methods see the same batches from the same initial student; the teacher runs online (dense
forward KL at T=1) because feature terms need its hidden states. Held-out metrics from
kdforge.eval.lm.evaluate_language_models.

    OMP_NUM_THREADS=1 .venv/bin/python tests/features/bench/kd_vs_hint.py --steps 30 \
        --hint cosine_hidden:1.0 --hint hidden_mse:0.001
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hint", action="append", default=[],
                    help="NAME:WEIGHT[:KEY=VALUE,...] of a feature term added to KD (repeatable), "
                         "e.g. hidden_mse:0.001 or hidden_mse:1.0:normalize=true")
    ap.add_argument("--skip-kd", action="store_true", help="do not train the KD-only baseline")
    ap.add_argument("--train-sequences", type=int, default=256)
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.data.text import LMBlockDataset, make_lm_splits
    from kdforge.eval.lm import evaluate_language_models
    from kdforge.recipes.llm_kd import load_documents, resolve_model_path
    from kdforge.students.from_teacher import student_from_teacher
    from kdforge.train import CausalLMTask, Distiller, Objective, TrainConfig

    path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    splits = make_lm_splits(load_documents("austen"), tokenizer, 128, train_docs=["prideprejudice"],
                            eval_docs=["persuasion"], max_train_blocks=args.train_sequences,
                            max_eval_blocks=args.eval_sequences, seed=0, unwrap=True)
    template = student_from_teacher(teacher, "every_k", num_layers=6, freeze_embeddings=True, freeze_head=True)
    kd = {"name": "forward_kl", "weight": 1.0}
    import yaml

    methods = {} if args.skip_kd else {"KD (online, forward_kl)": [kd]}
    for spec in args.hint or ["hidden_mse:1.0"]:
        name, weight, *rest = spec.split(":")
        params = {k: yaml.safe_load(v) for k, v in (kv.split("=") for kv in rest[0].split(","))} if rest else {}
        methods[f"KD + {name} (w={weight}{''.join(f', {k}={v}' for k, v in params.items())})"] = [
            kd, {"name": name, "weight": float(weight), "params": params}]
    models: dict[str, torch.nn.Module] = {"teacher": teacher, "student init": template}
    timing = {}
    for name, terms in methods.items():
        student = copy.deepcopy(template)
        objective = Objective(terms)
        distiller = Distiller(student, teacher, task=CausalLMTask(), objective=objective,
                              extra_modules=objective.bind(student, teacher),
                              config=TrainConfig(max_steps=args.steps, batch_size=8, lr=1e-3, scheduler="linear",
                                                 warmup_steps=5, max_grad_norm=1.0, log_every=5, progress=False,
                                                 seed=0),
                              train_data=LMBlockDataset(splits.train))
        wall, cpu = time.perf_counter(), time.process_time()
        state = distiller.train()
        timing[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
                        "last_logs": state.last_logs}
        models[name] = distiller.unwrapped_student.eval()
    blocks = splits.eval
    batches = [{"input_ids": blocks[i: i + 8]} for i in range(0, blocks.shape[0], 8)]
    scores = evaluate_language_models(models, batches, teacher="teacher")
    rows = {k: {m: round(float(v), 4) for m, v in s["metrics"].items()
                if m in ("perplexity", "agreement", "kl_to_teacher", "js_to_teacher")}
            for k, s in scores.items()}
    result = {"steps": args.steps, "eval_tokens": int(blocks.numel()), "metrics": rows, "timing": timing}
    print(json.dumps(result, indent=2, default=str))
    if args.out:
        from pathlib import Path

        from kdforge.io import write_json_atomic

        write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    main()
