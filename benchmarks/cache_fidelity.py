"""Does a student trained from the offline top-k cache match one trained from the online teacher?

Issue goal: "<= 64 bytes per token while a student trained from the cache matches one trained
from full online logits (held-out KL to teacher within 2%)".

One student template (SmolLM2-135M-Instruct cut to 6 of its 30 layers, embeddings/head copied and
frozen: :func:`kdforge.students.student_from_teacher`, as in ``configs/quickstart.yaml``) is copied
once per case and trained with :class:`kdforge.train.Distiller` for the same steps, on the same
batches (the trainer's sampler order depends only on ``(seed, epoch)`` and the dataset length,
which is the same for every case), with the same objective, forward KL at T=1::

    L = 1/N * sum_t KL(p_teacher(. | x_<=t) || q_student(. | x_<=t))

The only thing that changes is where ``p_teacher`` comes from:

* ``online``: the live teacher's **full** logits ``[B, T, V]``, computed by the trainer at every
  step (``Distiller(student, teacher, ...)``): the reference. Nothing is precomputed for it.
* ``cache-k{k}-{encoding}-{policy}``: the teacher's top-k written once by
  :func:`kdforge.teachers.build_teacher_cache` and replayed by
  :class:`kdforge.teachers.TeacherCacheDataset`; the mass outside the top-k is handled by the
  loss's ``sparse_policy`` (``tail_bucket``: one extra bucket; ``renormalize``: top-k only).
* ``cache-k{k}+s{m}-{encoding}-{policy}``: the top-k plus ``m`` draws from the teacher's tail per
  position (``tail_samples``, an unbiased estimate of the full distribution); ``s{m}`` alone is
  pure sampling (k = 0).

``--precompute-teacher`` (optionally ``--teacher-pass FILE`` to save/reuse it): the teacher's full
logits over the training and held-out blocks are computed once per invocation and served by a
lookup module (:class:`PrecomputedLM`: same numbers as the live teacher, no forward per step);
the caches are then written from those logits with
:func:`kdforge.teachers.cache.write_teacher_cache` (top-k: ``SparseTeacher.from_logits``; tail
draws: :func:`kdforge.losses.signal.sample_tail` seeded per row exactly as
``build_teacher_cache`` seeds them). ``--seeds 0,1,2`` trains every case once per seed and reuses
the caches and the teacher pass.

Every trained student is then scored on held-out blocks of another novel against the teacher's
full distribution (:func:`kdforge.eval.lm.evaluate_language_models`): ``KL(p_teacher || q_student)``
per token, perplexity, top-1 agreement. ``kl_rel_gap`` = ``(KL_case - KL_online) / KL_online``.

One JSON object per case (written as soon as the case finishes, so a cut run keeps its finished
cases), then one ``{"summary": ...}`` line. Full size (the quickstart regime)::

    .venv/bin/python benchmarks/cache_fidelity.py --out benchmarks/results/cache_fidelity.jsonl

Reduced check: ``--steps 30``. Cases: ``--cases online,k16,k32,k64,k16:renormalize,k16+s16,s32``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

log = logging.getLogger("benchmarks.cache_fidelity")

DEFAULT_CASES = "online,k16,k32,k64"


@dataclass(frozen=True)
class Case:
    """One way of feeding the teacher to the student.

    ``k is None`` means the online teacher (full logits); otherwise a cache of the top-``k`` in
    ``encoding`` (plus ``tail_samples`` draws from the tail), replayed with ``policy`` for the mass
    outside the top-k.
    """

    k: int | None = None
    encoding: str = "compact-u8-zstd"
    policy: str = "tail_bucket"
    tail_samples: int = 0

    @property
    def cache_slug(self) -> str:
        return f"k{self.k}" + (f"+s{self.tail_samples}" if self.tail_samples else "") + f"-{self.encoding}"

    @property
    def name(self) -> str:
        return "online" if self.k is None else f"cache-{self.cache_slug}-{self.policy}"


def parse_cases(spec: str, encoding: str = "compact-u8-zstd") -> list[Case]:
    """``"online,k16,k32:renormalize,k16+s16,s32"`` -> cases (``policy`` after a colon, default
    tail_bucket; ``+sM`` adds M tail draws; ``sM`` alone is pure sampling, k = 0)."""
    cases: list[Case] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "online":
            cases.append(Case())
            continue
        head, _, policy = item.partition(":")
        top, _, samples = head.partition("+")
        if top.startswith("s") and not samples:
            top, samples = "k0", top
        ok = top.startswith("k") and top[1:].isdigit() and (not samples or (samples[:1] == "s" and samples[1:].isdigit()))
        if not ok:
            raise SystemExit(f"bad case {item!r}: use 'online', 'k16', 'k16:renormalize', 'k16+s16' or 's32'")
        cases.append(Case(int(top[1:]), encoding, policy or "tail_bucket", int(samples[1:]) if samples else 0))
    if not cases:
        raise SystemExit("--cases is empty")
    return cases


def kd_objective(policy: str) -> list[Any]:
    """Forward KL at T=1 (the policy only matters for a sparse teacher) + CE logged with weight 0."""
    from kdforge.train.objective import LossTerm

    return [LossTerm("forward_kl", 1.0, {"sparse_policy": policy}), LossTerm("cross_entropy", 0.0)]


def eval_batches(blocks: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": blocks[i: i + batch_size]} for i in range(0, blocks.shape[0], batch_size)]


class PrecomputedLM(nn.Module):
    """A causal-LM stand-in that returns the teacher's logits precomputed for known token rows.

    ``forward(input_ids [B, T]) -> .logits [B, T, V]``: each row is looked up by its token ids, so
    it serves any batch order. The numbers are the live teacher's (computed once by
    :func:`teacher_pass`); an unknown row raises KeyError.
    """

    def __init__(self, blocks: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # gives the module a device
        self._rows = {tuple(r.tolist()): i for i, r in enumerate(blocks)}
        self.table = logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        index = [self._rows[tuple(r.tolist())] for r in input_ids.cpu()]
        return SimpleNamespace(logits=self.table[index].to(input_ids.device))


@torch.no_grad()
def teacher_pass(teacher: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The teacher's float32 logits ``[N, T, V]`` over ``blocks`` (one forward per batch)."""
    parts = [teacher(input_ids=blocks[i: i + batch_size]).logits.float() for i in range(0, blocks.shape[0], batch_size)]
    return torch.cat(parts)


