"""Mixup / CutMix KD on Fashion-MNIST: plain KD vs KD on mixed inputs labelled by the teacher.

Teacher: ``TeacherCNN`` trained with cross-entropy on ``--train`` images (once, cached under
``--work``). Students: ``SmallCNN`` (~8k parameters), pure distillation (forward KL at
temperature 4 on the teacher's output for the batch it sees), the same steps and seed per arm:

* ``kd``: plain batches; ``mixup``: :class:`kdforge.train.MixupTransform` (alpha 1.0);
  ``cutmix``: the same with ``mode="cutmix"``. The teacher labels the mixed input.

Reported: accuracy on ``--test`` held-out test images and on the same images shifted by 3
pixels (an out-of-domain check), per arm and seed.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/mixup_fashion_mnist.py \
        --out benchmarks/results/mixup_fashion_mnist.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("mixup_fashion_mnist")
ARMS = ("kd", "mixup", "cutmix")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--teacher-epochs", type=float, default=8)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default="outputs/mixup_fmnist")
    ap.add_argument("--out", default="benchmarks/results/mixup_fashion_mnist.jsonl")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    if args.table:
        recs = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*.json"))]
        print("| arm | test accuracy | shifted-test accuracy |\n|---|---|---|")
        for arm in ARMS:
            mine = sorted((r for r in recs if r["arm"] == arm), key=lambda r: r["seed"])
            if mine:
                cells = []
                for key in ("acc", "acc_shifted"):
                    vals = [100 * r[key] for r in mine]
                    mean = sum(vals) / len(vals)
                    sd = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
                    cells.append(f"{mean:.1f} ± {sd:.1f} ({' / '.join(f'{v:.1f}' for v in vals)})")
                print(f"| {arm} | " + " | ".join(cells) + " |")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from kdforge.data.vision import load_fashion_mnist
    from kdforge.io import write_json_atomic
    from kdforge.students.vision import SmallCNN, TeacherCNN
    from kdforge.train import ClassificationTask, Distiller, LossTerm, MixupTransform, TrainConfig

    work.mkdir(parents=True, exist_ok=True)
    splits = load_fashion_mnist()
    gen = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(splits.train_images), generator=gen)[: args.train]
    te = torch.randperm(len(splits.test_images), generator=gen)[: args.test]

    def norm(x):
        return ((x.float() / 255.0 - 0.286) / 0.353).unsqueeze(1)

    x_train, y_train = norm(splits.train_images[tr]), splits.train_labels[tr]
    x_test, y_test = norm(splits.test_images[te]), splits.test_labels[te]
    x_shift = torch.roll(x_test, shifts=(3, 3), dims=(2, 3))
    train = [{"inputs": x, "labels": y} for x, y in zip(x_train, y_train)]
    steps = int(args.epochs * len(train) / args.batch_size)

    def accuracy(model, x, y):
        model.eval()
        with torch.no_grad():
            return float((model(x).argmax(-1) == y).float().mean())

    teacher = TeacherCNN()
    t_path = work / "teacher.pt"
    if t_path.exists():
        teacher.load_state_dict(torch.load(t_path))
    else:
        t0 = time.time()
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=int(args.teacher_epochs * len(train) / args.batch_size),
                          batch_size=args.batch_size, lr=1e-3, seed=0, progress=False, log_every=50)
        Distiller(teacher, None, task=ClassificationTask(), objective=[LossTerm("cross_entropy", 1.0)],
                  config=cfg, train_data=train).train()
        torch.save(teacher.state_dict(), t_path)
        log.info("teacher trained in %.0f s", time.time() - t0)
    teacher.eval()
    log.info("teacher accuracy %.3f (shifted %.3f)", accuracy(teacher, x_test, y_test),
             accuracy(teacher, x_shift, y_test))
    with open(args.out, "a", encoding="utf-8") as out:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm in ARMS:
                path = work / "runs" / f"{arm}-seed{seed}.json"
                if path.exists():
                    continue
                transforms = [] if arm == "kd" else [MixupTransform(1.0, mode=arm, seed=seed)]
                torch.manual_seed(seed)
                student = SmallCNN()
                cfg = TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=3e-3, seed=seed, progress=False,
                                  log_every=100)
                t0 = time.time()
                Distiller(student, teacher, task=ClassificationTask(),
                          objective=[LossTerm("forward_kl", 1.0, {"temperature": 4.0})], config=cfg,
                          train_data=train, transforms=transforms).train()
                rec = {"arm": arm, "seed": seed, "steps": steps, "train_images": len(train),
                       "acc": accuracy(student, x_test, y_test), "acc_shifted": accuracy(student, x_shift, y_test),
                       "teacher_acc": accuracy(teacher, x_test, y_test),
                       "teacher_acc_shifted": accuracy(teacher, x_shift, y_test),
                       "train_seconds": round(time.time() - t0, 1)}
                write_json_atomic(path, rec)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                log.info("%s seed %d: acc %.3f shifted %.3f (%.0f s)", arm, seed, rec["acc"], rec["acc_shifted"],
                         rec["train_seconds"])


if __name__ == "__main__":
    main()
