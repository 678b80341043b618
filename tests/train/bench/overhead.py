"""Benchmark: Distiller vs a bare PyTorch KD loop, CPU seconds per step.

Run: ``python tests/train/bench/overhead.py`` (about a minute on one core).
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdforge.losses import cross_entropy, forward_kl
from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig

V, H, L, T, B, STEPS = 2048, 128, 4, 128, 8, 15


def model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=T,
                                        pad_token_id=0, eos_token_id=2))


def collate(items):
    ids = torch.stack(items)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def bare(rows) -> float:
    teacher, student = model(1).eval(), model(2)
    teacher.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    t0 = time.process_time()
    for s in range(STEPS):
        b = collate(rows[s * B:(s + 1) * B])
        with torch.no_grad():
            tl = teacher(input_ids=b["input_ids"]).logits[:, :-1]
        sl = student(input_ids=b["input_ids"]).logits[:, :-1]
        loss = 0.9 * forward_kl(sl, tl) + 0.1 * cross_entropy(sl, None, labels=b["labels"][:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return time.process_time() - t0


def distiller(rows) -> float:
    d = Distiller(model(2), model(1), task=CausalLMTask(), collate_fn=collate,
                  objective=[LossTerm("forward_kl", 0.9), LossTerm("cross_entropy", 0.1)],
                  config=TrainConfig(max_steps=STEPS, batch_size=B, lr=1e-3, progress=False, log_every=5,
                                     scheduler="constant"),
                  train_data=rows)
    t0 = time.process_time()
    d.train()
    return time.process_time() - t0


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, V, (T,), generator=g) for _ in range(B * STEPS)]
    bare(rows)
    distiller(rows)  # warm-up
    res: dict[str, list[float]] = {"bare": [], "distiller": []}
    for _ in range(3):
        res["bare"].append(bare(rows))
        res["distiller"].append(distiller(rows))
    for k, v in res.items():
        print(k, "CPU s/step:", [round(x / STEPS, 4) for x in v], "best", round(min(v) / STEPS, 4))


if __name__ == "__main__":
    main()
