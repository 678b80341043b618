"""CPU time of one chunk's closed-form kernel (student softmax + divergence value and gradient).

What :func:`kdforge.losses.chunked._closed_form_chunk` does on a ``[rows, V]`` float32 chunk
between the LM-head products, timed in one process, interleaved, with glibc's mmap threshold
fixed as in ``loss_memory.py`` (so a fresh ``[rows, V]`` array pays its page faults, as it does
in a real process for arrays of the "auto" size). Variants:

* ``before_eager`` / ``before_compiled``: log-softmax in place, ``exp`` into a ``q`` buffer, then the
  closed form returning its gradient in a fresh array (the code before 2026-12-05, second session);
* ``after_eager`` / ``after_compiled``: ``softmax`` into ``q``, log-softmax in place, the closed
  form writing its gradient into a reused buffer (``ClosedForm(..., out=)``: the current code;
  for forward KL and TVD, ``eager_into`` makes the compiled kernel run its eager ``out=`` form,
  and ``after_compiled_forced`` is the compiled one written into the buffer);
* ``fused_compiled`` (reverse KL only): one ``torch.compile``-d function from the student's and the
  teacher's logits to the value and the gradient (written into the buffer): a rejected design;
* ``after_blocks_B``: the current code run on blocks of ``B`` rows (cache-resident): rejected.

Prints one JSON line per variant (min and median CPU ms over ``--repeats``).

    OMP_NUM_THREADS=1 python benchmarks/closed_form_chunk.py --rows 256 --vocab 32768 --loss reverse_kl
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--loss", default="reverse_kl", choices=("reverse_kl", "forward_kl", "jsd", "tvd"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--blocks", type=int, nargs="*", default=[8, 32])
    args = ap.parse_args(argv)
    with contextlib.suppress(OSError):  # M_MMAP_THRESHOLD = 1 MiB: freed [rows, V] arrays leave the process
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)

    from dataclasses import replace

    import torch

    from kdforge.losses.divergences import (
        _gjsd_chunk,
        forward_kl_kernel,
        reverse_kl_kernel,
        tvd_chunk_kernel,
    )

    torch.set_num_threads(1)
    kernel = {"reverse_kl": reverse_kl_kernel, "forward_kl": forward_kl_kernel,
              "jsd": _gjsd_chunk({"beta": 0.5}), "tvd": tvd_chunk_kernel}[args.loss]
    compiled = kernel.compiled()
    forced = replace(compiled, eager_into=False)  # compiled even where eager_into picks the eager form
    r, v = args.rows, args.vocab
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(r, v, generator=g) * 2
    t = torch.randn(r, v, generator=g) * 2
    z, q, out = torch.empty(r, v), torch.empty(r, v), torch.empty(r, v)

    def before(k):
        def run():
            logq = torch.ops.aten._log_softmax.out(z, -1, False, out=z)
            res = k(logq, torch.exp(logq, out=q), t)
            return res.per_pos, res.grad
        return run

    def after(k, rows=r):
        def run():
            pos, grads = [], []  # per block; concatenated for the check, outside the timing
            for s in range(0, r, rows):
                zs = z[s:s + rows]
                qs = torch.ops.aten._softmax.out(zs, -1, False, out=q[s:s + rows])
                logq = torch.ops.aten._log_softmax.out(zs, -1, False, out=zs)
                res = k(logq, qs, t[s:s + rows], out=out[s:s + rows])  # grad: out, or fresh (no out= form)
                pos.append(res.per_pos)
                grads.append(res.grad)
            return pos, grads
        return run

    def rkl_from_logits(zz, tt, buf):
        logq = torch.log_softmax(zz, -1)
        qq = logq.exp()
        d = logq - torch.log_softmax(tt, -1)
        kl = (qq * d).sum(-1)
        buf.copy_(qq * (d - kl.unsqueeze(1)))
        return kl

    variants = {"before_eager": before(kernel), "before_compiled": before(compiled),
                "after_eager": after(kernel), "after_compiled": after(compiled)}
    if kernel.eager_into:
        variants["after_compiled_forced"] = after(forced)
    if args.loss == "reverse_kl":
        fused = torch.compile(rkl_from_logits, dynamic=True)
        variants["fused_compiled"] = lambda: (fused(z, t, out), out)
    for b in args.blocks:
        variants[f"after_blocks_{b}"] = after(kernel, b)
    def joined(res):
        pos, grad = res
        return (torch.cat(pos), torch.cat(grad)) if isinstance(pos, list) else (pos, grad)

    z.copy_(z0)
    ref_pos, ref_grad = (x.clone() for x in variants["before_eager"]())
    for name, fn in variants.items():  # warm-up (compilation) and a check of every variant's numbers
        z.copy_(z0)
        pos, grad = joined(fn())
        torch.testing.assert_close(pos, ref_pos, rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            z.copy_(z0)
            c0 = time.process_time()
            res = fn()
            times[name].append((time.process_time() - c0) * 1000)
            del res
    for name, ms in times.items():
        print(json.dumps({"variant": name, "loss": args.loss, "rows": r, "vocab": v, "threads": 1,
                          "min_cpu_ms": round(min(ms), 2), "median_cpu_ms": round(statistics.median(ms), 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
