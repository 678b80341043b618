"""The teacher-cache build's throughput against the bare teacher forward, in the same run.

Teacher SmolLM2-135M-Instruct (``kdforge.assets.smollm2``) over packed blocks of a Jane Austen
novel (``kdforge.assets.austen``). Per ``--rounds`` round and teacher dtype, interleaved:

* ``forward``: the teacher's forward alone (``model(input_ids).logits`` under
  ``torch.inference_mode``), in the builder's batches: the floor of any cache build;
* ``build``: :func:`kdforge.teachers.cache.build_teacher_cache` on the same blocks (forward,
  log-softmax, top-k, encoding, hashing, atomic shard writes) into a fresh folder.

Reported per case (one JSON line each, then a summary per dtype with the medians): tokens/s
from wall time and from the process's CPU time (the fairer number on a shared machine), and
``build_vs_forward`` = build tokens/s / forward tokens/s (goal >= 0.95). The blocks are packed
to one length (``pack_tokens``), so there is no padding to save by sorting by length; the builder
takes fixed-length sequences. ``--dtypes bfloat16`` loads the teacher in bf16 (where the device
supports it: CUDA with bf16, or a CPU; its speed on a CPU depends on AVX512-BF16/AMX).

    OMP_NUM_THREADS=1 python benchmarks/teacher_pass.py --tokens 2048 --rounds 2 --dtypes float32 bfloat16
    python benchmarks/teacher_pass.py --device cuda --tokens 65536 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype_supported(dtype: str, device) -> bool:
    import torch

    if dtype != "bfloat16" or device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (the builder's default)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--encoding", default="compact-u8-zstd")
    ap.add_argument("--book", default="persuasion")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from kdforge.assets import ensure
    from kdforge.teachers import load_teacher
    from kdforge.teachers.cache import build_teacher_cache, pack_tokens, read_texts

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    model_dir = ensure("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = read_texts(ensure("austen") / f"{args.book}.txt")
    blocks = pack_tokens(texts, tokenizer, args.seq_len, max_blocks=math.ceil(args.tokens / args.seq_len))
    n_tok = blocks.numel()
    teachers = {d: load_teacher(model_dir, dtype=d, device=device) for d in args.dtypes if _dtype_supported(d, device)}
    lines: list[dict] = []
    for d in args.dtypes:
        if d not in teachers:
            lines.append({"case": "skipped", "dtype": d, "reason": f"{d} not supported on {device}"})
            print(json.dumps(lines[-1]), flush=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward(teacher) -> None:
        model = teacher.model if hasattr(teacher, "model") else teacher
        with torch.inference_mode():
            for i in range(0, len(blocks), args.batch_size):
                _ = model(input_ids=blocks[i:i + args.batch_size].to(device)).logits

    def build(teacher, root: Path, r: int) -> None:
        build_teacher_cache(teacher, blocks, root / f"cache-{r}-{id(teacher)}", k=args.k, encoding=args.encoding,
                            batch_size=args.batch_size, tokenizer=tokenizer, weights_hash="bench", overwrite=True)

    with tempfile.TemporaryDirectory(prefix="kdforge-teacher-pass-") as tmp:
        for teacher in teachers.values():  # warm-up: kernels, code pages, the first shard's codec setup
            forward(teacher)
        for r in range(args.rounds):
            order = [("forward", "build"), ("build", "forward")][r % 2]  # alternate which goes first
            for dtype, teacher in teachers.items():
                for case in order:
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    forward(teacher) if case == "forward" else build(teacher, Path(tmp), r)
                    sync()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    lines.append({"case": case, "dtype": dtype, "round": r, "tokens": n_tok, "device": str(device),
                                  "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                                  "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                                  "tokens_per_s": round(n_tok / wall, 1), "tokens_per_cpu_s": round(n_tok / cpu, 1)})
                    print(json.dumps(lines[-1]), flush=True)
    for dtype in teachers:
        rows = {c: [x for x in lines if x.get("dtype") == dtype and x.get("case") == c] for c in ("forward", "build")}
        med = {c: {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "tokens_per_cpu_s")}
               for c, rs in rows.items()}
        lines.append({"case": "summary", "dtype": dtype, "device": str(device), "rounds": args.rounds,
                      "forward_tokens_per_s": med["forward"]["tokens_per_s"],
                      "build_tokens_per_s": med["build"]["tokens_per_s"],
                      "forward_tokens_per_cpu_s": med["forward"]["tokens_per_cpu_s"],
                      "build_tokens_per_cpu_s": med["build"]["tokens_per_cpu_s"],
                      "build_vs_forward": round(med["build"]["tokens_per_s"] / med["forward"]["tokens_per_s"], 3),
                      "build_vs_forward_cpu": round(med["build"]["tokens_per_cpu_s"]
                                                    / med["forward"]["tokens_per_cpu_s"], 3)})
        print(json.dumps(lines[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write("".join(json.dumps(x) + "\n" for x in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
