"""Build a small multi-shard teacher cache, for the SIGKILL tests.

Usage::

    python tests/reliability/_build_cache.py --out CACHE_DIR [--sleep 0.2]

A tiny causal LM teacher (fixed seed) over 40 fixed sequences of 16 tokens, 4 sequences per shard
(10 shards), top-8, the default compressed encoding. ``--sleep`` pauses after each committed
shard so a test can kill the build mid-way; it changes no byte of the output. Rerunning the
same command resumes an unfinished build.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

NUM_SEQ, SEQ_LEN, SHARD = 40, 16, 4


def sequences() -> torch.Tensor:
    g = torch.Generator().manual_seed(31)
    return torch.randint(0, 128, (NUM_SEQ, SEQ_LEN), generator=g)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from _tiny_lm import TinyCausalLM  # the script's own folder is on sys.path

    from kdforge.teachers import build_teacher_cache

    torch.manual_seed(0)
    teacher = TinyCausalLM(128, head_scale=20.0)

    def pause(index: int, entry: dict) -> None:
        if args.sleep:
            time.sleep(args.sleep)

    build_teacher_cache(teacher, sequences(), args.out, k=8, batch_size=2, shard_size=SHARD,
                        encoding="compact-u8-zstd", on_shard=pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
