"""One distillation training step: kdforge's Distiller vs TRL's GKDTrainer (lmbda=0).

Cases (each runs in its own process, so memory peaks and allocator state never mix; each prints
one JSON object):

* ``teacher_forward`` — the teacher's forward pass alone on the batch (no grad);
* ``sft`` — one student-only step with labels (forward, backward, clip, AdamW), plain PyTorch;
* ``kdforge`` — one :class:`kdforge.train.Distiller` step with the online teacher and the
  ``generalized_jsd`` loss (beta, T=1) on the same batch;
* ``kdforge_default`` — the ``kdforge`` case with the default ``Objective`` (``chunked="auto"``:
  a live teacher and a divergence with a closed form take the chunked path; ``compile_kernels="auto"``:
  the closed form compiled where a compiler exists, during the warm-up steps), i.e. what a user gets;
* ``kdforge_default_eager`` — ``kdforge_default`` with ``compile_kernels=False``;
* ``trl_gkd`` — one ``trl.experimental.gkd.GKDTrainer`` step with ``lmbda=0`` (no on-policy
  generation, so it is off-policy KD like the kdforge case), same beta, T=1, same batch;
* ``trl_gkd_liger`` — ``trl_gkd`` with ``use_liger_kernel=True`` (TRL then computes the JSD with
  Liger-Kernel's fused, chunked ``LigerFusedLinearJSDLoss`` from hidden states; needs ``liger-kernel``);
* ``kdforge_chunked`` — the ``kdforge`` case with ``Objective(chunked=True)`` (the student's
  ``[tokens, vocab]`` logits are never materialised at once; the JSD's value and gradient come
  from the closed-form kernel of :mod:`kdforge.losses.fused`);
* ``kdforge_chunked_autograd`` — the same with the chunked path's autograd-per-chunk fallback
  (``closed_form=False``), i.e. what ``chunked=True`` cost before the closed forms;
* ``kdforge_chunked_compiled`` — ``kdforge_chunked`` with ``compile_kernels=True`` (the JSD kernel
  through ``torch.compile``; compilation happens in the warm-up steps);
* ``kdforge_cached`` — kdforge's offline mode: the batches carry the teacher's top-``--k``
  (computed before timing, as a teacher cache would), the step runs no teacher and the same
  JSD on the sparse signal (tail bucket). Not the same computation as TRL's (the teacher pass is
  amortised and the divergence is sparse): reported separately.

All cases share the teacher, the student (built from the teacher's layers with
:func:`kdforge.students.student_from_teacher`), the batch (random token blocks from a fixed
seed), AdamW, lr and grad clipping. Reported per case: median step seconds over ``--steps``
after ``--warmup`` steps, tokens/s (batch x seq_len / median), and peak memory (CUDA: max
allocated during the steps; CPU: peak RSS of the process). Every time is also taken as CPU
seconds of the process (``time.process_time``): with ``--threads 1`` on a shared, loaded machine,
CPU time is the contention-robust cost of a step (wall time mostly measures the other jobs).
The summary adds kdforge's speed-up over TRL and its overhead over (SFT step + teacher
forward), from wall and from CPU time.

Run::

    .venv/bin/python benchmarks/kd_step.py                       # SmolLM2 teacher, 6-layer student
    .venv/bin/python benchmarks/kd_step.py --teacher tiny        # tiny random Llama, seconds
    .venv/bin/python benchmarks/kd_step.py --case kdforge        # one case (what the driver runs)
    .venv/bin/python benchmarks/kd_step.py --cases sft kdforge_chunked   # a subset, one process each
    .venv/bin/python benchmarks/kd_step.py --case kdforge_chunked --profile prof.txt  # + torch.profiler table
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES = ("teacher_forward", "sft", "kdforge", "kdforge_default", "trl_gkd", "trl_gkd_liger", "kdforge_default_eager", "kdforge_chunked", "kdforge_chunked_autograd",
         "kdforge_chunked_compiled", "kdforge_cached")

#: cases that need a CUDA GPU, with why: skipped (one JSON line each) on any other device.
GPU_ONLY = {"trl_gkd_liger": "use_liger_kernel=True patches the model with Liger's Triton kernels (RMSNorm, RoPE, "
                             "SwiGLU), which have no CPU backend (triton: '0 active drivers')"}


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=CASES, help="run one case in this process (default: all, each in a subprocess)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                   help="cases the driver runs, each in its own subprocess (default: all)")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="run --cases in ONE process, ROUNDS times in turn (same models), and report the median over "
                        "all timed steps: a paired comparison that a changing machine load affects alike")
    p.add_argument("--profile", type=Path, default=None,
                   help="with --case: write a torch.profiler table (CPU time by op, all steps) to this file")
    p.add_argument("--teacher", default="smollm2",
                   help="'smollm2' (offline asset), 'tiny' (random 4-layer Llama), or a model folder / Hub id")
    p.add_argument("--student-layers", type=int, default=6, help="teacher layers kept in the student")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--beta", type=float, default=0.5, help="generalised JSD beta (TRL convention)")
    p.add_argument("--k", type=int, default=64, help="teacher top-k of the kdforge_cached case")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shared setup
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_models(args: argparse.Namespace):
    """(teacher, student, tokenizer-or-None) on the chosen device/dtype, deterministic."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kdforge.students.from_teacher import student_from_teacher

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    tokenizer = None
    if args.teacher == "tiny":
        cfg = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        teacher = AutoModelForCausalLM.from_config(cfg).to(dtype)
    else:
        path = args.teacher
        if path == "smollm2":
            from kdforge.assets import ensure

            path = str(ensure("smollm2"))
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    layers = min(args.student_layers, teacher.config.num_hidden_layers)
    student = student_from_teacher(teacher, "every_k", num_layers=layers)
    device = _device(args.device)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    return teacher, student, tokenizer


