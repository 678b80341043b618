"""Preference distillation on a checkable task (arithmetic): long-to-short DPO vs rejection-SFT.

Pipeline, per seed (docs/preference.md):

1. **baseline** — the student (policy) answers held-out prompts greedily: accuracy, mean answer
   length in tokens.
2. **samples** — the student samples ``k`` answers per training prompt
   (:class:`kdforge.train.generation.HFGenerator`); each is checked (the last integer in the
   answer equals the true result).
3. **pairs** — ``labels: checker`` (Kimi k1.5 long-to-short): shortest correct answer chosen, each
   wrong or longer correct one rejected (:func:`kdforge.train.preference.build_pairs`);
   ``labels: teacher`` (LLaVA-MoD): the answer the reference/teacher finds most likely (mean
   log-prob per token) chosen, the least likely rejected (:func:`~kdforge.train.preference.teacher_pairs`).
4. **methods** — ``dpo``: DPO against the frozen reference (``reference`` model, the teacher; or
   the student before training when ``reference`` is unset); ``rft``: rejection-sampled SFT on the
   chosen (shortest correct) answers. Each method starts from the same student.
5. **eval** — as in 1, per method.

Each stage of each seed is a sub-run (:mod:`kdforge.recipes.subrun`): ``kdforge run --resume``
keeps finished stages whose fingerprint matches (the sampled answers are stored in
``samples/seed-k/samples.json``). Trained weights are not stored (only their metrics).
"""

from __future__ import annotations

import copy
import logging
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from kdforge.config import StrictModel
from kdforge.errors import ConfigError
from kdforge.io import write_json_atomic
from kdforge.models import ModelSource
from kdforge.recipes import RECIPES, Recipe

log = logging.getLogger(__name__)

__all__ = ["ArithmeticTask", "PreferenceConfig", "PreferenceRecipe", "arithmetic_prompts", "check_answer"]


class ArithmeticTask(StrictModel):
    """Generated arithmetic prompts ``a op b`` with operands in ``[min_operand, max_operand]``."""

    train_prompts: int = Field(32, ge=1, description="prompts sampled from per seed")
    eval_prompts: int = Field(50, ge=1, description="held-out prompts (the same for every seed)")
    min_operand: int = Field(1, ge=0)
    max_operand: int = Field(20, ge=1)
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], min_length=1)
    template: str = Field("What is {a}{op}{b}? Answer:", description="prompt text over {a}, {op}, {b}")
    chat: bool = Field(False, description="wrap the prompt in the tokenizer's chat template")
    system: str | None = Field(None, description="chat: system message")


class Sampling(StrictModel):
    k: int = Field(4, ge=2, description="answers sampled per training prompt")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(16, ge=1)


class PreferenceTrain(StrictModel):
    steps: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-5, gt=0)
    beta: float = Field(0.1, gt=0, description="DPO inverse temperature")
    max_pairs_per_prompt: int | None = Field(2, ge=1, description="checker labels: rejected answers kept per prompt")


class PreferenceConfig(StrictModel):
    output_dir: str = "outputs/preference"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    student: ModelSource = Field(default_factory=lambda: ModelSource(model="smollm2"),
                                 description="the policy that samples and is trained")
    reference: ModelSource | None = Field(None, description="DPO reference / judge (the teacher); "
                                                           "None = a frozen copy of the student")
    task: ArithmeticTask = Field(default_factory=ArithmeticTask)
    sampling: Sampling = Field(default_factory=Sampling)
    labels: Literal["checker", "teacher"] = "checker"
    methods: list[Literal["dpo", "rft"]] = Field(default_factory=lambda: ["dpo", "rft"], min_length=1)
    train: PreferenceTrain = Field(default_factory=PreferenceTrain)
    eval_max_new_tokens: int = Field(16, ge=1)


# --------------------------------------------------------------------------------------------- task

