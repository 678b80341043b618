"""CPU time of the ``gold`` loss (forward + backward) with kdforge's partial selection against the
definition's full sort of both sides' unshared probabilities, interleaved in one process.

The shapes are the cross-tokenizer recipe's: a 4,096-token student BPE against SmolLM2's 49,152
tokens, 3,510 of them shared by string (docs/cross-tokenizer.md). Prints one JSON object: CPU
seconds per round for each variant and both loss values.

    OMP_NUM_THREADS=1 python benchmarks/gold_loss.py --rows 1024 --rounds 2
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import torch

uld_module = importlib.import_module("kdforge.losses.uld")  # the module (``kdforge.losses.uld`` is also the function)


def full_sort_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The definition: both sides sorted in full, the shorter zero-padded."""
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p.sort(dim=-1, descending=True).values, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q.sort(dim=-1, descending=True).values, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--student-vocab", type=int, default=4096)
    ap.add_argument("--teacher-vocab", type=int, default=49152)
    ap.add_argument("--shared", type=int, default=3510)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(args.rows, args.student_vocab, generator=g, requires_grad=True)
    zt = torch.randn(args.rows, args.teacher_vocab, generator=g)
    cross = uld_module.CrossVocabTeacher(
        zt, shared_student_ids=torch.randperm(args.student_vocab, generator=g)[: args.shared],
        shared_teacher_ids=torch.randperm(args.teacher_vocab, generator=g)[: args.shared])
    kdforge_l1 = uld_module._sorted_l1
    out: dict[str, list[float]] = {"kdforge_cpu_s": [], "full_sort_cpu_s": [], "kdforge_loss": [], "full_sort_loss": []}
    try:
        for _ in range(args.rounds):
            for name, l1 in (("kdforge", kdforge_l1), ("full_sort", full_sort_l1)):
                uld_module._sorted_l1 = l1
                zs.grad = None
                t0 = time.process_time()
                loss = uld_module.gold(zs, cross)
                loss.backward()
                out[f"{name}_cpu_s"].append(round(time.process_time() - t0, 3))
                out[f"{name}_loss"].append(loss.item())
    finally:
        uld_module._sorted_l1 = kdforge_l1
    print(json.dumps({**vars(args), **out}))


if __name__ == "__main__":
    main()
