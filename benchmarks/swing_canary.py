"""Swing distillation vs plain KD on a tiny character LM with planted canaries (canary exposure).

Setting (minutes of CPU): the teacher, a character-level GRU, is trained from scratch on
``--chars`` characters of *Pride and Prejudice* into which the canary ``"my pin is NNNN"`` (a random
4-digit secret, ``|R| = 10^4``) is planted ``--copies`` times: the teacher memorises it. Students
(a smaller GRU) are distilled on the same private text with pure KD, no labels:

* ``kd``: :func:`kdforge.losses.forward_kl` at T = 1;
* ``swing``: :func:`kdforge.losses.swing_kd` at T = 1, ``private_temperature`` on every position
  whose target character is a digit (``private_ids`` from :func:`kdforge.losses.swing.pii_token_ids`),
  plus ``noise`` on the soft targets;
* ``labels``: CE on the private text (no teacher), for reference.

Reported per arm and seed: the canary exposure (:func:`kdforge.eval.exposure.canary_exposure`,
``log2 |R| - log2 rank``, max 13.3 bits) and the utility, the per-character perplexity on held-out
text of another novel (*Emma*, no canary).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/swing_canary.py \
        --out benchmarks/results/swing_canary.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("swing_canary")
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;'\n"


class CharGRU(nn.Module):
    def __init__(self, vocab: int, hidden: int, emb: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.GRU(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(ids))[0])


def load_text(path: Path, n: int, offset: int = 0) -> str:
    text = path.read_text(encoding="utf-8", errors="ignore").lower()
    text = re.sub(f"[^{re.escape(ALPHABET)}]", " ", text)
    text = re.sub(r" +", " ", text)
    return text[offset:offset + n]


def encode(text: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def plant(text: str, canary: str, copies: int, rng: random.Random) -> str:
    cuts = sorted(rng.sample(range(len(text)), copies))
    parts, last = [], 0
    for c in cuts:
        parts += [text[last:c], f" {canary}. "]
        last = c
    return "".join(parts + [text[last:]])


def batches(ids: torch.Tensor, seq: int, bs: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (bs,), generator=gen)
        chunk = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def train(model: nn.Module, ids: torch.Tensor, steps: int, seed: int, loss_fn, lr: float = 3e-3,
          seq: int = 96, bs: int = 32) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step, (x, y) in zip(range(steps), batches(ids, seq, bs, gen)):
        loss = loss_fn(model(x), x, y, step)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0:
            log.info("step %d/%d loss %.4f", step, steps, float(loss.detach()))
    model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq: int = 256) -> float:
    n = (len(ids) - 1) // seq
    x = ids[: n * seq].view(n, seq)
    y = ids[1: n * seq + 1].view(n, seq)
    logits = model(x)
    return math.exp(float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))))


def main() -> None:
    from kdforge.eval.exposure import canary_exposure
    from kdforge.losses import cross_entropy, forward_kl, swing_kd
    from kdforge.losses.swing import pii_token_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path.home() / ".cache/kdforge/data/austen"))
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--student-steps", type=int, default=1200)
    ap.add_argument("--teacher-hidden", type=int, default=256)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--private-temperature", type=float, default=8.0)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--arms", default="labels,kd,swing")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="benchmarks/results/swing_canary.jsonl")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)

    rng = random.Random(0)
    secret = f"{rng.randrange(10_000):04d}"
    prefix = "my pin is "
    private = plant(load_text(Path(args.data) / "prideprejudice.txt", args.chars), prefix + secret, args.copies, rng)
    held_out = load_text(Path(args.data) / "emma.txt", 50_000, offset=20_000)
    ids, held = encode(private), encode(held_out)
    vocab = len(ALPHABET)
    digits = pii_token_ids(list(ALPHABET))
    space = torch.tensor([[ALPHABET.index(c) for c in f"{r:04d}"] for r in range(10_000)])
    prefix_ids = encode(prefix).tolist()

    def measure(model: nn.Module) -> dict[str, float]:
        exp = canary_exposure(model, prefix_ids, space, int(secret))
        return {**exp, "heldout_ppl": perplexity(model, held)}

    torch.manual_seed(1234)
    teacher = CharGRU(vocab, args.teacher_hidden)
    t0 = time.process_time()
    train(teacher, ids, args.teacher_steps, 1234, lambda z, x, y, s: cross_entropy(z, None, labels=y))
    t_metrics = {**measure(teacher), "cpu_s": time.process_time() - t0}
    log.info("teacher: %s", t_metrics)
    rows = [{"arm": "teacher", "seed": 1234, **t_metrics}]
    for p in teacher.parameters():
        p.requires_grad_(False)

    def kd(z, x, y, step):
        return forward_kl(z, teacher(x), temperature=1.0)

    def swing(z, x, y, step):
        return swing_kd(z, teacher(x), labels=y, private_ids=digits, temperature=1.0,
                        private_temperature=args.private_temperature, noise=args.noise)

    def labels(z, x, y, step):
        return cross_entropy(z, None, labels=y)

    arms = {"kd": kd, "swing": swing, "labels": labels}
    for arm, seed in itertools.product(args.arms.split(","), [int(s) for s in args.seeds.split(",")]):
        torch.manual_seed(seed)
        student = CharGRU(vocab, args.student_hidden)
        t0 = time.process_time()
        train(student, ids, args.student_steps, seed, arms[arm])
        row = {"arm": arm, "seed": seed, **measure(student), "cpu_s": time.process_time() - t0}
        log.info("%s", row)
        rows.append(row)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "data")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({**r, "config": config}) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