def make_batches(args: argparse.Namespace, vocab: int, n: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (n * args.batch, args.seq_len), generator=g)
    return ids


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Memory:
    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        self.rss_before = _rss_mb()

    def result(self) -> dict[str, float]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return {"peak_mem_mb": torch.cuda.max_memory_allocated(self.device) / 2**20, "mem_kind": "cuda_allocated"}
        return {"peak_mem_mb": _peak_rss_mb(), "rss_before_steps_mb": self.rss_before, "mem_kind": "cpu_peak_rss"}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is what a step costs on a loaded
    shared machine where wall time mostly measures the other jobs."""
    return time.perf_counter(), time.process_time()


def _diff(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return b[0] - a[0], b[1] - a[1]


# ----------------------------------------------------------------------------- the cases
def case_teacher_forward(args, teacher, student, tokenizer) -> list[float]:
    import torch

    device = next(teacher.parameters()).device
    ids = make_batches(args, teacher.config.vocab_size, args.warmup + args.steps)
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            batch = ids[i * args.batch:(i + 1) * args.batch].to(device)
            _sync(device)
            t0 = _now()
            teacher(input_ids=batch, attention_mask=torch.ones_like(batch))
            _sync(device)
            times.append(_diff(t0, _now()))
    return times[args.warmup:]


def case_sft(args, teacher, student, tokenizer) -> list[float]:
    import torch

    device = next(student.parameters()).device
    ids = make_batches(args, teacher.config.vocab_size, args.warmup + args.steps)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(args.warmup + args.steps):
        batch = ids[i * args.batch:(i + 1) * args.batch].to(device)
        _sync(device)
        t0 = _now()
        out = student(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(_diff(t0, _now()))
    return times[args.warmup:]


def case_kdforge(args, teacher, student, tokenizer, *, chunked: bool | str = False, cached: bool = False,
                 closed_form: bool = True, compile_kernels: bool | None = None) -> list[float]:
    import functools

    import kdforge.losses.chunked as chunked_mod

    original = chunked_mod.chunked_distillation_loss
    if not closed_form or compile_kernels is not None:  # the Objective calls the module attribute: route
        options = {"closed_form": closed_form}
        if compile_kernels is not None:
            options["compile_kernels"] = compile_kernels
        chunked_mod.chunked_distillation_loss = functools.partial(original, **options)
    try:
        return _kdforge_steps(args, teacher, student, chunked=chunked, cached=cached)
    finally:
        chunked_mod.chunked_distillation_loss = original


def _kdforge_steps(args, teacher, student, *, chunked: bool | str, cached: bool) -> list[tuple[float, float]]:
    import torch

    from kdforge.data.text import LMBlockDataset
    from kdforge.train import Callback, CausalLMTask, Distiller, Objective

    device = next(student.parameters()).device
    ids = make_batches(args, teacher.config.vocab_size, args.warmup + args.steps)
    extras = None
    if cached:  # what a teacher cache holds: top-k ids and full-vocab log-probs per position
        from kdforge.teachers import OnlineTeacher

        online = OnlineTeacher(teacher)
        parts = [online.topk(ids[i:i + args.batch].to(device), k=args.k) for i in range(0, len(ids), args.batch)]
        extras = {"teacher_ids": torch.cat([p.ids for p in parts]).cpu(),
                  "teacher_logprobs": torch.cat([p.logprobs for p in parts]).float().cpu()}
    stamps: list[tuple[float, float]] = []

    class Timer(Callback):
        def on_step_end(self, state, logs) -> None:
            _sync(device)
            stamps.append(_now())

    config = {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "lr": 1e-5,
              "scheduler": "constant", "max_grad_norm": 1.0, "log_every": 10_000, "progress": False,
              "mixed_precision": "no"}
    objective = Objective([{"name": "generalized_jsd", "weight": 1.0, "params": {"beta": args.beta}}],
                          chunked=chunked)
    distiller = Distiller(student, None if cached else teacher, task=CausalLMTask(), objective=objective,
                          config=config, train_data=LMBlockDataset(ids, extras), callbacks=[Timer()])
    _sync(device)
    stamps.append(_now())
    distiller.train()
    steps = [_diff(a, b) for a, b in zip(stamps[:-1], stamps[1:])]
    return steps[args.warmup:]


def case_trl_gkd(args, teacher, student, tokenizer, *, liger: bool = False) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:  # pragma: no cover
        raise SystemExit(f"trl with trl.experimental.gkd is needed for this case: {exc}") from None

    device = next(student.parameters()).device
    ids = make_batches(args, teacher.config.vocab_size, args.warmup + args.steps)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    stamps: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            _sync(device)
            stamps.append(_now())

        def on_step_end(self, targs, state, control, **kw):
            _sync(device)
            stamps.append(_now())

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        x = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    if tokenizer is None:  # GKD builds a generation config from the tokenizer's pad id
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {f"t{i}": i for i in range(teacher.config.vocab_size)}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                            unk_token="t0", pad_token="t0", eos_token="t1")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        targs = GKDConfig(
            output_dir=tmp, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
            learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0, lmbda=0.0, beta=args.beta,
            temperature=1.0, seq_kd=False, logging_steps=10_000, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=device.type == "cpu", bf16=False, fp16=False,
            max_length=args.seq_len, dataloader_num_workers=0, seed=0, remove_unused_columns=False,
            gradient_checkpointing=False, optim="adamw_torch", use_liger_kernel=liger,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=targs, train_dataset=dataset,
                             data_collator=collate, processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    steps = [_diff(stamps[i], stamps[i + 1]) for i in range(0, len(stamps) - 1, 2)]
    return steps[args.warmup:]


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    teacher, student, tokenizer = build_models(args)
    setup_s = time.perf_counter() - t0
    device = next(student.parameters()).device
    memory = _Memory(device)
    fn = {"teacher_forward": case_teacher_forward, "sft": case_sft, "kdforge": case_kdforge,
          "trl_gkd": case_trl_gkd, "trl_gkd_liger": lambda *a: case_trl_gkd(*a, liger=True),
          "kdforge_default": lambda *a: case_kdforge(*a, chunked="auto"),
          "kdforge_default_eager": lambda *a: case_kdforge(*a, chunked="auto", compile_kernels=False),
          "kdforge_chunked": lambda *a: case_kdforge(*a, chunked=True),
          "kdforge_chunked_autograd": lambda *a: case_kdforge(*a, chunked=True, closed_form=False),
          "kdforge_chunked_compiled": lambda *a: case_kdforge(*a, chunked=True, compile_kernels=True),
          "kdforge_cached": lambda *a: case_kdforge(*a, cached=True)}[args.case]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pairs = fn(args, teacher, student, tokenizer)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        args.profile.write_text(f"# {args.case}: {args.warmup} warm-up + {args.steps} timed steps, all profiled\n"
                                + table + "\n")
    else:
        pairs = fn(args, teacher, student, tokenizer)
    times = [w for w, _ in pairs]
    cpu = [c for _, c in pairs]
    median = statistics.median(times)
    cpu_median = statistics.median(cpu)
    tokens = args.batch * args.seq_len
    from kdforge.students.from_teacher import count_parameters

    return {
        "case": args.case, "teacher": args.teacher, "teacher_params": count_parameters(teacher),
        "student_params": count_parameters(student), "student_layers": student.config.num_hidden_layers,
        "batch": args.batch, "seq_len": args.seq_len, "beta": args.beta, "dtype": args.dtype,
        "device": str(device), "threads": torch.get_num_threads(), "steps": len(times),
        "step_s_median": median, "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": tokens / median, "step_cpu_s_median": cpu_median,
        "step_cpu_s_all": [round(c, 4) for c in cpu], "tokens_per_cpu_s": tokens / cpu_median,
        "setup_s": round(setup_s, 2), **memory.result(),
    }


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"case": "summary"}
    kd, trl, sft, fwd = (results.get(c) for c in ("kdforge", "trl_gkd", "sft", "teacher_forward"))
    for tag, key in (("", "step_s_median"), ("_cpu", "step_cpu_s_median")):
        if kd and trl:
            out[f"kdforge_speedup_vs_trl{tag}"] = trl[key] / kd[key]
        if kd and sft and fwd:
            floor = sft[key] + fwd[key]
            out[f"sft_plus_teacher_forward_s{tag}"] = floor
            out[f"kdforge_overhead{tag}"] = kd[key] / floor
            if trl:
                out[f"trl_overhead{tag}"] = trl[key] / floor
    if kd and trl and "peak_mem_mb" in kd and "peak_mem_mb" in trl:
        out["kdforge_mem_vs_trl"] = kd["peak_mem_mb"] / trl["peak_mem_mb"]
    trl_liger = results.get("trl_gkd_liger")
    for name in ("kdforge_default", "kdforge_default_eager", "kdforge_chunked", "kdforge_chunked_autograd", "kdforge_chunked_compiled",
                 "kdforge_cached"):
        extra = results.get(name)
        if extra and trl:
            out[f"{name}_speedup_vs_trl_cpu"] = trl["step_cpu_s_median"] / extra["step_cpu_s_median"]
            if "peak_mem_mb" in extra and "peak_mem_mb" in trl:
                out[f"{name}_mem_vs_trl"] = extra["peak_mem_mb"] / trl["peak_mem_mb"]
        if extra and trl_liger:
            out[f"{name}_speedup_vs_trl_liger_cpu"] = trl_liger["step_cpu_s_median"] / extra["step_cpu_s_median"]
            out[f"{name}_speedup_vs_trl_liger"] = trl_liger["step_s_median"] / extra["step_s_median"]
        if extra and sft and fwd:
            out[f"{name}_overhead_cpu"] = extra["step_cpu_s_median"] / (sft["step_cpu_s_median"]
                                                                      + fwd["step_cpu_s_median"])
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = _parse(argv)
    if args.case:
        print(json.dumps(run_case(args)), flush=True)
        return 0
    if args.interleave:
        return run_interleaved(args)
    forwarded = _without_cases(list(argv if argv is not None else sys.argv[1:]))
    results: dict[str, dict[str, Any]] = {}
    lines = []
    skipped = _gpu_only_skips(args)
    for case in args.cases:
        if case in skipped:
            lines.append(json.dumps(skipped[case]))
            print(lines[-1], flush=True)
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--case", case]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            record = {"case": case, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        else:
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            results[case] = record
        line = json.dumps(record)
        lines.append(line)
        print(line, flush=True)
    summary = json.dumps(summarise(results))
    lines.append(summary)
    print(summary, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if len(results) + len(skipped) == len(args.cases) else 1


def _gpu_only_skips(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """``{case: skip record}`` for the chosen GPU-only cases when the device is not CUDA."""
    if _device(args.device).type == "cuda":
        return {}
    return {c: {"case": c, "skipped": f"GPU-only: {GPU_ONLY[c]}"} for c in args.cases if c in GPU_ONLY}


def run_interleaved(args: argparse.Namespace) -> int:
    """All ``--cases`` in this process, ``--interleave`` rounds in turn; medians over every timed step.

    Peak memory is not reported (the cases share one process); use the per-process mode for it.
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student, tokenizer = build_models(args)
    fns = {"teacher_forward": case_teacher_forward, "sft": case_sft, "kdforge": case_kdforge, "trl_gkd": case_trl_gkd,
           "trl_gkd_liger": lambda *a: case_trl_gkd(*a, liger=True),
           "kdforge_default": lambda *a: case_kdforge(*a, chunked="auto"),
           "kdforge_default_eager": lambda *a: case_kdforge(*a, chunked="auto", compile_kernels=False),
           "kdforge_chunked": lambda *a: case_kdforge(*a, chunked=True),
           "kdforge_chunked_autograd": lambda *a: case_kdforge(*a, chunked=True, closed_form=False),
           "kdforge_chunked_compiled": lambda *a: case_kdforge(*a, chunked=True, compile_kernels=True),
           "kdforge_cached": lambda *a: case_kdforge(*a, cached=True)}
    skipped = _gpu_only_skips(args)
    for record in skipped.values():
        print(json.dumps(record), flush=True)
    args.cases = [c for c in args.cases if c not in skipped]
    cpu: dict[str, list[float]] = {c: [] for c in args.cases}
    wall: dict[str, list[float]] = {c: [] for c in args.cases}
    for _ in range(args.interleave):
        for case in args.cases:
            for w, c in fns[case](args, teacher, student, tokenizer):
                wall[case].append(w)
                cpu[case].append(c)
    results: dict[str, dict[str, Any]] = {}
    lines = []
    tokens = args.batch * args.seq_len
    for case in args.cases:
        rec = {"case": case, "mode": f"interleaved x{args.interleave}", "teacher": args.teacher,
               "batch": args.batch, "seq_len": args.seq_len, "beta": args.beta, "dtype": args.dtype,
               "threads": torch.get_num_threads(), "steps": len(cpu[case]),
               "step_s_median": statistics.median(wall[case]), "step_cpu_s_median": statistics.median(cpu[case]),
               "step_cpu_s_all": [round(c, 4) for c in cpu[case]],
               "tokens_per_cpu_s": tokens / statistics.median(cpu[case])}
        results[case] = rec
        lines.append(json.dumps(rec))
        print(lines[-1], flush=True)
    lines.append(json.dumps({**summarise(results), "mode": f"interleaved x{args.interleave}"}))
    print(lines[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


def _without_cases(argv: list[str]) -> list[str]:
    """The driver's arguments minus ``--cases ...`` (each subprocess gets ``--case NAME``)."""
    out, skipping = [], False
    for a in argv:
        if a == "--cases" or a.startswith("--cases="):
            skipping = a == "--cases"
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