def build_cache_from_logits(case: Case, blocks: torch.Tensor, logits: torch.Tensor, cache_dir: Path, *,
                            teacher_info: dict[str, Any], tokenizer: Any = None, batch_size: int = 8,
                            sample_seed: int = 0) -> Path:
    """Write ``case``'s cache from precomputed logits: the same signal ``build_teacher_cache``
    computes (top-k of the log-softmax; tail draws seeded by ``row_seed(sample_seed, row)``)."""
    from kdforge.losses.signal import SparseTeacher, sample_tail
    from kdforge.teachers.cache import write_teacher_cache
    from kdforge.teachers.cache.writer import row_seed

    k, m = int(case.k or 0), case.tail_samples

    def topk_fn(input_ids: torch.Tensor, first_row: int) -> SparseTeacher:
        chunk = logits[first_row: first_row + input_ids.shape[0]]
        if m:
            seeds = [row_seed(sample_seed, first_row + i) for i in range(input_ids.shape[0])]
            return sample_tail(chunk, k, m, seeds)[0]
        return SparseTeacher.from_logits(chunk, k)

    return write_teacher_cache(topk_fn, blocks, cache_dir, vocab_size=int(logits.shape[-1]), k=k, tail_samples=m,
                               sample_seed=sample_seed, teacher_info=teacher_info, encoding=case.encoding,
                               batch_size=batch_size, tokenizer=tokenizer)


