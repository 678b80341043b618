"""Does the held-out leak drive ``label_weight: auto`` to alpha = 0? Generation 0 of a born-again
run trains on all labelled images, so the held-out 20 % the estimate scores on were in its training
set. This probe trains generation 0 twice per seed on real Fashion-MNIST (2,000 labels, 40 epochs,
``small_cnn``, the recipe's optimiser and seeds): on all 2,000 labelled images (as the recipe does:
"leaky") and on the 1,600 fitting images only ("clean": the held-out 400 unseen), and prints one JSON
line per seed with both estimates of alpha_1 (kdforge.teachers.guidance) and the clean model's
held-out accuracy. About 25 s of CPU per training.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/born_again_guidance_probe.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from kdforge.data.vision import stratified_indices
from kdforge.eval.classification import predict_logits
from kdforge.recipes.born_again_guidance import HOLDOUT_FRACTION
from kdforge.recipes.fashion_mnist import (
    FashionMnistConfig,
    TermSpec,
    _fit,
    _KeyedDataset,
    _load_data,
)
from kdforge.students.vision import build_vision_model
from kdforge.teachers.guidance import estimate_label_weight, penultimate_features
from kdforge.train.trilateral_meta import split_holdout


def _train(x: torch.Tensor, y: torch.Tensor, seed: int, cfg: FashionMnistConfig, run_dir: Path) -> torch.nn.Module:
    tr = cfg.train
    torch.manual_seed(seed)
    model = build_vision_model(cfg.student.arch, **cfg.student.kwargs)
    return _fit(model, _KeyedDataset(x, y), [TermSpec(name="cross_entropy", weight=1.0)], epochs=tr.epochs,
                batch_size=tr.batch_size, lr=tr.lr, weight_decay=tr.weight_decay, scheduler=tr.scheduler,
                warmup_ratio=tr.warmup_ratio, seed=seed, run_dir=run_dir)["model"]


def _alpha(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, held: torch.Tensor) -> dict:
    probs = torch.softmax(predict_logits(model, x[fit]).double(), -1)
    est = estimate_label_weight(penultimate_features(model, x[fit]), penultimate_features(model, x[held]),
                                y[fit], y[held], probs, num_classes=probs.shape[1])
    return {"alpha": est.alpha, "alpha_unclipped": round(est.alpha_unclipped, 3),
            "mse_labels": round(est.heldout_mse_labels, 4), "mse_previous": round(est.heldout_mse_previous, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--labelled", type=int, default=2000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cfg = FashionMnistConfig()
    data = _load_data(cfg)
    idx = stratified_indices(data.y_train, args.labelled, seed=cfg.data.subset_seed)
    x, y = data.x_train[idx], data.y_train[idx]
    for seed in args.seeds:
        fit, held = split_holdout(y, HOLDOUT_FRACTION, seed)
        with tempfile.TemporaryDirectory() as tmp:
            leaky = _train(x, y, seed, cfg, Path(tmp) / "leaky")
            clean = _train(x[fit], y[fit], seed, cfg, Path(tmp) / "clean")
        held_acc = float((predict_logits(clean, x[held]).argmax(-1) == y[held]).float().mean())
        print(json.dumps({"seed": seed, "leaky": _alpha(leaky, x, y, fit, held), "clean": _alpha(clean, x, y, fit, held),
                          "clean_heldout_accuracy": round(held_acc, 4)}), flush=True)


if __name__ == "__main__":
    main()
