"""Benchmark: peak RSS and CPU per step of the plain vs the chunked objective (V=32768, cached top-16).

Run: ``python tests/train/bench/chunked_mem.py plain`` and ``... chunked`` (separate processes,
since peak RSS only grows).
"""

import resource
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdforge.losses.signal import SparseTeacher
from kdforge.train import CausalLMTask, Distiller, LossTerm, Objective, TrainConfig

V, H, T, B, K, STEPS = 32768, 64, 256, 8, 16, 3


def collate(items):
    ids = torch.stack([r["input_ids"] for r in items])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "teacher_ids": torch.stack([r["teacher_ids"] for r in items]),
            "teacher_logprobs": torch.stack([r["teacher_logprobs"] for r in items])}


def main(mode: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=T,
                                           pad_token_id=0, eos_token_id=2))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(B * STEPS):
        sig = SparseTeacher.from_logits(torch.randn(T, V, generator=g) * 3, K)
        rows.append({"input_ids": torch.randint(3, V, (T,), generator=g), "teacher_ids": sig.ids,
                     "teacher_logprobs": sig.logprobs})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    obj = Objective([LossTerm("forward_kl", 0.9), LossTerm("cross_entropy", 0.1)], chunked=mode == "chunked",
                    chunk_size=512)
    d = Distiller(student, None, task=CausalLMTask(), objective=obj, collate_fn=collate, train_data=rows,
                  config=TrainConfig(max_steps=STEPS, batch_size=B, progress=False, log_every=1))
    t0 = time.process_time()
    state = d.train()
    cpu = time.process_time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{mode}: peak RSS {peak / 1024:.0f} MiB (before training {base / 1024:.0f} MiB), "
          f"CPU {cpu / STEPS:.2f} s/step, loss {state.last_logs['loss']:.5f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "chunked")