def _complete_cache(cache_dir: Path) -> bool:
    from kdforge.errors import CacheError
    from kdforge.teachers.cache.format import read_manifest

    try:
        return bool(read_manifest(cache_dir).get("complete"))
    except CacheError:
        return False


def run_cases(
    teacher: nn.Module,
    template: nn.Module,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    cases: Sequence[Case],
    *,
    train_config: dict[str, Any],
    work_dir: Path,
    tokenizer: Any = None,
    eval_batch_size: int = 8,
    cache_batch_size: int = 8,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    reference_kl: float | None = None,
    precomputed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Train a copy of ``template`` per case on the same batches and score it on ``eval_blocks``.

    Args:
        teacher: frozen causal LM (full-vocabulary logits).
        template: the untrained student; each case trains a deep copy.
        train_blocks / eval_blocks: token blocks ``[N, T]`` (LongTensor).
        cases: what to run; the ``online`` case, if present, is the reference of ``kl_rel_gap``
            and is run first.
        train_config: :class:`kdforge.train.TrainConfig` keys (``output_dir`` is set per case).
        work_dir: caches and run folders go below it.
        on_result: called with each case's record as soon as it exists.
        reference_kl: held-out KL of an online student measured in an earlier run with the same
            settings, used for ``kl_rel_gap`` when ``cases`` has no ``online`` case.
        precomputed: the teacher's logits ``(train [N, T, V], eval [M, T, V])`` over the blocks
            (:func:`teacher_pass`): the online case and the held-out scoring read them through
            :class:`PrecomputedLM`, the caches are written from them; None: the live teacher
            runs at every step and builds the caches.

    Returns:
        One record per case (see the module docstring for the keys).
    """
    from kdforge.data.text import LMBlockDataset
    from kdforge.eval.lm import evaluate_language_models
    from kdforge.teachers import TeacherCacheDataset, build_teacher_cache, collate_teacher_cache
    from kdforge.train import CausalLMTask, Distiller

    ordered = sorted(cases, key=lambda c: c.k is not None)  # online first: it is the reference
    batches = eval_batches(eval_blocks, eval_batch_size)
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    live_teacher = teacher
    scorer: nn.Module = teacher
    teacher_info: dict[str, Any] = {}
    if precomputed is not None:
        from kdforge.teachers.online import model_weights_hash

        teacher = PrecomputedLM(train_blocks, precomputed[0])
        scorer = PrecomputedLM(eval_blocks, precomputed[1])
        teacher_info = {"id": "precomputed-teacher-pass", "weights_sha256": model_weights_hash(live_teacher),
                        "dtype": "float32"}
    records: list[dict[str, Any]] = []
    for case in ordered:
        slug = case.name
        run_dir = work_dir / "runs" / f"seed{train_config.get('seed')}" / slug
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished run left there would be resumed, not retrained
        record: dict[str, Any] = {"case": slug, "source": "online" if case.k is None else "cache",
                                  "k": case.k, "tail_samples": case.tail_samples,
                                  "encoding": None if case.k is None else case.encoding,
                                  "sparse_policy": None if case.k is None else case.policy,
                                  "seed": train_config.get("seed"),
                                  "teacher_precomputed": precomputed is not None}
        if case.k is None:
            train_data: Any = LMBlockDataset(train_blocks)
            collate = None
            signal_teacher: Any = teacher
            record["bytes_per_token"] = None
            record["full_logits_fp32_bytes_per_token"] = 4 * vocab
            record["cache_build_s"] = 0.0
        else:
            cache_dir = work_dir / "caches" / case.cache_slug
            t0 = time.perf_counter()
            if _complete_cache(cache_dir):  # built by an earlier seed or invocation: reuse
                record["cache_reused"] = True
            elif precomputed is not None:
                build_cache_from_logits(case, train_blocks, precomputed[0], cache_dir, teacher_info=teacher_info,
                                        tokenizer=tokenizer, batch_size=cache_batch_size)
            else:
                build_teacher_cache(teacher, train_blocks, cache_dir, k=case.k, tail_samples=case.tail_samples,
                                    encoding=case.encoding, batch_size=cache_batch_size, tokenizer=tokenizer)
            record["cache_build_s"] = round(time.perf_counter() - t0, 2)
            train_data = TeacherCacheDataset(cache_dir, sequences=train_blocks, tokenizer=tokenizer)
            record["bytes_per_token"] = round(float(train_data.cache.bytes_per_token), 2)
            collate = collate_teacher_cache
            signal_teacher = None
        cfg = {**train_config, "output_dir": str(run_dir)}
        student = copy.deepcopy(template)
        log.info("training %s (%s steps, seed %s)", slug, cfg.get("max_steps"), cfg.get("seed"))
        t0 = time.perf_counter()
        c0 = time.process_time()
        distiller = Distiller(student, signal_teacher, task=CausalLMTask(), objective=kd_objective(case.policy),
                              config=cfg, train_data=train_data, collate_fn=collate,
                              run_config={"benchmark": "cache_fidelity", "case": record})
        state = distiller.train()
        train_s = time.perf_counter() - t0
        record["train_cpu_s"] = round(time.process_time() - c0, 2)
        model = distiller.unwrapped_student.eval()
        record["train_s"] = round(train_s, 2)
        record["train_s_per_step"] = round(train_s / max(state.step, 1), 3)
        record["steps"] = int(state.step)
        last = {k: float(v) for k, v in (state.last_logs or {}).items() if isinstance(v, int | float)}
        record["train_loss_last"] = last.get("loss")

        t0 = time.perf_counter()
        scores = evaluate_language_models({"teacher": scorer, "student": model}, batches, teacher="teacher")
        record["eval_s"] = round(time.perf_counter() - t0, 2)
        m = scores["student"]["metrics"]
        record["heldout_kl_to_teacher"] = float(m["kl_to_teacher"])
        record["heldout_perplexity"] = float(m["perplexity"])
        record["heldout_agreement"] = float(m["agreement"])
        record["teacher_heldout_perplexity"] = float(scores["teacher"]["metrics"]["perplexity"])
        if case.k is None:
            reference_kl = record["heldout_kl_to_teacher"]
        record["kl_rel_gap"] = (None if reference_kl is None
                                else (record["heldout_kl_to_teacher"] - reference_kl) / reference_kl)
        records.append(record)
        if on_result is not None:
            on_result(record)
        del distiller, model, student
    return records


def summarize(records: Sequence[dict[str, Any]], *, max_bytes: float = 64.0, max_gap: float = 0.02) -> dict[str, Any]:
    """Which cache cases meet the issue goal (<= ``max_bytes``/token and |KL gap| <= ``max_gap``).

    Records of several training seeds are grouped by case: ``kl_rel_gap`` is then the mean over
    the seeds (``kl_rel_gap_std`` the sample standard deviation, ``kl_rel_gaps`` the per-seed
    values, paired with the online student of the same seed). A case meets the goal when it fits
    the byte budget and its mean gap is within ``max_gap`` (``every_seed_within`` says whether
    each seed's gap is too).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["case"], []).append(r)
    rows: dict[str, dict[str, Any]] = {}
    meets: list[str] = []
    for case, rs in groups.items():
        gaps = [r["kl_rel_gap"] for r in rs if r["kl_rel_gap"] is not None]
        kls = [r["heldout_kl_to_teacher"] for r in rs]
        row = {"bytes_per_token": rs[0]["bytes_per_token"], "seeds": [r.get("seed") for r in rs],
               "kl": round(statistics.fmean(kls), 4),
               "kl_rel_gap": round(statistics.fmean(gaps), 4) if gaps else None,
               "ppl": round(statistics.fmean(r["heldout_perplexity"] for r in rs), 2),
               "agreement": round(statistics.fmean(r["heldout_agreement"] for r in rs), 4),
               "train_s": round(sum(r["train_s"] for r in rs), 2)}
        if len(rs) > 1:
            row.update({"kls": [round(x, 4) for x in kls], "kl_rel_gaps": [round(g, 4) for g in gaps],
                        "kl_rel_gap_std": round(statistics.stdev(gaps), 4) if len(gaps) > 1 else None,
                        "every_seed_within": bool(gaps) and all(abs(g) <= max_gap for g in gaps)})
        rows[case] = row
        if (rs[0]["source"] == "cache" and gaps and row["bytes_per_token"] is not None
                and row["bytes_per_token"] <= max_bytes and abs(statistics.fmean(gaps)) <= max_gap):
            meets.append(case)
    online = any(r["source"] == "online" for r in records)
    has_ref = online or any(r["kl_rel_gap"] is not None for r in records)
    return {"summary": {"goal": f"<= {max_bytes:g} B/token and |held-out KL gap| <= {max_gap:.0%} vs online",
                        "reference": ("online" if online else "reference_kl") if has_ref else None, "cases": rows,
                        "meets_goal": meets if has_ref else None}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help=f"comma list (default {DEFAULT_CASES}); "
                   "'kK:renormalize' picks the policy")
    p.add_argument("--encoding", default="compact-u8-zstd")
    p.add_argument("--teacher", default="smollm2", help="asset name, local folder or Hub id")
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--train-docs", default="prideprejudice")
    p.add_argument("--eval-docs", default="persuasion")
    p.add_argument("--train-sequences", type=int, default=256)
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="training seed (batch order)")
    p.add_argument("--seeds", default=None, help="comma list of training seeds, run one after another "
                   "(overrides --seed; caches and the teacher pass are reused)")
    p.add_argument("--precompute-teacher", action="store_true",
                   help="compute the teacher's full logits once (train + held-out blocks) and serve them to the "
                        "online case, the cache builds and the scoring (same numbers, no teacher forward per step)")
    p.add_argument("--teacher-pass", default=None,
                   help="with --precompute-teacher: save the pass here, or load it if the file exists")
    p.add_argument("--build-only", action="store_true",
                   help="build the caches of --cases (into --work-dir), print their bytes/token, train nothing")
    p.add_argument("--data-seed", type=int, default=0, help="which blocks are drawn for train/held-out")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 is ~6x faster than 2 on this oversubscribed 2-core box)")
    p.add_argument("--reference-kl", type=float, default=None,
                   help="online student's held-out KL from an earlier identical run (when --cases has no 'online')")
    p.add_argument("--work-dir", default=None, help="caches and run folders (default: a temp folder)")
    p.add_argument("--out", default=None, help="append the JSON lines here too")
    p.add_argument("--label", default=None, help="free text stored with every record (e.g. 'reduced')")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "accelerate", "kdforge.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.data.text import make_lm_splits
    from kdforge.recipes.llm_kd import load_documents, resolve_model_path
    from kdforge.students.from_teacher import student_from_teacher

    cases = parse_cases(args.cases, args.encoding)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    path = resolve_model_path(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher.requires_grad_(False).eval()
    splits = make_lm_splits(load_documents("austen"), tokenizer, args.seq_len,
                            train_docs=args.train_docs.split(","), eval_docs=args.eval_docs.split(","),
                            max_train_blocks=args.train_sequences, max_eval_blocks=args.eval_sequences,
                            seed=args.data_seed)
    template = student_from_teacher(teacher, "every_k", num_layers=args.student_layers,
                                    freeze_embeddings=True, freeze_head=True).eval()
    train_config = {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                    "scheduler": "linear", "warmup_steps": args.warmup_steps, "max_grad_norm": 1.0,
                    "log_every": 10, "seed": args.seed, "progress": False, "keep_last": 1}
    context = {"teacher": args.teacher, "data": splits.summary(), "train": train_config,
               "student_layers": list(template.config.kdforge_source_layers), "label": args.label,
               "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch_threads": torch.get_num_threads(),
               "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])}
    out = Path(args.out) if args.out else None

    def emit(obj: dict[str, Any]) -> None:
        line = json.dumps(obj)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a", encoding="utf-8") as fh:  # append-only log of runs
                fh.write(line + "\n")

    def on_result(record: dict[str, Any]) -> None:
        emit({**record, **context, "loadavg_1m": round(os.getloadavg()[0], 1),
              "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})

    precomputed = None
    if args.precompute_teacher:
        pass_file = Path(args.teacher_pass) if args.teacher_pass else None
        if pass_file is not None and pass_file.is_file():
            saved = torch.load(pass_file, mmap=True)
            if not (torch.equal(saved["train_blocks"], splits.train) and torch.equal(saved["eval_blocks"], splits.eval)):
                raise SystemExit(f"{pass_file} holds the teacher pass of other blocks; delete it or pick another file")
            precomputed = (saved["train"], saved["eval"])
            context["teacher_pass_s"] = saved.get("seconds")
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            precomputed = (teacher_pass(teacher, splits.train), teacher_pass(teacher, splits.eval))
            context["teacher_pass_s"] = round(time.perf_counter() - t0, 1)
            context["teacher_pass_cpu_s"] = round(time.process_time() - c0, 1)
            if pass_file is not None:
                pass_file.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"train": precomputed[0], "eval": precomputed[1], "train_blocks": splits.train,
                            "eval_blocks": splits.eval, "seconds": context["teacher_pass_s"]}, pass_file)
        log.info("teacher pass ready (%s s)", context.get("teacher_pass_s"))
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]

    with tempfile.TemporaryDirectory(prefix="kdforge-cache-fidelity-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        t0 = time.perf_counter()
        if args.build_only:
            from kdforge.teachers.cache import open_teacher_cache

            for case in cases:
                if case.k is None:
                    continue
                cache_dir = work / "caches" / case.cache_slug
                c0 = time.process_time()
                if precomputed is not None:
                    from kdforge.teachers.online import model_weights_hash

                    info = {"id": "precomputed-teacher-pass", "weights_sha256": model_weights_hash(teacher),
                            "dtype": "float32"}
                    build_cache_from_logits(case, splits.train, precomputed[0], cache_dir, teacher_info=info,
                                            tokenizer=tokenizer)
                else:
                    from kdforge.teachers import build_teacher_cache

                    build_teacher_cache(teacher, splits.train, cache_dir, k=case.k, tail_samples=case.tail_samples,
                                        encoding=case.encoding, tokenizer=tokenizer)
                cache = open_teacher_cache(cache_dir)
                emit({"build_only": case.cache_slug, "bytes_per_token": round(cache.bytes_per_token, 2),
                      "topk_mass_mean": round(cache.manifest["stats"]["topk_mass_mean"], 4),
                      "build_cpu_s": round(time.process_time() - c0, 1)})
            return 0
        records = []
        for seed in seeds:
            records += run_cases(teacher, template, splits.train, splits.eval, cases,
                                 train_config={**train_config, "seed": seed}, work_dir=work, tokenizer=tokenizer,
                                 on_result=on_result, reference_kl=args.reference_kl, precomputed=precomputed)
        total = time.perf_counter() - t0
    summary = summarize(records)
    summary["summary"].update({"total_s": round(total, 1), "seeds": seeds, "loadavg_start": [round(x, 1) for x in load_start],
                               "loadavg_end": [round(x, 1) for x in os.getloadavg()], **context,
                               "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
