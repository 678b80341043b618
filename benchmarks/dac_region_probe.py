"""Where DAC-KL's learned region goes: retrain one learned-region student of a finished compare run
and describe its clipping sub-network on the teacher's test-set distributions.

The compare recipe does not keep the sub-network (only the deployed student), so this script copies
a finished run folder (the teacher and the other students are reused), removes the chosen method's
sub-run for one seed, runs the recipe again (that one student retrains, bit for bit as in the run)
while catching the :class:`~kdforge.losses.DACClipNet` the recipe creates, and reports, on the
teacher's cached test logits at the term's temperature: the quantiles of ``u`` and ``l``, the mean
soft region size ``sum_v w_v`` and kept teacher mass ``sum_v w_v p_v`` (label not added), against
the fixed-mass rule's hard region at the same ``mass``.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/dac_region_probe.py --run /tmp/dackl_fm/out \
        --config configs/fashion_mnist_dac_kl.yaml --method "DAC-KL (learned region)" --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger("dac_region_probe")


def describe(net: torch.nn.Module, teacher_logits: torch.Tensor, temperature: float, mass: float, tau: float
             ) -> dict[str, float]:
    """Statistics of ``net``'s region on ``teacher_logits [N, C]`` (module docstring)."""
    from kdforge.losses.dac_clip import region_log_weights
    from kdforge.losses.dac_kl import dense_region

    net.eval()
    with torch.no_grad():
        logp = torch.log_softmax(teacher_logits.float() / temperature, -1)
        probs = logp.exp().sort(-1, descending=True).values
        lower, upper = net(probs)
        w = region_log_weights(probs, lower, upper, tau)[0].exp()
        fixed = dense_region(logp, mass)
    q = torch.tensor([0.1, 0.5, 0.9])
    return {
        **{f"u_q{int(k * 100)}": float(v) for k, v in zip(q, upper.quantile(q))},
        **{f"l_q{int(k * 100)}": float(v) for k, v in zip(q, lower.quantile(q))},
        "region_size": float(w.sum(-1).mean()), "region_mass": float((w * probs).sum(-1).mean()),
        "fixed_size": float(fixed.sum(-1).float().mean()),
        "fixed_mass": float((fixed * logp.exp()).sum(-1).mean()),
        "teacher_top1_mass": float(probs[:, 0].mean()),
    }


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

    nets: list[torch.nn.Module] = []
    real = fashion_mnist.attach_learned_terms

    def spy(model, objective, world_size=1):
        model, extras = real(model, objective, world_size)
        nets.extend(m for k, m in extras.items() if k.startswith("dac-clip"))
        return model, extras

    fashion_mnist.attach_learned_terms = spy
    raw = yaml.safe_load(args.config.read_text())
    term = next(t for m in raw["methods"] if m["name"] == args.method for t in m["terms"] if t["name"] == "dac_kl")
    params = term.get("params", {})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "out"
        shutil.copytree(args.run, work)
        shutil.rmtree(work / "students" / slug(args.method) / f"seed-{args.seed}", ignore_errors=True)
        raw["seeds"] = [args.seed]
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        recipe, config = load_recipe_file(config_path)
        recipe.run(config, work)
        logits = load_file(str(work / "teacher" / "logits.safetensors"))["test"]
    if len(nets) != 1:
        raise SystemExit(f"expected one learned DAC-KL sub-network, caught {len(nets)}")
    row = {"method": args.method, "seed": args.seed,
           **describe(nets[0], logits, float(params.get("temperature", 1.0)), float(params.get("mass", 0.9)),
                      float(params.get("region_temperature", 0.05)))}
    print(json.dumps(row))
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
