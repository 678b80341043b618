"""Peak memory and time of a distillation loss computed from hidden states (forward + backward).

Setup (not measured): student hidden states ``[tokens, H]`` and LM head ``[V, H]`` (both need
gradients), plus the teacher: by default its hidden states and head (``--teacher head``, what
Liger-Kernel's fused losses take; the teacher's logits are then part of the measured work: per
chunk for the fused implementations, in full for the others), or its logits ``[tokens, V]``
(``--teacher logits``; Liger is skipped there), or a sparse top-``--k`` teacher (``--teacher sparse``:
a ``SparseTeacher`` built from random logits; only the kdforge implementations and the student's
three matrix products of the GEMM floor run: ``kdforge`` takes the sparse closed form,
``kdforge_autograd`` the registered loss under autograd per chunk).

Losses (``--losses``): ``forward_kl`` (KL(p||q)), ``reverse_kl`` (KL(q||p)) and ``jsd`` (generalised
JSD, ``--beta``, default 0.5), summed over tokens; every implementation computes the same value
(Liger's token mean is multiplied back by the token count; see ``loss`` in the output).

Implementations (``--impls``):

* ``kdforge``: :func:`kdforge.losses.chunked_distillation_loss` with its defaults (``chunk_size="auto"``,
  closed-form value and gradient per chunk, ``compile_kernels`` default), the teacher as a
  :class:`~kdforge.losses.TeacherHead`;
* ``kdforge_eager`` / ``kdforge_compiled``: the same with ``compile_kernels=False`` / ``True``;
* ``kdforge_autograd``: ``closed_form=False`` (the registered loss under autograd per chunk);
* ``liger_compiled`` / ``liger_eager``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``beta`` 0 / 1 /
  ``--beta`` for forward KL / reverse KL / JSD; ``compiled=True`` / ``False``; its default 1024-row chunks);
* ``trl``: ``h @ W.T`` then TRL's ``GKDTrainer.generalized_jsd_loss`` on the full logits;
* ``naive``: ``h @ W.T`` then plain PyTorch (``log_softmax`` + ``kl_div``) on the full logits;
* ``gemm_floor``: only the four matrix products of kdforge's chunks (student and teacher logits,
  ``g W``, ``g^T h``) into preallocated buffers: the floor every fused implementation sits on.

Each case runs in its own subprocess and prints one JSON line; ``--rounds R`` runs the whole grid R
times, the implementations interleaved (rotated each round), then prints one summary line per
(tokens, vocab, loss, impl) with the median CPU time, the median peak and the ratios to the GEMM
floor and to Liger compiled of the same round set (``"summary": true``).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` minus what is allocated after setup; on CPU the
growth of the process's peak resident set (Linux ``VmHWM``, reset after setup via
``/proc/self/clear_refs``) over its resident set after setup, with glibc's mmap threshold fixed so
freed arrays leave the resident set. Warm-up: a 16-token pass, and for the compiled
implementations a full-size pass too (so compilation is not timed). Time: best of ``--repeats``
passes; ``cpu_ms`` is the process's CPU time (all threads), the fairer number on a shared CPU.
Cases whose estimated peak exceeds ``--max-gib`` are not run (``"skipped"``).

Usage::

    python benchmarks/loss_memory.py --device cuda          # the full grid on a GPU
    OMP_NUM_THREADS=1 python benchmarks/loss_memory.py --tokens 1024 --vocab 32768 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

IMPLS = ("kdforge", "kdforge_eager", "kdforge_compiled", "kdforge_autograd", "liger_compiled", "liger_eager",
         "trl", "naive", "gemm_floor")
ALIASES = {"kdforge_chunked": "kdforge", "kdforge_chunked_autograd": "kdforge_autograd", "trl_gjsd": "trl"}
LOSSES = ("forward_kl", "reverse_kl", "jsd")
COMPILED = ("kdforge", "kdforge_compiled", "liger_compiled")
MIB = 1 << 20


def estimate_bytes(impl: str, tokens: int, vocab: int, hidden: int, teacher: str, chunk: int) -> int:
    """Rough peak growth of one forward+backward (float32), used to skip cases that cannot fit.

    Multiples of ``tokens x vocab`` float32 arrays: naive ~6, TRL ~16 (measured 8.0 GiB at
    1024 x 131072), Liger ~14 per 1024-row chunk; kdforge holds ~13 for one chunk only. Every
    implementation adds the ``[V, H]`` weight gradient.
    """
    nv = tokens * vocab * 4
    head = vocab * hidden * 4
    extra_teacher = nv if teacher == "head" else 0
    if impl == "naive":
        return 6 * nv + head + extra_teacher
    if impl == "trl":
        return 16 * nv + head + extra_teacher
    if impl.startswith("liger"):
        return 14 * min(tokens, 1024) * vocab * 4 + 2 * head + tokens * hidden * 4
    rows = min(chunk, tokens)
    return 13 * rows * vocab * 4 + 2 * head + tokens * hidden * 4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class CpuPeak:
    """Peak RSS growth over the current RSS (Linux)."""

    def __init__(self) -> None:
        self.resettable = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.resettable = False
        self.base_kib = _status_kib("VmRSS")

    def peak_mib(self) -> float:
        return (_status_kib("VmHWM") - self.base_kib) / 1024.0


def make_inputs(n: int, v: int, h: int, teacher: str, device, k: int = 16):
    import torch

    hidden = (torch.randn(n, h, device=device) * 0.5).requires_grad_()
    weight = (torch.randn(v, h, device=device) * 0.02).requires_grad_()
    if teacher == "sparse":
        from kdforge.losses.signal import SparseTeacher

        return hidden, weight, SparseTeacher.from_logits(torch.randn(n, v, device=device) * 2.0, min(k, v)), None, None
    if teacher == "head":
        return hidden, weight, None, torch.randn(n, h, device=device) * 0.5, torch.randn(v, h, device=device) * 0.02
    return hidden, weight, torch.randn(n, v, device=device) * 2.0, None, None


def _beta(loss: str, beta: float) -> float:
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(loss, beta)


def _kdforge_rows(vocab: int, tokens: int, device, closed_form: bool = True) -> int:
    from kdforge.losses import auto_chunk_size

    return auto_chunk_size(vocab, tokens, device, closed_form=closed_form)


def make_step(impl: str, args: argparse.Namespace, hidden, weight, t_logits, t_hidden, t_weight):
    """One forward + backward of ``impl``; returns the loss value (a sum over tokens)."""
    import torch

    n = hidden.shape[0]
    loss_name = "generalized_jsd" if args.loss == "jsd" else args.loss
    beta = _beta(args.loss, args.beta)
    if impl.startswith("kdforge"):
        from kdforge.losses import TeacherHead, chunked_distillation_loss

        teacher = TeacherHead(t_hidden, t_weight) if t_logits is None else t_logits
        kwargs = {"beta": beta} if loss_name == "generalized_jsd" else {}
        if impl == "kdforge_eager":
            kwargs["compile_kernels"] = False
        elif impl == "kdforge_compiled":
            kwargs["compile_kernels"] = True
        elif impl == "kdforge_autograd":
            kwargs["closed_form"] = False
        if args.chunk_size != "auto":
            kwargs["chunk_size"] = int(args.chunk_size)

        def step():
            out = chunked_distillation_loss(hidden, weight, teacher, loss=loss_name, reduction="sum", **kwargs)
            out["loss"].backward()
            return out["loss"].detach()

        step.rows = (_kdforge_rows(weight.shape[0], n, hidden.device, impl != "kdforge_autograd")
                     if args.chunk_size == "auto" else int(args.chunk_size))
        return step
    if impl.startswith("liger"):
        if t_logits is not None:
            raise SystemExit("liger needs --teacher head (its fused losses take the teacher's hidden states)")
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                     compiled=impl == "liger_compiled")
        labels = torch.zeros(n, dtype=torch.long, device=hidden.device)

        def step():
            loss = fn(hidden, weight, t_hidden, t_weight, labels)
            loss.backward()
            return loss.detach() * n  # Liger divides by the token count

        step.rows = min(n, 1024)
        return step
    if impl == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd import GKDTrainer

        def step():
            logits = hidden @ weight.t()
            with torch.no_grad():
                t = t_logits if t_logits is not None else t_hidden @ t_weight.t()
            loss = GKDTrainer.generalized_jsd_loss(logits[None], t[None], beta=beta, reduction="sum")
            loss.backward()
            return loss.detach()

        return step
    if impl == "naive":
        F = torch.nn.functional

        def step():
            logq = torch.log_softmax(hidden @ weight.t(), -1)
            with torch.no_grad():
                logp = torch.log_softmax(t_logits if t_logits is not None else t_hidden @ t_weight.t(), -1)
            if args.loss == "forward_kl":
                loss = F.kl_div(logq, logp, reduction="sum", log_target=True)
            elif args.loss == "reverse_kl":
                loss = F.kl_div(logp, logq, reduction="sum", log_target=True)
            else:
                logm = torch.logsumexp(torch.stack([logq + torch.log1p(torch.tensor(-beta)),
                                                    logp + torch.log(torch.tensor(beta))]), 0)
                loss = (beta * F.kl_div(logm, logp, reduction="sum", log_target=True)
                        + (1 - beta) * F.kl_div(logm, logq, reduction="sum", log_target=True))
            loss.backward()
            return loss.detach()

        return step
    if impl == "gemm_floor":
        rows = (_kdforge_rows(weight.shape[0], n, hidden.device) if args.chunk_size == "auto"
                else int(args.chunk_size))
        h_all, w = hidden.detach(), weight.detach()
        ht_all = t_hidden if t_hidden is not None else None
        zs = torch.empty(rows, w.shape[0], device=w.device)
        zt = torch.empty_like(zs)
        g_h = torch.empty_like(h_all)
        g_w = torch.empty_like(w)

        def step():
            for i, start in enumerate(range(0, n, rows)):
                end = min(start + rows, n)
                h = h_all[start:end]
                s, t = zs[: end - start], zt[: end - start]
                torch.mm(h, w.t(), out=s)
                if ht_all is not None:
                    torch.mm(ht_all[start:end], t_weight.t(), out=t)
                torch.mm(s, w, out=g_h[start:end])
                g_w.addmm_(s.t(), h, beta=1.0 if i else 0.0)
            return g_w[0, 0]

        step.rows = rows
        return step
    raise SystemExit(f"unknown impl {impl!r}; choose from {IMPLS}")


def run_case(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    n, v, h = args.tokens, args.vocab, args.hidden
    # Warm-up on a tiny batch: loads kernels and code pages so they do not count as loss memory.
    warm = make_inputs(16, v, h, args.teacher, device, args.k)
    make_step(args.impl, args, *warm)()
    del warm
    inputs = make_inputs(n, v, h, args.teacher, device, args.k)
    hidden, weight = inputs[0], inputs[1]
    step = make_step(args.impl, args, *inputs)
    if args.impl in COMPILED:  # compile for the real shapes outside the timed passes
        step()
        hidden.grad = weight.grad = None

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        probe = None
    else:
        probe = CpuPeak()
    times, cpu_times = [], []
    loss_value = None
    peak = float("nan")
    for i in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_value = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
        cpu_times.append((time.process_time() - c0) * 1000.0)
        if i == 0:
            peak = (torch.cuda.max_memory_allocated() - base) / MIB if probe is None else probe.peak_mib()
        hidden.grad = None
        weight.grad = None
    record = {
        "impl": args.impl, "loss_name": args.loss, "tokens": n, "vocab": v, "hidden": h,
        "peak_mib": round(peak, 1), "ms": round(min(times), 1), "cpu_ms": round(min(cpu_times), 1),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "teacher": args.teacher, "loss": float(loss_value) if args.impl != "gemm_floor" else None,
    }
    if hasattr(step, "rows"):
        record["chunk_rows"] = step.rows
    if probe is not None and not probe.resettable:
        record["note"] = "VmHWM could not be reset; peak includes setup"
    return record


def summarize(records: list[dict]) -> list[dict]:
    """Median CPU time (CUDA: wall time) and peak per case and impl, with ratios to the floor and Liger."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if "cpu_ms" in r:
            groups.setdefault((r["tokens"], r["vocab"], r["loss_name"], r["impl"]), []).append(r)
    ran = [r for g in groups.values() for r in g]
    key = "ms" if any(not r.get("device", "cpu").startswith("cpu") for r in ran) else "cpu_ms"
    med = {k: statistics.median(x[key] for x in v) for k, v in groups.items()}
    out = []
    for (tokens, vocab, loss, impl), rs in groups.items():
        row = {"summary": True, "impl": impl, "loss_name": loss, "tokens": tokens, "vocab": vocab,
               f"median_{key}": round(med[(tokens, vocab, loss, impl)], 1), "runs": len(rs),
               "median_peak_mib": round(statistics.median(x["peak_mib"] for x in rs), 1)}
        for ref in ("gemm_floor", "liger_compiled"):
            if (tokens, vocab, loss, ref) in med and impl != ref:
                row[f"time_vs_{ref}"] = round(med[(tokens, vocab, loss, impl)] / med[(tokens, vocab, loss, ref)], 3)
        lig = groups.get((tokens, vocab, loss, "liger_compiled"))
        if lig and impl != "liger_compiled":
            row["peak_vs_liger_compiled"] = round(row["median_peak_mib"]
                                                  / max(statistics.median(x["peak_mib"] for x in lig), 1e-9), 3)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + tuple(ALIASES))
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--vocab", nargs="+", type=int, default=[32768, 131072])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--teacher", choices=("logits", "head", "sparse"), default="head")
    p.add_argument("--k", type=int, default=16, help="top-k of --teacher sparse")
    p.add_argument("--beta", type=float, default=0.5, help="the JSD's beta")
    p.add_argument("--chunk-size", default="auto", help="rows per chunk for kdforge and the floor, or 'auto'")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per process (best is kept)")
    p.add_argument("--rounds", type=int, default=1, help="times the whole grid is run, interleaved")
    p.add_argument("--max-gib", type=float, default=8.0, help="skip cases estimated above this peak")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--loss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if _cuda_available() else "cpu"
    if args.worker:
        args.tokens, args.vocab = args.tokens[0], args.vocab[0]
        print(json.dumps(run_case(args)), flush=True)
        return 0
    impls = list(dict.fromkeys(ALIASES.get(i, i) for i in args.impls))
    if args.teacher != "head":
        impls = [i for i in impls if not i.startswith("liger")]
    if args.teacher == "sparse":
        impls = [i for i in impls if i.startswith("kdforge") or i == "gemm_floor"]
    records = []
    for rnd in range(args.rounds):
        order = impls[rnd % len(impls):] + impls[: rnd % len(impls)]  # rotate: no impl always first
        for tokens in args.tokens:
            for vocab in args.vocab:
                for loss in args.losses:
                    for impl in order:
                        rec = _run_one(args, impl, loss, tokens, vocab)
                        rec["round"] = rnd
                        records.append(rec)
                        print(json.dumps(rec), flush=True)
    for row in summarize(records):
        print(json.dumps(row), flush=True)
    return 0


def _run_one(args: argparse.Namespace, impl: str, loss: str, tokens: int, vocab: int) -> dict:
    chunk = (_kdforge_rows(vocab, tokens, args.device) if args.chunk_size == "auto" else int(args.chunk_size))
    est = estimate_bytes(impl, tokens, vocab, args.hidden, args.teacher, chunk)
    base = {"impl": impl, "loss_name": loss, "tokens": tokens, "vocab": vocab, "estimated_mib": round(est / MIB)}
    if est > args.max_gib * (1 << 30):
        return {**base, "skipped": f"estimated peak {est / (1 << 30):.1f} GiB > --max-gib {args.max_gib}"}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--loss", loss,
           "--tokens", str(tokens), "--vocab", str(vocab), "--hidden", str(args.hidden), "--teacher", args.teacher,
           "--beta", str(args.beta), "--k", str(args.k), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
           "--device", args.device]
    # Fixed mmap threshold: freed big arrays go back to the OS, so RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "skipped": f"timed out after {args.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**base, "error": f"exit {proc.returncode}: {err}"}
    return {**json.loads(lines[-1]), "estimated_mib": base["estimated_mib"]}


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
