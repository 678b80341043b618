"""GKD quality: labels only vs supervised KD (cache / online) vs on-policy GKD vs sequence-level KD.

Every method trains the same 6-layer student (built from SmolLM2-135M-Instruct's layers) for the
same steps on the same Austen blocks, with the same seed, through the ``llm_kd`` recipe
(``configs/gkd.yaml`` with the method list replaced). One recipe call trains every method and
evaluates them in one pass, so the teacher's held-out logits are computed once. Methods (the
distillation methods all use the same divergence, generalized JSD with ``beta`` = 0.5):

* ``labels``: cross-entropy on the data (every position of each 128-token block);
* ``kd_cache``: supervised KD from the cached teacher top-64 (tail bucket), every position;
* ``kd_online``: supervised KD with the online teacher on the GKD split (first 64 tokens prompt,
  loss on the other 64): GKD with ``lmbda = 0``, the clean off-policy ablation of GKD;
* ``gkd``: on-policy GKD, ``lmbda = 0.5``: half the batches are 32 tokens sampled by the student
  from the 64-token prompt, scored by the online teacher;
* ``seq_kd``: sequence-level KD (``seq_kd: true``, ``lmbda = 0``): completions sampled by the
  teacher.

Reported per method (one JSON line each, also appended to ``--out``):

* ``offpolicy``: the recipe's held-out table (perplexity, top-1 agreement, KL(teacher‖student))
  on the held-out novel under teacher forcing;
* ``onpolicy``: :func:`kdforge.eval.onpolicy.onpolicy_fidelity` on held-out prompts (the first
  ``--prompt-tokens`` tokens of each held-out block): the student samples ``--new-tokens`` tokens
  (temperature 1, fixed seed), the teacher scores them (teacher NLL of the student's text, KL both
  ways on the student's own prefixes, distinct-2);
* ``train_wall_s`` and ``train_cpu_s`` (``time.process_time`` around ``Distiller.train``: with one
  torch thread on a shared machine, CPU seconds are the contention-robust cost).

Reference lines: ``teacher`` (the teacher on its own samples) and ``student_init``.

Run (the measured run, 25 steps, about an hour on a 2-core CPU shared with other jobs)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gkd_quality.py --steps 25 \
        --methods gkd,kd_cache,labels,kd_online --eval-prompts 32 \
        --out benchmarks/results/gkd_quality.jsonl
    .venv/bin/python benchmarks/gkd_quality.py --methods gkd,kd_online --steps 10   # a subset
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

JSD = {"name": "generalized_jsd", "weight": 1.0, "params": {"beta": 0.5}}
CE_LOGGED = {"name": "cross_entropy", "weight": 0.0}


def method_specs(prompt_tokens: int, new_tokens: int, lmbda: float) -> dict[str, dict[str, Any]]:
    """The ``llm_kd`` method entries compared here, by short key."""
    on = {"prompt_tokens": prompt_tokens, "max_new_tokens": new_tokens, "temperature": 1.0}
    return {
        "labels": {"name": "labels only", "role": "baseline",
                   "objective": [{"name": "cross_entropy", "weight": 1.0}]},
        "kd_cache": {"name": "KD JSD(0.5) cache top-64", "role": "student",
                     "objective": [{**JSD, "params": {"beta": 0.5, "sparse_policy": "tail_bucket"}}, CE_LOGGED]},
        "kd_online": {"name": "KD JSD(0.5) online lmbda 0", "role": "student",
                      "objective": [JSD, CE_LOGGED], "on_policy": {**on, "lmbda": 0.0, "seq_kd": False}},
        "gkd": {"name": f"GKD JSD(0.5) lmbda {lmbda}", "role": "student",
                "objective": [JSD, CE_LOGGED], "on_policy": {**on, "lmbda": lmbda, "seq_kd": False}},
        "seq_kd": {"name": "SeqKD JSD(0.5) teacher samples", "role": "student",
                   "objective": [JSD, CE_LOGGED], "on_policy": {**on, "lmbda": 0.0, "seq_kd": True}},
    }


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "gkd.yaml")
    p.add_argument("--methods", default="gkd,kd_cache,labels,kd_online,seq_kd",
                   help="comma-separated, run in this order: labels, kd_cache, kd_online, gkd, seq_kd")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lmbda", type=float, default=0.5)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts for the on-policy metrics")
    p.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "gkd_quality")
    p.add_argument("--cache-from", type=Path, default=None,
                   help="copy an existing teacher cache of the same data/k (else it is built once)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override (YAML value), e.g. train.batch_size=4")
    p.add_argument("--no-references", action="store_true", help="skip the teacher / student-init lines")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    p.add_argument("--table", type=Path, default=None,
                   help="only print the Markdown table of an existing results file (latest line per method)")
    return p.parse_args(argv)


def markdown_table(path: Path) -> str:
    """The docs table from a results JSONL (the latest line of each method wins)."""
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[rec["method"]] = rec

    def f(x: Any, spec: str) -> str:
        return "–" if x is None else format(x, spec)

    lines = [
        "| method | held-out ppl | agreement | KL(T‖S) | teacher NLL of own samples | KL(S‖T) own | KL(T‖S) own "
        "| agreement own | distinct-2 | train CPU s (wall s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    refs: dict[str, float] = {}
    for rec in latest.values():  # the recipe's held-out perplexity of the references
        if "teacher_offpolicy_ppl" in rec:
            refs = {"teacher": rec["teacher_offpolicy_ppl"], "student_init": rec.get("student_init_ppl")}
    order = ["teacher", "student_init", "labels", "kd_cache", "kd_online", "gkd", "seq_kd"]
    for key in sorted(latest, key=lambda k: order.index(k) if k in order else len(order)):
        rec = latest[key]
        off, on = rec.get("offpolicy") or {}, rec.get("onpolicy") or {}
        name = rec.get("name", key)
        ppl = off.get("perplexity", refs.get(key))
        cpu = f"{f(rec.get('train_cpu_s'), '.0f')} ({f(rec.get('train_wall_s'), '.0f')})" if "train_cpu_s" in rec else "–"
        lines.append(
            f"| {name} | {f(ppl, '.1f')} | {f(off.get('agreement'), '.3f')} | {f(off.get('kl_to_teacher'), '.2f')} "
            f"| {f(on.get('teacher_nll'), '.2f')} | {f(on.get('kl_from_teacher'), '.2f')} "
            f"| {f(on.get('kl_to_teacher'), '.2f')} | {f(on.get('agreement'), '.3f')} "
            f"| {f(on.get('distinct_2'), '.3f')} | {cpu} |")
    return "\n".join(lines)


def _emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as fh:  # append-only results log
            fh.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.table is not None:
        print(markdown_table(args.table))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    import yaml

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kdforge.train.distiller as distiller_mod
    from kdforge.config import read_yaml, validate
    from kdforge.data.text import make_lm_splits
    from kdforge.eval.onpolicy import onpolicy_fidelity
    from kdforge.recipes import load_recipe
    from kdforge.recipes.llm_kd import _slug, load_documents, resolve_model_path
    from kdforge.students.from_teacher import student_from_teacher
    from kdforge.train.onpolicy import OnPolicyConfig

    specs = method_specs(args.prompt_tokens, args.new_tokens, args.lmbda)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in specs]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(specs)}")

    base = read_yaml(args.config)
    base.pop("recipe", None)
    base["train"] = {**base.get("train", {}), "max_steps": args.steps, "eval_every": None}
    base["eval"] = {**base.get("eval", {}), "during_training_sequences": 0, "speed_repeats": 1}
    base["seeds"] = [args.seed]
    base["plot"] = False
    base["save_students"] = True
    for item in args.set:
        key, _, value = item.partition("=")
        node = base
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    work = args.work_dir
    cache_dir = work / "teacher_cache"
    if args.cache_from is not None and not cache_dir.exists():
        shutil.copytree(args.cache_from, cache_dir)
    base["cache"] = {**base.get("cache", {}), "dir": str(cache_dir)}
    recipe_cls = load_recipe("llm_kd")

    # CPU seconds of each Distiller.train call (one per recipe call here)
    train_cpu: list[float] = []
    original_train = distiller_mod.Distiller.train

    def timed_train(self: Any, *a: Any, **k: Any) -> Any:
        c0 = time.process_time()
        try:
            return original_train(self, *a, **k)
        finally:
            train_cpu.append(time.process_time() - c0)

    distiller_mod.Distiller.train = timed_train  # type: ignore[method-assign]

    # held-out prompts, exactly the recipe's held-out blocks
    d = validate(recipe_cls.config_model, copy.deepcopy(base), source=str(args.config)).data
    t_cfg = validate(recipe_cls.config_model, copy.deepcopy(base), source=str(args.config)).teacher
    path = resolve_model_path(t_cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, t_cfg.dtype)).eval()
    teacher.requires_grad_(False)
    splits = make_lm_splits(load_documents(d.corpus), tokenizer, d.seq_len, train_docs=d.train_docs,
                            eval_docs=d.eval_docs, max_train_blocks=d.train_sequences,
                            max_eval_blocks=d.eval_sequences, seed=d.seed, unwrap=d.unwrap_paragraphs)
    prompts = [row[: args.prompt_tokens].clone() for row in splits.eval[: args.eval_prompts]]
    gen_cfg = OnPolicyConfig(lmbda=0.0, temperature=1.0, max_new_tokens=args.new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    common = {"bench": "gkd_quality", "steps": args.steps, "seed": args.seed,
              "batch_size": base["train"].get("batch_size"), "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "eval_prompts": len(prompts),
              "overrides": args.set, "torch_threads": torch.get_num_threads()}

    def onpolicy(model: torch.nn.Module) -> dict[str, Any]:
        c0, w0 = time.process_time(), time.perf_counter()
        res = onpolicy_fidelity(model, teacher, prompts, gen_cfg, seed=args.seed)
        res["eval_cpu_s"] = round(time.process_time() - c0, 1)
        res["eval_wall_s"] = round(time.perf_counter() - w0, 1)
        return res

    if not args.no_references:
        _emit({**common, "method": "teacher", "onpolicy": onpolicy(teacher),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, args.out)
        s = validate(recipe_cls.config_model, copy.deepcopy(base), source=str(args.config)).student
        init = student_from_teacher(teacher, s.layers, num_layers=s.num_layers if s.layers == "every_k" else None,
                                    freeze_embeddings=s.freeze_embeddings, freeze_head=s.freeze_head).eval()
        _emit({**common, "method": "student_init", "onpolicy": onpolicy(init),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, args.out)
        del init

    # one recipe call for all methods: the held-out evaluation then runs the teacher once per batch
    data = copy.deepcopy(base)
    data["methods"] = [specs[key] for key in chosen]
    out_dir = work / "run"
    data["output_dir"] = str(out_dir)
    config = validate(recipe_cls.config_model, data, source=str(args.config))
    w0 = time.perf_counter()
    results = recipe_cls().run(config, out_dir)
    wall = time.perf_counter() - w0
    teacher_row = next(r for r in results["models"] if r["role"] == "teacher")
    rows = {r["name"]: r for r in results["models"]}
    if len(train_cpu) != len(chosen):
        raise SystemExit(f"expected {len(chosen)} training runs, timed {len(train_cpu)}")
    for key, cpu in zip(chosen, train_cpu):
        spec = specs[key]
        row = rows[f"student / {spec['name']}"]
        student = AutoModelForCausalLM.from_pretrained(out_dir / _slug(spec["name"]) / f"seed-{args.seed}" / "student",
                                                       dtype=torch.float32).eval()
        m = row["metrics"]
        record = {
            **common, "method": key, "name": spec["name"], "regime": row.get("regime"),
            "offpolicy": {k: m.get(k) for k in ("perplexity", "agreement", "kl_to_teacher", "js_to_teacher")},
            "teacher_offpolicy_ppl": teacher_row["metrics"].get("perplexity"),
            "student_init_ppl": results["student_init"].get("perplexity"),
            "train_loss_last": m.get("train_loss_last"),
            "train_wall_s": m.get("train_time_s"),
            "train_cpu_s": round(cpu, 1),
            "recipe_wall_s": round(wall, 1),
            "recipe_timings": results.get("timings"),
            "onpolicy": onpolicy(student),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _emit(record, args.out)
        del student
    return 0


if __name__ == "__main__":
    sys.exit(main())
