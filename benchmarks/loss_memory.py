"""Peak memory and time of a distillation loss computed from hidden states (forward + backward).

Setup (not measured): student hidden states ``[tokens, H]`` and LM head ``[V, H]`` (both need
gradients), plus the teacher: its logits ``[tokens, V]`` (``--teacher logits``, default) or its
hidden states and head (``--teacher head``: the teacher's logits are then part of the measured
work for the full-logit implementations, per chunk for kdforge).

Implementations:

* ``kdforge_chunked``: :func:`kdforge.losses.chunked_distillation_loss` (fused head + loss, chunked;
  closed-form value and gradient per chunk, :mod:`kdforge.losses.fused`),
* ``kdforge_chunked_autograd``: the same with ``closed_form=False`` (the registered loss under
  autograd per chunk: what the chunked path cost before the closed forms),
* ``trl_gjsd``: ``h @ W.T`` then TRL's ``GKDTrainer.generalized_jsd_loss`` on the full logits,
* ``naive``: ``h @ W.T`` then plain PyTorch forward KL (log_softmax + kl_div) on the full logits.

kdforge and TRL compute the same loss (generalised JSD, ``--beta``, sum over tokens); naive is
forward KL (``--kd-loss forward_kl`` runs kdforge on that loss for a like-for-like comparison). Each case runs in its own subprocess and prints one JSON line:
``{"impl", "tokens", "vocab", "peak_mib", "ms", "device", ...}``. Memory: on CUDA
``torch.cuda.max_memory_allocated`` minus what is allocated after setup; on CPU the growth of
the process's peak resident set (Linux ``VmHWM``, reset after setup via ``/proc/self/clear_refs``)
over its resident set after setup, with glibc's mmap threshold fixed so freed arrays leave the
resident set, after a 16-token warm-up that loads the kernels. Cases whose estimated peak exceeds ``--max-gib`` are not run
(``"skipped"``). Time: best of ``--repeats`` forward+backward passes (first pass included):
``ms`` is wall-clock, ``cpu_ms`` the process's CPU time (all threads), the fairer number on a
shared, oversubscribed CPU.

Usage::

    python benchmarks/loss_memory.py                       # the full grid
    python benchmarks/loss_memory.py --tokens 1024 --vocab 32768 --impls kdforge_chunked trl_gjsd
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

IMPLS = ("kdforge_chunked", "kdforge_chunked_autograd", "trl_gjsd", "naive")
MIB = 1 << 20


# ----------------------------------------------------------------------------------- estimates


def estimate_bytes(impl: str, tokens: int, vocab: int, hidden: int, teacher: str, chunk: int) -> int:
    """Rough peak growth of one forward+backward (float32), used to skip cases that cannot fit.

    Multiples of ``tokens x vocab`` float32 arrays counted from the implementations: naive keeps
    logits, two log-softmaxes, the KL terms and their gradients (~6); TRL's mixture adds a stacked
    copy, the mixture, two KL arrays and their gradients (~16, measured 8.0 GiB at 1024 x 131072). kdforge holds such arrays for one chunk only,
    plus a float32 weight-gradient accumulator (~13 counted).
    """
    nv = tokens * vocab * 4
    head = vocab * hidden * 4
    extra_teacher = nv if teacher == "head" else 0
    if impl == "naive":
        return 6 * nv + head + extra_teacher
    if impl == "trl_gjsd":
        return 16 * nv + head + extra_teacher
    rows = min(chunk, tokens)
    return 13 * rows * vocab * 4 + 2 * head + tokens * hidden * 4


# ----------------------------------------------------------------------------------- memory probes


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


# ----------------------------------------------------------------------------------- worker


def make_inputs(n: int, v: int, h: int, teacher: str, device):
    import torch

    hidden = (torch.randn(n, h, device=device) * 0.5).requires_grad_()
    weight = (torch.randn(v, h, device=device) * 0.02).requires_grad_()
    if teacher == "head":
        return hidden, weight, None, torch.randn(n, h, device=device) * 0.5, torch.randn(v, h, device=device) * 0.02
    return hidden, weight, torch.randn(n, v, device=device) * 2.0, None, None


def make_step(impl: str, args: argparse.Namespace, hidden, weight, t_logits, t_hidden, t_weight):
    """One forward + backward of ``impl``; returns the loss value."""
    import torch

    if impl in ("kdforge_chunked", "kdforge_chunked_autograd"):
        from kdforge.losses import TeacherHead, auto_chunk_size, chunked_distillation_loss

        rows = (auto_chunk_size(weight.shape[0], hidden.shape[0], hidden.device,
                                closed_form=impl == "kdforge_chunked") if args.chunk_size == "auto"
                else int(args.chunk_size))
        teacher = TeacherHead(t_hidden, t_weight) if t_logits is None else t_logits

        size = "auto" if args.chunk_size == "auto" else rows  # "auto": the default, as users get it

        def step():
            params = {"beta": args.beta} if args.kd_loss == "generalized_jsd" else {}
            out = chunked_distillation_loss(hidden, weight, teacher, loss=args.kd_loss, chunk_size=size,
                                            reduction="sum", closed_form=impl == "kdforge_chunked", **params)
            out["loss"].backward()
            return out["loss"].detach()

        step.rows = rows
        return step
    if impl == "trl_gjsd":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd import GKDTrainer

        def step():
            logits = hidden @ weight.t()
            with torch.no_grad():
                t = t_logits if t_logits is not None else t_hidden @ t_weight.t()
            loss = GKDTrainer.generalized_jsd_loss(logits[None], t[None], beta=args.beta, reduction="sum")
            loss.backward()
            return loss.detach()

        return step
    if impl == "naive":

        def step():
            logits = hidden @ weight.t()
            with torch.no_grad():
                t = t_logits if t_logits is not None else t_hidden @ t_weight.t()
            loss = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(t, -1),
                                              reduction="sum", log_target=True)
            loss.backward()
            return loss.detach()

        return step
    raise SystemExit(f"unknown impl {impl!r}; choose from {IMPLS}")


def run_case(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    n, v, h = args.tokens, args.vocab, args.hidden
    # Warm-up on a tiny batch: loads kernels and code pages so they do not count as loss memory.
    warm = make_inputs(16, v, h, args.teacher, device)
    make_step(args.impl, args, *warm)()
    del warm
    inputs = make_inputs(n, v, h, args.teacher, device)
    hidden, weight = inputs[0], inputs[1]
    step = make_step(args.impl, args, *inputs)

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        probe = None
    else:
        probe = CpuPeak()
    times = []
    cpu_times = []
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
        "impl": args.impl,
        "tokens": n,
        "vocab": v,
        "peak_mib": round(peak, 1),
        "ms": round(min(times), 1),
        "cpu_ms": round(min(cpu_times), 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "hidden": h,
        "teacher": args.teacher,
        "loss": float(loss_value),
    }
    if hasattr(step, "rows"):
        record["chunk_rows"] = step.rows
        record["kd_loss"] = args.kd_loss
    if probe is not None and not probe.resettable:
        record["note"] = "VmHWM could not be reset; peak includes setup"
    return record


# ----------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--vocab", nargs="+", type=int, default=[32768, 49152, 131072])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--teacher", choices=("logits", "head"), default="logits")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--kd-loss", choices=("generalized_jsd", "forward_kl"), default="generalized_jsd",
                   help="loss of kdforge_chunked (generalized_jsd compares with trl_gjsd, forward_kl with naive)")
    p.add_argument("--chunk-size", default="auto", help="rows per chunk for kdforge, or 'auto'")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=8.0, help="skip cases estimated above this peak")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.tokens, args.vocab = args.tokens[0], args.vocab[0]
        print(json.dumps(run_case(args)), flush=True)
        return 0

    for tokens in args.tokens:
        for vocab in args.vocab:
            for impl in args.impls:
                if args.chunk_size == "auto":
                    from kdforge.losses import auto_chunk_size

                    chunk = auto_chunk_size(vocab, tokens, args.device, closed_form=impl == "kdforge_chunked")
                else:
                    chunk = int(args.chunk_size)
                est = estimate_bytes(impl, tokens, vocab, args.hidden, args.teacher, chunk)
                base = {"impl": impl, "tokens": tokens, "vocab": vocab, "estimated_mib": round(est / MIB)}
                if est > args.max_gib * (1 << 30):
                    print(json.dumps({**base, "skipped": f"estimated peak {est / (1 << 30):.1f} GiB > --max-gib "
                                                         f"{args.max_gib}"}), flush=True)
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--tokens", str(tokens),
                       "--vocab", str(vocab), "--hidden", str(args.hidden), "--teacher", args.teacher,
                       "--beta", str(args.beta), "--kd-loss", args.kd_loss, "--chunk-size", str(args.chunk_size), "--repeats",
                       str(args.repeats), "--device", args.device]
                # Fixed mmap threshold: freed big arrays go back to the OS, so RSS tracks live memory.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                except subprocess.TimeoutExpired:
                    print(json.dumps({**base, "skipped": f"timed out after {args.timeout:.0f} s"}), flush=True)
                    continue
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(json.dumps({**base, "error": f"exit {proc.returncode}: {err}"}), flush=True)
                    continue
                print(json.dumps({**json.loads(lines[-1]), "estimated_mib": base["estimated_mib"]}), flush=True)
    return 0


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
