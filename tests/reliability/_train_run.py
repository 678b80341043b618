"""A small distillation run for the SIGKILL tests: checkpoint every step, optionally resume.

Usage::

    python tests/reliability/_train_run.py --out RUN_DIR --steps 8 [--sleep 0.3] [--resume]

Trains a tiny causal LM student (dropout on, so an exact resume must restore the RNG) from
an online tiny causal LM teacher on variable-length rows, with gradient accumulation and a
warm-up + cosine schedule, ``save_every=1``. Writes ``RUN_DIR/final.safetensors`` (the student's
weights) when it finishes. ``--sleep`` pauses after each step so a test can kill it mid-run;
it changes nothing in the arithmetic. Also runs under ``accelerate launch`` (2 processes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

VOCAB = 64


class Rows(Dataset):
    def __init__(self, n: int = 26) -> None:
        g = torch.Generator().manual_seed(21)
        lengths = torch.randint(4, 13, (n,), generator=g)
        self.rows = [torch.randint(3, VOCAB, (int(m),), generator=g) for m in lengths]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        attn[i, : len(r)] = 1
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--batch", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    from _tiny_lm import TinyCausalLM  # the script's own folder is on sys.path

    from kdforge.train import Callback, CausalLMTask, Distiller, LossTerm, TrainConfig

    class Pause(Callback):
        def on_train_begin(self, state) -> None:  # noqa: ANN001
            if state.is_main_process:  # where this attempt starts: 0, or the resumed step
                Path(args.out).mkdir(parents=True, exist_ok=True)
                with open(Path(args.out) / "starts.txt", "a", encoding="utf-8") as fh:
                    fh.write(f"{state.step}\n")

        def on_step_end(self, state, logs) -> None:  # noqa: ANN001
            if args.sleep:
                time.sleep(args.sleep)

    torch.manual_seed(1)
    teacher = TinyCausalLM(VOCAB, head_scale=4.0)
    torch.manual_seed(2)
    student = TinyCausalLM(VOCAB, dropout=0.2)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, grad_accum_steps=2, lr=5e-3,
                      scheduler="cosine", warmup_steps=2, seed=9, save_every=1, keep_last=2, log_every=1,
                      progress=False, output_dir=args.out)
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=collate, train_data=Rows(), config=cfg,
                  objective=[LossTerm("forward_kl", 0.9, {"temperature": 2.0}), LossTerm("cross_entropy", 0.1)],
                  callbacks=[Pause()])
    d.train(resume=args.resume)
    if d.accelerator.is_main_process:
        state = {k: v.detach().cpu().contiguous() for k, v in d.unwrapped_student.state_dict().items()}
        save_file(state, str(Path(args.out) / "final.safetensors"))
    d.accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
