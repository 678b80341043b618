"""Trilateral KD's ratio rules where the teacher is right and the labels are not: Fashion-MNIST with a
share of the student's labels flipped to another class.

The setting where a learned KD/CE ratio should help: the labels are noisy, the teacher (trained on
the clean 60k) is not. The student sees the recipe's class-balanced ``--labelled`` images with
``--noise`` of their labels replaced by a uniformly drawn *other* class (fixed draw, seed 0), the
cached teacher's logits, and trains for ``--epochs`` with the recipe's optimiser settings (the
``fashion_mnist_kd`` recipe's ``_fit``: same Distiller, same batches per seed). The held-out split
of ``holdout: split`` is drawn from the same noisy labels (no clean data is assumed). Per method and
seed, one JSON line: test accuracy, CPU s/step, and the mean ratio the loss used over the last
quarter of the run (trilateral methods), also split by whether the teacher's argmax agrees with the
(possibly flipped) label — where it does not, the label is almost always the flipped one.
``--methods "trilateral KD (bilevel, head, split, clean held-out labels)"`` gives the held-out split
its true labels (Meta-Weight-Net's small trusted set; the student still never trains on them).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/trilateral_noisy_labels.py \
        --teacher /tmp/meta_fm/out/teacher --noise 0.4 --seeds 0 1 2 --out /tmp/meta_fm/noisy.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("trilateral_noisy_labels")

CLEAN = "trilateral KD (bilevel, head, split, clean held-out labels)"
KD = [{"name": "forward_kl", "weight": 0.5, "params": {"temperature": 2.0}}, {"name": "cross_entropy", "weight": 0.5}]
METHODS: dict[str, list[dict[str, Any]]] = {
    "labels only": [{"name": "cross_entropy", "weight": 1.0}],
    "KD T=2 a=0.5": KD,
    "trilateral KD (first-order)": [{"name": "trilateral_kd", "weight": 1.0, "params": {"temperature": 2.0}}],
    "trilateral KD (bilevel, head, split)": [{"name": "trilateral_kd", "weight": 1.0, "params": {
        "temperature": 2.0, "bilevel": {"lookahead": "head", "holdout": "split"}}}],
    "trilateral KD (bilevel, head, in-batch)": [{"name": "trilateral_kd", "weight": 1.0, "params": {
        "temperature": 2.0, "bilevel": {"lookahead": "head", "holdout": "batch"}}}],
    # Meta-Weight-Net's assumption: the same held-out split, with its *clean* labels (200 trusted labels)
    CLEAN: [{"name": "trilateral_kd", "weight": 1.0, "params": {
        "temperature": 2.0, "bilevel": {"lookahead": "head", "holdout": "split"}}}],
}


def flip_labels(labels: torch.Tensor, share: float, num_classes: int, seed: int = 0) -> torch.Tensor:
    """``labels`` with ``round(share * n)`` of them (a fixed random draw) moved to another class."""
    g = torch.Generator().manual_seed(seed)
    out = labels.clone()
    pick = torch.randperm(len(labels), generator=g)[: round(share * len(labels))]
    out[pick] = (labels[pick] + torch.randint(1, num_classes, (len(pick),), generator=g)) % num_classes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="a recipe's teacher/ folder (logits.safetensors)")
    parser.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default: the kdforge asset)")
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--labelled", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != CLEAN], choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from safetensors.torch import load_file

    from kdforge.config import validate
    from kdforge.data.vision import stratified_indices
    from kdforge.eval.classification import predict_logits
    from kdforge.recipes import fashion_mnist
    from kdforge.students.vision import build_vision_model
    from kdforge.train.objective import LossTerm
    from kdforge.train.trilateral_meta import TrilateralMetaLearner

    config = validate(fashion_mnist.FashionMnistConfig, {"data": {"root": args.root}}, source="benchmark")
    data = fashion_mnist._load_data(config)
    logits = load_file(str(args.teacher / "logits.safetensors"))
    idx = stratified_indices(data.y_train, args.labelled, seed=0)
    clean = data.y_train[idx]
    classes = int(logits["train"].shape[-1])
    noisy = flip_labels(clean, args.noise, classes)
    t_test = logits["test"][: len(data.y_test)]
    log.info("%d labels, %.0f%% flipped; teacher right on %.1f%% of them, test accuracy %.2f%%", len(idx),
             100 * float((noisy != clean).float().mean()),
             100 * float((logits["train"][idx].argmax(-1) == clean).float().mean()),
             100 * float((t_test.argmax(-1) == data.y_test).float().mean()))
    dataset = fashion_mnist._KeyedDataset(data.x_train[idx], noisy, teacher_logits=logits["train"][idx])

    ratios: list[tuple[float, float, float]] = []  # per loss call: mean r, on teacher-agrees / -disagrees samples
    in_meta = [False]
    real_attach, real_step = fashion_mnist.attach_learned_terms, TrilateralMetaLearner.step

    def record(module: torch.nn.Module, inputs: Any, r: torch.Tensor) -> None:
        if module.training and not in_meta[0]:
            r = r.detach()
            agrees = inputs[0][:, 3] > 0.5  # relation feature 3: [argmax teacher = label]
            ratios.append((float(r.mean()), float(r[agrees].mean()) if bool(agrees.any()) else float("nan"),
                           float(r[~agrees].mean()) if bool((~agrees).any()) else float("nan")))

    def spy(model, objective, world_size=1):
        model, extras = real_attach(model, objective, world_size)
        for name, module in extras.items():
            if name.startswith("trilateral"):
                module.register_forward_hook(record)
        return model, extras

    def step(self, *a, **k):
        in_meta[0] = True
        try:
            return real_step(self, *a, **k)
        finally:
            in_meta[0] = False

    from kdforge.train.trilateral_meta import split_holdout

    clean_holdout = [False]
    real_bilevel = fashion_mnist.attach_bilevel

    def bilevel(objective, dataset, *, seed=0, world_size=1):
        train, learners = real_bilevel(objective, dataset, seed=seed, world_size=world_size)
        if clean_holdout[0]:  # the same held-out images (the same deterministic split), their true labels
            for learner in learners:
                held = split_holdout(dataset.labels, learner.settings.holdout_fraction, seed)[1]
                assert torch.equal(learner.holdout[1], dataset.labels[held].long())
                learner.holdout = (learner.holdout[0], clean[held].long())
        return train, learners

    tr = config.train
    fashion_mnist.attach_learned_terms, TrilateralMetaLearner.step = spy, step
    fashion_mnist.attach_bilevel = bilevel
    try:
        for seed in args.seeds:
            for name in args.methods:
                ratios.clear()
                clean_holdout[0] = name == CLEAN
                torch.manual_seed(seed)
                model = build_vision_model("small_cnn")
                with tempfile.TemporaryDirectory() as tmp:
                    cpu0 = time.process_time()
                    trained = fashion_mnist._fit(model, dataset, [LossTerm(**t) for t in METHODS[name]],
                                                 epochs=args.epochs, batch_size=tr.batch_size, lr=tr.lr,
                                                 weight_decay=tr.weight_decay, scheduler=tr.scheduler,
                                                 warmup_ratio=tr.warmup_ratio, seed=seed, run_dir=Path(tmp))
                    cpu = time.process_time() - cpu0
                pred = predict_logits(trained["model"], data.x_test).argmax(-1)
                row = {"method": name, "seed": seed, "noise": args.noise, "labelled": args.labelled,
                       "accuracy": float((pred == data.y_test).float().mean()),
                       "cpu_s_per_step": cpu / trained["steps"], "steps": trained["steps"]}
                if ratios:
                    last = torch.tensor(ratios[3 * len(ratios) // 4:])
                    row["r_last_quarter"] = float(last[:, 0].mean())
                    row["r_last_quarter_teacher_agrees"] = float(last[:, 1].nanmean())
                    row["r_last_quarter_teacher_disagrees"] = float(last[:, 2].nanmean())
                print(json.dumps(row), flush=True)
                if args.out is not None:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    finally:
        fashion_mnist.attach_learned_terms, TrilateralMetaLearner.step = real_attach, real_step
        fashion_mnist.attach_bilevel = real_bilevel


if __name__ == "__main__":
    main()
