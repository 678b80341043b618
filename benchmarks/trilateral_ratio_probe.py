"""Where trilateral KD's learned ratio goes during training: retrain one trilateral student of a
finished compare run and record the mean ratio ``r`` the student's loss used at every step.

The compare recipe does not log ``r`` (and does not keep the ratio network), so this script copies a
finished run folder (the teacher and the other students are reused), removes the chosen method's
sub-run for one seed, runs the recipe again (that one student retrains, bit for bit as in the run)
with a forward hook on the :class:`~kdforge.losses.TrilateralFusion` the recipe creates, and prints
one JSON line: the mean ``r`` over the labelled samples of the loss's batch at steps 1, 301 and 601
and averaged over each quarter of the run. Works for the first-order rule and the bilevel rule
alike (the bilevel meta step's own calls of the network are not counted).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/trilateral_ratio_probe.py --run /tmp/meta_fm/out \
        --config configs/fashion_mnist_trilateral.yaml --method "trilateral KD" --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("trilateral_ratio_probe")


def summarise(means: list[float]) -> dict[str, float]:
    """``r`` at steps 1, 301, 601 (1-based, where the run is that long) and per quarter of the run."""
    out = {f"r_step{s}": means[s - 1] for s in (1, 301, 601) if s <= len(means)}
    n = len(means)
    for q in range(4):
        part = means[q * n // 4:(q + 1) * n // 4]
        if part:
            out[f"r_quarter{q + 1}"] = sum(part) / len(part)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished compare run folder (with teacher/)")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON line here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import yaml

    from kdforge.recipes import fashion_mnist, load_recipe_file
    from kdforge.recipes.subrun import slug
    from kdforge.train.trilateral_meta import TrilateralMetaLearner

    means: list[float] = []
    in_meta_step = [False]
    real_attach, real_step = fashion_mnist.attach_learned_terms, TrilateralMetaLearner.step

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], r: torch.Tensor) -> None:
        if module.training and not in_meta_step[0]:
            means.append(float(r.detach().mean()))

    def spy(model, objective, world_size=1):
        model, extras = real_attach(model, objective, world_size)
        for name, module in extras.items():
            if name.startswith("trilateral"):
                module.register_forward_hook(record)
        return model, extras

    def step(self, *a, **k):
        in_meta_step[0] = True
        try:
            return real_step(self, *a, **k)
        finally:
            in_meta_step[0] = False

    raw = yaml.safe_load(args.config.read_text())
    if not any(m["name"] == args.method for m in raw["methods"]):
        raise SystemExit(f"no method {args.method!r} in {args.config}")
    fashion_mnist.attach_learned_terms, TrilateralMetaLearner.step = spy, step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "out"
            shutil.copytree(args.run, work)
            shutil.rmtree(work / "students" / slug(args.method) / f"seed-{args.seed}", ignore_errors=True)
            raw["seeds"] = [args.seed]
            config_path = Path(tmp) / "config.yaml"
            config_path.write_text(yaml.safe_dump(raw))
            recipe, config = load_recipe_file(config_path)
            recipe.run(config, work)
    finally:
        fashion_mnist.attach_learned_terms, TrilateralMetaLearner.step = real_attach, real_step
    if not means:
        raise SystemExit(f"method {args.method!r} created no trilateral ratio network")
    row = {"method": args.method, "seed": args.seed, "steps": len(means), **summarise(means)}
    print(json.dumps(row))
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
