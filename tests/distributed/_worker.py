"""Training script run by the distributed tests, once as 1 process and once under
``accelerate launch`` with 2 gloo processes (``configs/accelerate/cpu_2proc.yaml``).

Usage::

    python tests/distributed/_worker.py --out DIR --cache DIR --batch 4 --accum 2 --steps 3
    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        tests/distributed/_worker.py --out DIR --cache DIR --batch 2 --accum 2 --steps 3

Every scenario trains a tiny student from a fixed initialisation on a fixed dataset and writes
(main process) ``OUT/<scenario>.safetensors`` with the final student weights and (every process)
``OUT/<scenario>.rank<R>.json`` with what the test asserts on: how the modules were wrapped, the
real positions counted per micro-batch on this rank, and a hash of the teacher before and after.

Scenarios:

* ``classifier``: an MLP student, an online MLP teacher, ``ClassificationTask``.
* ``lm_online``: a tiny Llama student, an online tiny Llama teacher, variable-length rows with a
  masked prompt (uneven real tokens per rank and per micro-batch), ``CausalLMTask``.
* ``lm_cached``: the same student trained from a sparse top-k teacher cache built with
  :func:`kdforge.teachers.build_teacher_cache` (built under ``main_process_first``), with a
  per-row number of masked label positions (uneven real tokens again).
* ``lm_empty_rank``: as ``lm_online``, but every row rank 1 trains on in the first step has no
  label: a process with zero real tokens must still join the gradient all-reduce (no hang, no
  0/0) and the update must still equal the 1-process one.
* ``lm_online_local_norm`` (2 processes only): the control. Each rank normalises by its own
  real-token count (what "mean per process" does); the test checks this run does *not* match
  the 1-process reference, so the equivalence test has power.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

VOCAB = 64
SEQ = 12


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, classes: int = 5, scale: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


class Points(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.y[i]}


class Rows(Dataset):
    """Variable-length token rows (3..SEQ tokens)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(12)
        lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
        self.rows = [torch.randint(3, VOCAB, (int(m),), generator=g) for m in lengths]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def pad_collate(rows: list[torch.Tensor], prompt: int = 2) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        attn[i, : len(r)] = 1
        labels[i, prompt : len(r)] = r[prompt:]
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


class EmptyForRank1(Dataset):
    """``Rows`` whose items that rank 1 of 2 draws in the first optimizer step carry no label.

    The rows are chosen from the trainer's own sampler order, so the 2-process run has a rank
    with zero real tokens in a whole step while rank 0 has some; the 1-process run trains on the
    very same (partly unlabelled) data.
    """

    def __init__(self, n: int, seed: int, first_step_items: int) -> None:
        from kdforge.train import EpochSampler

        self.rows = Rows(n)
        self.empty = set(EpochSampler(n, seed=seed, num_replicas=2, rank=1).order(0)[:first_step_items])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        return self.rows[i], i in self.empty


def collate_maybe_empty(items: list[tuple[torch.Tensor, bool]]) -> dict[str, torch.Tensor]:
    batch = pad_collate([row for row, _ in items])
    for j, (_, empty) in enumerate(items):
        if empty:
            batch["labels"][j] = -100
    return batch


class MaskedPrefix(Dataset):
    """A teacher-cache dataset whose row ``i`` has its first ``i % 7`` labels masked."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[i])
        item["labels"] = item["labels"].clone()
        item["labels"][: i % 7] = -100
        return item


def tiny_llama(seed: int, head_scale: float = 1.0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def weights_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def counting(task_cls: type) -> type:
    """A task subclass that records the real positions it counts (one entry per micro-batch)."""

    class Counting(task_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.counts: list[int] = []

        def count(self, batch):  # noqa: ANN001
            n = super().count(batch)
            self.counts.append(n)
            return n

    return Counting


class LocalNorm:
    """Control: make the trainer's cross-process count return ``local * world`` (per-rank mean)."""

    def __init__(self, accelerator) -> None:  # noqa: ANN001
        self.acc = accelerator
        self.original = accelerator.reduce

    def __enter__(self) -> None:
        def reduce(tensor, reduction="sum", scale=1.0):  # noqa: ANN001
            # the step's real-position counts (one per micro-batch since the empty-batch guard):
            # this rank's own counts stand in for the global ones
            if torch.is_tensor(tensor) and tensor.dtype == torch.long and tensor.ndim <= 1:
                return tensor * self.acc.num_processes
            return self.original(tensor, reduction, scale)

        self.acc.reduce = reduce

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.acc.reduce = self.original


