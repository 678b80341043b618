"""How noisy is MiniLLM's long-term policy-gradient term? A toy measurement (CPU, ~20 s).

A tiny Llama teacher (head scaled by 8, so it is peaked) and a tiny Llama student (tests/train/_tiny.py
sizes: vocabulary 64, 2 layers, width 32), prompts of 2 tokens, 8 sampled tokens:

1. on one batch of 64 student samples, the gradient of the single-step part (the per-token reverse
   KL, ``reverse_kl``) and of the long-term part (``minillm`` minus it): norms and cosine;
2. training 60 steps (AdamW, lr 1e-2) with GKD's ``reverse_kl`` on own samples (= the single-step
   term alone) and with ``minillm`` (alpha 0, length-normalised) at batch 8 and 64: per-token
   reverse KL on the student's own samples of 16 fixed prompts before and after.

Run::

    .venv/bin/python benchmarks/minillm_variance.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.train._tiny import TokenDataset, pad_collate, tiny_llama

    from kdforge.losses import minillm_loss, reverse_kl
    from kdforge.train import (
        CausalLMTask,
        Distiller,
        LossTerm,
        MiniLLMConfig,
        OnPolicyConfig,
        TrainConfig,
        minillm_objective,
        minillm_setup,
    )
    from kdforge.train.minillm import sample_mixed
    from kdforge.train.onpolicy import build_batch

    def own_sample_rkl(student, teacher):
        prompts = [torch.tensor([3 + i, 10 + i]) for i in range(16)]
        torch.manual_seed(123)
        outs = sample_mixed(student, teacher, prompts, 0.0, MiniLLMConfig(max_new_tokens=8).on_policy())
        b = build_batch(prompts, outs, 0, "cpu")
        with torch.no_grad():
            kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            return float(reverse_kl(student(**kw).logits[:, :-1], teacher(**kw).logits[:, :-1],
                                    mask=b["labels"][:, 1:] != -100))

    # 1. gradient of the two parts on one batch
    teacher, student = tiny_llama(1, head_scale=8.0), tiny_llama(2)
    prompts = [torch.tensor([3 + i % 50, 10 + i % 40]) for i in range(64)]
    torch.manual_seed(0)
    outs = sample_mixed(student, teacher, prompts, 0.0, MiniLLMConfig(max_new_tokens=8).on_policy())
    b = build_batch(prompts, outs, 0, "cpu")
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        t_logits = teacher(**kw).logits[:, :-1]
    labels = b["labels"][:, 1:]

    def grad(fn):
        student.zero_grad()
        fn(student(**kw).logits[:, :-1]).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    single = grad(lambda s: reverse_kl(s, t_logits, mask=labels != -100, reduction="sum"))
    for norm in (True, False):
        long = grad(lambda s, n=norm: minillm_loss(s, t_logits, labels=labels, reduction="sum", length_norm=n)) - single
        print(json.dumps({"part": "gradient", "length_norm": norm, "single_norm": round(float(single.norm()), 2),
                          "long_norm": round(float(long.norm()), 2),
                          "cosine": round(float(torch.nn.functional.cosine_similarity(long, single, 0)), 3)}))

    # 2. training
    for name, batch in (("gkd reverse_kl", 8), ("minillm", 8), ("minillm", 64)):
        teacher, student = tiny_llama(1, head_scale=8.0), tiny_llama(2)
        before = own_sample_rkl(student, teacher)
        if name == "minillm":
            cfg = MiniLLMConfig(alpha=0.0, max_new_tokens=8)
            kwargs = {"objective": minillm_objective([LossTerm("minillm", 1.0)], cfg), **minillm_setup(cfg, teacher)}
        else:
            kwargs = {"objective": [LossTerm("reverse_kl", 1.0)], "on_policy": OnPolicyConfig(lmbda=1.0, max_new_tokens=8)}
        d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                      config=TrainConfig(max_steps=60, batch_size=batch, lr=1e-2, progress=False, log_every=10, seed=0),
                      train_data=TokenDataset(n=4 * batch), **kwargs)
        d.train()
        print(json.dumps({"part": "training", "method": name, "batch": batch, "steps": 60,
                          "rkl_own_before": round(before, 3),
                          "rkl_own_after": round(own_sample_rkl(d.unwrapped_student, teacher), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