def arithmetic_prompts(task: ArithmeticTask, n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` distinct-as-possible ``(prompt text, answer)`` pairs drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(task.min_operand, task.max_operand), rng.randint(task.min_operand, task.max_operand)
        op = rng.choice(task.ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append((task.template.format(a=a, op=op, b=b), value))
    return out


_INT = re.compile(r"-?\d+")


def check_answer(text: str, value: int) -> bool:
    """The last integer in ``text`` equals ``value`` ("5+3 = 8" and "8" are both right)."""
    found = _INT.findall(text.replace(",", ""))
    return bool(found) and int(found[-1]) == value


def _render(tokenizer: Any, task: ArithmeticTask, prompt: str) -> str:
    if not task.chat:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("task.chat is true but the student's tokenizer has no chat template",
                          "set task.chat: false (plain-text prompts)")
    msgs = ([{"role": "system", "content": task.system}] if task.system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


class _Sampling:
    """The settings object :class:`~kdforge.train.generation.HFGenerator` reads."""

    def __init__(self, temperature: float, top_p: float, max_new_tokens: int, tokenizer: Any) -> None:
        self.temperature, self.top_p, self.top_k, self.max_new_tokens = temperature, top_p, None, max_new_tokens
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id


def _ids(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _decode(tokenizer: Any, ids: torch.Tensor) -> tuple[str, int]:
    """Answer text (special tokens dropped, stripped) and its length in tokens (EOS excluded)."""
    eos = tokenizer.eos_token_id
    n = int(ids.numel()) - int(ids.numel() > 0 and eos is not None and int(ids[-1]) == eos)
    return tokenizer.decode(ids[:n], skip_special_tokens=True).strip(), n


def sample_answers(model: Any, tokenizer: Any, prompts: list[str], k: int, settings: _Sampling,
                   batch: int = 16) -> list[list[tuple[str, int]]]:
    """``k`` sampled answers (text, tokens) per prompt, with kdforge's HF sampling backend."""
    from kdforge.train.generation import HFGenerator

    gen = HFGenerator()
    flat = [p for p in prompts for _ in range(k)]
    outs: list[torch.Tensor] = []
    for i in range(0, len(flat), batch):
        outs += gen(model, [_ids(tokenizer, p) for p in flat[i: i + batch]], settings)
    answers = [_decode(tokenizer, o) for o in outs]
    return [answers[i * k: (i + 1) * k] for i in range(len(prompts))]


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                   batch: int = 16) -> list[tuple[str, int]]:
    """Greedy answers (text, tokens), left-padded batches."""
    from kdforge.train.generation import cut_after_eos

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    model.eval()
    out: list[tuple[str, int]] = []
    for i in range(0, len(prompts), batch):
        rows = [_ids(tokenizer, p) for p in prompts[i: i + batch]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, width - len(r):] = r
            attn[j, width - len(r):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=int(pad), eos_token_id=eos)
        out += [_decode(tokenizer, cut_after_eos(row, eos)) for row in gen[:, width:].cpu()]
    return out


def evaluate(model: Any, tokenizer: Any, cfg: PreferenceConfig) -> dict[str, Any]:
    """Greedy accuracy and mean answer length (tokens) on the held-out prompts."""
    items = arithmetic_prompts(cfg.task, cfg.task.eval_prompts, seed=10_000)
    answers = greedy_answers(model, tokenizer, [_render(tokenizer, cfg.task, p) for p, _ in items],
                             cfg.eval_max_new_tokens)
    correct = [check_answer(t, v) for (t, _), (_, v) in zip(answers, items, strict=True)]
    return {"accuracy": sum(correct) / len(correct),
            "mean_length": statistics.fmean(n for _, n in answers),
            "examples": [{"prompt": p, "answer": t, "correct": c} for (p, _), (t, _), c in
                         list(zip(items, answers, correct, strict=True))[:5]]}


# --------------------------------------------------------------------------------------------- recipe

@RECIPES.register("preference", "preference distillation: long-to-short DPO / rejection-SFT on arithmetic")
class PreferenceRecipe(Recipe):
    config_model = PreferenceConfig

    def check(self, config: PreferenceConfig, output_dir: Path) -> list[Any]:
        from kdforge.preflight.checks import check_device, check_model_ref, check_output_dir
        from kdforge.preflight.problems import Problems

        problems = Problems()
        for key, src in (("student", config.student), ("reference", config.reference)):
            if src is not None:
                check_model_ref(problems, f"{key}.model", src.model.removeprefix("asset:"))
                check_device(problems, f"{key}.device", src.device)
        if config.labels == "teacher" and config.reference is None:
            problems.add("labels", "labels: teacher needs a teacher to score the answers, and reference is unset",
                         "set reference (e.g. {model: smollm2}) or use labels: checker")
        check_output_dir(problems, "output_dir", Path(output_dir))
        return problems.items

    def run(self, config: PreferenceConfig, output_dir: Path, *, resume: bool = False) -> dict[str, Any]:
        from kdforge.distributed import launched_world_size
        from kdforge.models import load_model
        from kdforge.recipes.subrun import RecipeRun, config_key

        if launched_world_size() > 1:
            raise ConfigError("the preference recipe runs in one process",
                              "run `kdforge run` without accelerate launch / torchrun")
        if config.labels == "teacher" and config.reference is None:
            raise ConfigError("labels: teacher needs a reference (teacher) model",
                              "set reference (e.g. {model: smollm2}) or use labels: checker")
        cfg = config
        run = RecipeRun.start("preference", cfg, output_dir)
        student, tok = load_model(cfg.student, role="student")
        student.eval()
        reference = None
        if cfg.reference is not None:
            reference, _ = load_model(cfg.reference, role="teacher")
        base = run.subrun("baseline", "baseline", {"student": config_key(cfg.student),
                                                   "task": config_key(cfg.task), "eval": cfg.eval_max_new_tokens})
        baseline = base.reuse(resume)
        if baseline is None:  # greedy decoding: one evaluation serves every seed
            base.prepare(resume)
            baseline = {"fingerprint": base.fingerprint, **evaluate(student, tok, cfg)}
            write_json_atomic(base.record, baseline)
        log.info("baseline: accuracy %.3f, mean length %.2f", baseline["accuracy"], baseline["mean_length"])
        per_seed = [self._seed(run, cfg, student, reference, tok, seed, resume, baseline) for seed in cfg.seeds]
        return self._publish(run, cfg, per_seed)

    # -- one seed --------------------------------------------------------------------------------
    def _seed(self, run: Any, cfg: PreferenceConfig, student: Any, reference: Any, tok: Any, seed: int,
              resume: bool, baseline: dict[str, Any]) -> dict[str, Any]:
        from kdforge.recipes.subrun import config_key
        from kdforge.train.preference import Answer, build_pairs, teacher_pairs

        skey = {"student": config_key(cfg.student), "task": config_key(cfg.task), "sampling": config_key(cfg.sampling),
                "seed": seed}
        samp = run.subrun(f"samples, seed {seed}", f"samples/seed-{seed}", skey, record="samples.json")
        samples = samp.reuse(resume)
        if samples is None:
            samp.prepare(resume)
            items = arithmetic_prompts(cfg.task, cfg.task.train_prompts, seed=seed)
            prompts = [_render(tok, cfg.task, p) for p, _ in items]
            torch.manual_seed(seed)
            t0 = time.monotonic()
            answers = sample_answers(student, tok, prompts, cfg.sampling.k,
                                     _Sampling(cfg.sampling.temperature, cfg.sampling.top_p,
                                               cfg.sampling.max_new_tokens, tok))
            rows = [{"prompt": p, "value": v, "answers": [{"text": t, "length": n, "correct": check_answer(t, v)}
                                                          for t, n in ans if t]}
                    for p, (_, v), ans in zip(prompts, items, answers, strict=True)]
            samples = {"fingerprint": samp.fingerprint, "seconds": time.monotonic() - t0, "rows": rows}
            write_json_atomic(samp.record, samples)
        rows = samples["rows"]
        n_answers = sum(len(r["answers"]) for r in rows)
        sample_acc = sum(a["correct"] for r in rows for a in r["answers"]) / max(n_answers, 1)

        rng = random.Random(seed)
        if cfg.labels == "checker":
            pairs = [pair for r in rows for pair in build_pairs(
                r["prompt"], [Answer(a["text"], a["correct"], a["length"]) for a in r["answers"]],
                max_pairs=cfg.train.max_pairs_per_prompt, rng=rng)]
        else:
            pairs = []
            for r in rows:
                texts = [a["text"] for a in r["answers"]]
                if len(set(texts)) >= 2:
                    pairs += teacher_pairs(r["prompt"], texts, _mean_logprobs(reference, tok, r["prompt"], texts))
        log.info("seed %d: %d answers (%.2f correct), %d preference pairs", seed, n_answers, sample_acc, len(pairs))

        methods: dict[str, Any] = {}
        for method in cfg.methods:
            key = {**skey, "labels": cfg.labels, "method": method, "train": config_key(cfg.train),
                   "reference": config_key(cfg.reference) if cfg.reference else None,
                   "eval": cfg.eval_max_new_tokens}
            sub = run.subrun(f"{method}, seed {seed}", f"{method}/seed-{seed}", key)
            record = sub.reuse(resume)
            if record is None:
                sub.prepare(resume)
                record = {"fingerprint": sub.fingerprint, **self._train(cfg, method, student, reference, tok, pairs,
                                                                      seed)}
                write_json_atomic(sub.record, record)
            log.info("seed %d %s: accuracy %.3f, mean length %.2f", seed, method, record["accuracy"],
                     record["mean_length"])
            methods[method] = record
        return {"seed": seed, "baseline": baseline, "sample_accuracy": sample_acc, "pairs": len(pairs),
                "methods": methods}

    def _train(self, cfg: PreferenceConfig, method: str, student: Any, reference: Any, tok: Any,
               pairs: list[Any], seed: int) -> dict[str, Any]:
        from kdforge.train.preference import train_dpo, train_sft

        torch.manual_seed(seed)
        policy = copy.deepcopy(student)
        policy.requires_grad_(True)
        t = cfg.train
        t0 = time.monotonic()
        if method == "dpo":
            ref = reference if reference is not None else copy.deepcopy(student).requires_grad_(False)
            history = train_dpo(policy, ref, tok, pairs, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                                beta=t.beta, seed=seed)
        else:
            chosen = list(dict.fromkeys((p.prompt, p.chosen) for p in pairs))
            history = train_sft(policy, tok, chosen, steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=seed)
        seconds = time.monotonic() - t0
        metrics = evaluate(policy, tok, cfg)
        del policy
        return {**metrics, "train_seconds": seconds, "history": history}

    # -- results ---------------------------------------------------------------------------------
    def _publish(self, run: Any, cfg: PreferenceConfig, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
        def agg(get) -> dict[str, float]:
            vals = [get(s) for s in per_seed]
            return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}

        models = [{"name": "student (before)", "role": "baseline",
                   "metrics": {"accuracy": agg(lambda s: s["baseline"]["accuracy"]),
                               "mean_length": agg(lambda s: s["baseline"]["mean_length"])}}]
        for m in cfg.methods:
            models.append({"name": f"student + {m}", "role": "student",
                           "metrics": {"accuracy": agg(lambda s, m=m: s["methods"][m]["accuracy"]),
                                       "mean_length": agg(lambda s, m=m: s["methods"][m]["mean_length"])}})
        results = {"recipe": "preference", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "primary_metric": "accuracy", "higher_is_better": True, "labels": cfg.labels,
                   "models": models, "seeds": [{k: v for k, v in s.items()} for s in per_seed]}
        lines = ["# Preference distillation", "", f"labels: {cfg.labels}; seeds: {cfg.seeds}", "",
                 "| model | accuracy | mean answer length (tokens) |", "|---|---|---|"]
        for mod in models:
            a, n = mod["metrics"]["accuracy"], mod["metrics"]["mean_length"]
            lines.append(f"| {mod['name']} | {a['mean']:.3f} ± {a['std']:.3f} | {n['mean']:.2f} ± {n['std']:.2f} |")
        lines += ["", "| seed | sampled-answer accuracy | pairs |", "|---|---|---|"]
        lines += [f"| {s['seed']} | {s['sample_accuracy']:.3f} | {s['pairs']} |" for s in per_seed]
        run.publish(results, "\n".join(lines) + "\n")
        return results


def _mean_logprobs(model: Any, tok: Any, prompt: str, texts: list[str]) -> list[float]:
    from kdforge.train.preference import encode_responses, response_logprobs

    with torch.no_grad():
        batch = encode_responses(tok, [prompt] * len(texts), texts, device=next(model.parameters()).device)
        return response_logprobs(model, batch, average=True).tolist()