def run(name: str, args: argparse.Namespace, accelerator) -> None:  # noqa: ANN001
    from kdforge.distributed import wrapper_of
    from kdforge.teachers import TeacherCacheDataset, build_teacher_cache, collate_teacher_cache
    from kdforge.train import CausalLMTask, ClassificationTask, Distiller, LossTerm, TrainConfig

    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, grad_accum_steps=args.accum, lr=args.lr,
                      scheduler="constant", max_grad_norm=1.0, progress=False, log_every=1, seed=5)
    if name == "classifier":
        torch.manual_seed(0)
        teacher, student = MLP(scale=3.0), MLP()
        task = counting(ClassificationTask)()
        data, collate = Points(args.n), None
        objective = [LossTerm("forward_kl", 0.7, {"temperature": 2.0}), LossTerm("cross_entropy", 0.3)]
    elif name in ("lm_online", "lm_online_local_norm"):
        teacher, student = tiny_llama(1, head_scale=4.0), tiny_llama(2)
        task = counting(CausalLMTask)()
        data, collate = Rows(args.n), pad_collate
        objective = [LossTerm("reverse_kl", 0.8, {"temperature": 1.5}), LossTerm("cross_entropy", 0.2)]
    elif name == "lm_empty_rank":
        teacher, student = tiny_llama(1, head_scale=4.0), tiny_llama(2)
        task = counting(CausalLMTask)()
        per_rank = args.batch if accelerator.num_processes == 2 else args.batch // 2
        data = EmptyForRank1(args.n, seed=cfg.seed, first_step_items=per_rank * args.accum)
        collate = collate_maybe_empty
        objective = [LossTerm("forward_kl", 0.5), LossTerm("cross_entropy", 0.5)]
    elif name == "lm_cached":
        with accelerator.main_process_first():  # rank 0 builds; the others find it complete
            cache_teacher = tiny_llama(3, head_scale=4.0)
            g = torch.Generator().manual_seed(13)
            sequences = torch.randint(3, VOCAB, (args.n, SEQ), generator=g)
            build_teacher_cache(cache_teacher, sequences, args.cache, k=8, encoding="raw-fp32",
                                batch_size=4, shard_size=8)
        teacher, student = None, tiny_llama(2)
        task = counting(CausalLMTask)()
        data, collate = MaskedPrefix(TeacherCacheDataset(args.cache)), collate_teacher_cache
        objective = [LossTerm("forward_kl", 1.0, {"sparse_policy": "tail_bucket"})]
    else:
        raise SystemExit(f"unknown scenario {name}")

    teacher_before = weights_hash(teacher) if teacher is not None else None
    d = Distiller(student, teacher, task=task, objective=objective, config=cfg, train_data=data,
                  collate_fn=collate, accelerator=accelerator)
    if name.endswith("local_norm"):
        with LocalNorm(accelerator):
            d.train()
    else:
        d.train()
    info = {
        "scenario": name,
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "student_is_ddp": isinstance(d.student, DistributedDataParallel),
        "teacher_is_ddp": isinstance(d.teacher, DistributedDataParallel),
        "teacher_wrapper": wrapper_of(d.teacher) if teacher is not None else None,
        "student_wrapper": wrapper_of(d.student),
        "teacher_trainable": teacher is not None and any(p.requires_grad for p in d.teacher.parameters()),
        "teacher_in_optimizer": teacher is not None and bool(
            {id(p) for p in d.teacher.parameters()}
            & {id(p) for g in d.optimizer.param_groups for p in g["params"]}),
        "teacher_hash_before": teacher_before,
        "teacher_hash_after": weights_hash(d.teacher) if teacher is not None else None,
        "counts": task.counts,
        "positions_seen": d.state.positions_seen,
        "steps": d.state.step,
    }
    out = Path(args.out)
    (out / f"{name}.rank{accelerator.process_index}.json").write_text(json.dumps(info))
    if accelerator.is_main_process:
        state = {k: v.detach().cpu().contiguous() for k, v in d.unwrapped_student.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--batch", type=int, required=True, help="micro-batch per process")
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--n", type=int, default=24, help="dataset size (a multiple of the global batch)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--scenarios", default="classifier,lm_online,lm_cached,lm_empty_rank,lm_online_local_norm")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from accelerate import Accelerator

    from kdforge.distributed import check_process_group

    accelerator = Accelerator()
    check_process_group(accelerator)  # 2 launched processes must form one group
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in args.scenarios.split(","):
        if name.endswith("local_norm") and accelerator.num_processes == 1:
            continue  # the control is only meaningful with several processes
        run(name, args, accelerator)
    if accelerator.is_main_process:
        (Path(args.out) / "done").write_text(f"{accelerator.num_processes} {os.getpid()}\n")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    from _teardown import (
        exit_without_native_teardown,  # the launched script's folder is on sys.path
    )

    exit_without_native_teardown(main())
