"""On-policy fidelity of every student an ``llm_kd`` run saved: the metric MiniLLM optimises.

The recipe's own table scores the students under teacher forcing on held-out text. MiniLLM (and
GKD) minimise a divergence on the student's *own* samples, so this script also reports, for each
saved student of a finished run (``RUN_DIR/<method>/seed-<n>/student``), the teacher and the
untrained student, :func:`kdforge.eval.onpolicy.onpolicy_fidelity` on the recipe's held-out
prompts (the first ``--prompt-tokens`` tokens of the first ``--prompts`` held-out blocks): each
model samples ``--new-tokens`` tokens (temperature 1, the same seed), the teacher scores them.

Run (after ``kdforge run configs/minillm.yaml``)::

    .venv/bin/python benchmarks/onpolicy_eval_run.py configs/minillm.yaml outputs/minillm --prompts 32 \
        --out benchmarks/results/minillm_onpolicy.jsonl

The config is the one the run was started from (teacher, student, data and methods are read from
it; ``RUN_DIR/config.yaml`` is not used because it does not validate again: it records every
student key, also those of other student kinds).

Prints one JSON line per model (``method``, ``seed``, the fidelity metrics) and a Markdown table
of means over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

KEYS = ("kl_from_teacher", "kl_to_teacher", "agreement", "teacher_nll", "distinct_2", "mean_length")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", type=Path, help="the llm_kd config the run was started from")
    p.add_argument("run_dir", type=Path, help="the finished run's folder (RUN_DIR)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from kdforge.eval.onpolicy import onpolicy_fidelity
    from kdforge.recipes import load_recipe_file
    from kdforge.recipes.llm_kd import check_inputs, load_teacher
    from kdforge.recipes.subrun import slug
    from kdforge.students.build import build_student
    from kdforge.train import OnPolicyConfig

    args = _parse(argv)
    _, config = load_recipe_file(args.config)
    tokenizer, data = check_inputs(config)
    teacher, _ = load_teacher(config.teacher)
    prompts = [row[: args.prompt_tokens].clone() for row in data.eval[: args.prompts]]
    gen = OnPolicyConfig(lmbda=0.0, temperature=1.0, max_new_tokens=args.new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    models: list[tuple[str, int | None, Any]] = [("teacher", None, lambda: teacher),
                                                 ("student init", None,
                                                  lambda: build_student(config.student, teacher, tokenizer).eval())]
    for method in config.methods:
        for seed in config.seeds:
            folder = args.run_dir / slug(method.name) / f"seed-{seed}" / "student"
            models.append((method.name, seed,
                           lambda f=folder: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()))
    rows: list[dict[str, Any]] = []
    for name, seed, load in models:
        model = load()
        res = onpolicy_fidelity(model, teacher, prompts, gen, seed=args.seed)
        row = {"bench": "onpolicy_eval_run", "run_dir": str(args.run_dir), "method": name, "seed": seed,
               "prompts": len(prompts), "new_tokens": args.new_tokens, **{k: res[k] for k in KEYS}}
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as fh:
                fh.write(line + "\n")
    print(markdown(rows))
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    """Means (± std over seeds) per method of the on-policy metrics."""
    lines = ["| model | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    names = list(dict.fromkeys(r["method"] for r in rows))
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        cells = []
        for k in KEYS:
            vals = [float(r[k]) for r in mine]
            mean = statistics.fmean(vals)
            cells.append(f"{mean:.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
