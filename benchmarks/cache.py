"""Benchmark the offline top-k teacher cache: size, fidelity and speed per (k, encoding).

Teacher SmolLM2-135M-Instruct (``kdforge.assets.smollm2``) over real prose (a Jane Austen novel,
``kdforge.assets.austen``). The teacher runs once; its full distribution is summarised per
position by the negative entropy ``sum_v p_v log p_v`` and the exact top-``max(k)`` log-probs,
which is all that is needed to compute, for every k and encoding, the exact

* ``kl_full``: KL(full teacher || reconstruction), the reconstruction being the decoded top-k
  plus the decoded tail mass spread uniformly over the other ``V - k`` ids::

      KL = sum_{i<k} p_i (log p_i - log q_i) + [sum_{i>=k} p_i log p_i] - tail_p log(tail_q / (V - k))

* ``kl_quant``: KL(exact top-k reconstruction || decoded one): the error the encoding adds on
  top of truncation to k (0 for the lossless encoding).

Each case writes a real cache folder with :func:`write_teacher_cache` (fed the precomputed
top-k, so ``write_tokens_per_s`` is the cache's own cost: encoding, hashing, atomic writes) and
reads it back through :class:`TeacherCacheDataset` (``read_tokens_per_s``, checksums verified on
open and timed separately). One end-to-end :func:`build_teacher_cache` run with the live teacher
gives the real build throughput. One JSON object per line on stdout (and ``--out``).

    .venv/bin/python benchmarks/cache.py --tokens 16384 --out benchmarks/results/cache.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("benchmarks.cache")


def load_teacher_and_text(book: str, dtype: str, device: str = "cpu"):
    from transformers import AutoTokenizer

    from kdforge.assets import ensure
    from kdforge.teachers import load_teacher
    from kdforge.teachers.cache import read_texts

    model_dir = ensure("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher = load_teacher(model_dir, dtype=dtype, device=device)
    texts = read_texts(ensure("austen") / f"{book}.txt")
    return teacher, tokenizer, texts


def teacher_pass(teacher, blocks: torch.Tensor, kmax: int, batch_size: int):
    """Exact top-kmax (ids, logprobs) and negative entropy per position; timed."""
    ids, lps, negent = [], [], []
    t0 = time.perf_counter()
    for b in range(0, blocks.shape[0], batch_size):
        logits = teacher.logits(blocks[b : b + batch_size]).float()
        logp = logits.log_softmax(-1)
        del logits
        negent.append((logp.exp() * logp).sum(-1, dtype=torch.float64).cpu())
        v, i = logp.topk(kmax, dim=-1)
        ids.append(i.cpu())
        lps.append(v.cpu())
        del logp
    seconds = time.perf_counter() - t0
    return torch.cat(ids), torch.cat(lps), torch.cat(negent), seconds


def kl_stats(lp_exact: np.ndarray, lq: np.ndarray, negent: np.ndarray, vocab: int) -> dict[str, float]:
    """Per-position KL(full || reconstruction) and KL(exact top-k || decoded top-k)."""
    k = lp_exact.shape[-1]
    lp = lp_exact.astype(np.float64)
    lq = lq.astype(np.float64)
    p = np.exp(lp)
    head_mass = p.sum(-1)
    tail_p = np.clip(1.0 - head_mass, 0.0, 1.0)
    tail_q = np.clip(1.0 - np.exp(lq).sum(-1), 1e-12, 1.0)
    head = (p * (lp - lq)).sum(-1)
    s_tail = negent - (p * lp).sum(-1)  # sum over ids outside the top-k of p log p
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_tail = s_tail - tail_p * np.log(tail_q / (vocab - k))
        kl_quant = head + np.where(tail_p > 0, tail_p * np.log(np.maximum(tail_p, 1e-300) / tail_q), 0.0)
    kl_full = np.maximum(head + kl_tail, 0.0)
    kl_quant = np.maximum(kl_quant, 0.0)
    return {
        "topk_mass_mean": float(head_mass.mean()),
        "topk_mass_median": float(np.median(head_mass)),
        "kl_full_mean": float(kl_full.mean()),
        "kl_full_median": float(np.median(kl_full)),
        "kl_full_p99": float(np.quantile(kl_full, 0.99)),
        "kl_quant_mean": float(kl_quant.mean()),
        "kl_quant_max": float(kl_quant.max()),
    }


def run_case(blocks, ids, lps, negent, vocab, k, encoding, root: Path, teacher_info, shard_size: int) -> dict:
    from kdforge.teachers.cache import TeacherCacheDataset, write_teacher_cache
    from kdforge.teachers.cache.codec import get_encoding

    out = root / f"k{k}-{encoding}"
    topk = lambda x, first: _slice(ids, lps, first, x.shape[0], k, vocab)  # noqa: E731
    t0 = time.perf_counter()
    write_teacher_cache(
        topk, blocks, out, vocab_size=vocab, k=k, teacher_info=teacher_info, encoding=encoding,
        batch_size=8, shard_size=shard_size,
    )
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = TeacherCacheDataset(out, verify=True)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    items = [ds[i] for i in range(len(ds))]
    t_read = time.perf_counter() - t0
    got_ids = torch.stack([it["teacher_ids"] for it in items])
    got_lp = torch.stack([it["teacher_logprobs"] for it in items]).numpy()
    if not torch.equal(got_ids, ids[..., :k]):
        raise AssertionError(f"ids changed through encoding {encoding}")
    n_tok = blocks.numel()
    size = sum(f.stat().st_size for f in out.glob("shard-*.kdc"))
    enc = get_encoding(encoding)
    return {
        "case": f"k{k}/{encoding}",
        "k": k,
        "encoding": encoding,
        "lossless": enc.lossless,
        "tokens": n_tok,
        "bytes_per_token": size / n_tok,
        "signal_bytes_per_token": (size - n_tok * ds.cache.dtype["input_ids"].base.itemsize) / n_tok
        if enc.compression is None
        else None,
        **kl_stats(lps[..., :k].numpy(), got_lp, negent.numpy(), vocab),
        "write_tokens_per_s": n_tok / t_write,
        "verify_open_s": t_open,
        "read_tokens_per_s": n_tok / t_read,
    }


def _slice(ids, lps, first, n, k, vocab):
    from kdforge.losses.signal import SparseTeacher

    return SparseTeacher(ids[first : first + n, :, :k], lps[first : first + n, :, :k], vocab)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="corpus size (multiple of --seq-len)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ks", default="8,16,32,64")
    ap.add_argument("--encodings", default="raw-fp32,raw-fp16,raw-fp16-zstd,compact-u8,compact-u8-zlib,compact-u8-zstd")
    ap.add_argument("--book", default="persuasion")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda: where the teacher runs")
    ap.add_argument("--shard-size", type=int, default=256, help="sequences per shard (library default 256)")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument(
        "--teacher-pass", type=Path, default=None,
        help="file (.pt) storing the teacher pass: loaded if it exists (same corpus/k), else written",
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kdforge").setLevel(logging.WARNING)
    torch.set_grad_enabled(False)

    from kdforge.teachers.cache import build_teacher_cache, pack_tokens

    ks = sorted(int(x) for x in args.ks.split(","))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    teacher, tokenizer, texts = load_teacher_and_text(args.book, args.dtype, device)
    blocks = pack_tokens(texts, tokenizer, args.seq_len, max_blocks=math.ceil(args.tokens / args.seq_len))
    vocab = int(teacher.logits(blocks[:1, :2]).shape[-1])
    log.info("corpus: %d x %d tokens of %s; vocab %d", *blocks.shape, args.book, vocab)
    saved = torch.load(args.teacher_pass) if args.teacher_pass and args.teacher_pass.exists() else None
    if saved is not None and torch.equal(saved["blocks"], blocks) and saved["ids"].shape[-1] >= max(ks):
        ids, lps, negent, secs = saved["ids"], saved["lps"], saved["negent"], saved["seconds"]
        log.info("teacher pass loaded from %s", args.teacher_pass)
    else:
        ids, lps, negent, secs = teacher_pass(teacher, blocks, max(ks), args.batch_size)
        if args.teacher_pass:
            torch.save({"blocks": blocks, "ids": ids, "lps": lps, "negent": negent, "seconds": secs}, args.teacher_pass)
    teacher_tps = blocks.numel() / secs
    log.info("teacher pass: %.1f s, %.0f tokens/s", secs, teacher_tps)
    env = {
        "teacher": "SmolLM2-135M-Instruct",
        "teacher_dtype": args.dtype,
        "corpus": f"austen/{args.book}",
        "seq_len": args.seq_len,
        "shard_size": args.shard_size,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "teacher_tokens_per_s": teacher_tps,
    }
    rows = []
    info = {"id": "SmolLM2-135M-Instruct", "weights_sha256": teacher.weights_hash()}
    with tempfile.TemporaryDirectory(prefix="kdforge-bench-cache-") as tmp:
        for k in ks:
            for encoding in args.encodings.split(","):
                row = {**run_case(blocks, ids, lps, negent, vocab, k, encoding, Path(tmp), info, args.shard_size), **env}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if not args.skip_end_to_end:
            k, encoding = 16, "compact-u8-zstd"
            t0 = time.perf_counter()
            out = build_teacher_cache(teacher, blocks, Path(tmp) / "e2e", k=k, encoding=encoding,
                                      batch_size=args.batch_size, shard_size=args.shard_size, tokenizer=tokenizer,
                                      weights_hash=info["weights_sha256"])
            t = time.perf_counter() - t0
            stats = json.loads((out / "manifest.json").read_text())["stats"]
            row = {"case": f"end-to-end build k{k}/{encoding}", "k": k, "encoding": encoding,
                   "tokens": blocks.numel(), "bytes_per_token": stats["bytes_per_token"],
                   "build_tokens_per_s": blocks.numel() / t, **env}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
