"""Where DAC-KL's learned region goes: train one learned-region student and describe its
clipping sub-network.

The recipes do not keep the sub-network (only the deployed student), so this script runs the
recipe of ``--config`` for one ``--method`` and ``--seed`` while catching the
:class:`~kdforge.losses.DACClipNet` the recipe creates, and reports its ``region_stats`` (running
means over the training positions: ``l``, ``u``, soft region size ``sum_v w_v`` and kept teacher
mass ``sum_v w_v p_v``, label included). ``compare`` / ``fashion_mnist_kd`` runs: with ``--run`` (a
finished run folder, copied: the teacher and the other students are reused, the method's sub-run
retrains bit for bit) it also reports, on the teacher's cached test logits at the term's
temperature, the quantiles of ``u`` and ``l`` and the region against the fixed-mass rule's.
``llm_kd`` runs: only ``--method`` is trained; ``--set`` shrinks the run (dotted keys, YAML values).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/dac_region_probe.py --run /tmp/dackl_fm/out \
        --config configs/fashion_mnist_dac_kl.yaml --method "DAC-KL (learned region)" --seed 0
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/dac_region_probe.py --config configs/dac_kl_lm.yaml \
        --method "DAC-KL learned" --set train.max_steps=20 --set train.batch_size=4 --set data.seq_len=64
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


def _set(raw: dict, dotted: str) -> None:
    import yaml

    key, _, value = dotted.partition("=")
    *path, last = key.split(".")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--method", required=True, help="the method with a dac_kl term with learned: true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=Path, default=None, help="a finished compare run folder to reuse (copied)")
    parser.add_argument("--set", action="append", default=[], help="dotted.key=value override")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON line here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import yaml

    from kdforge.recipes import fashion_mnist, llm_kd, load_recipe_file
    from kdforge.recipes.subrun import slug

    nets: list[torch.nn.Module] = []
    real_fm, real_lm = fashion_mnist.attach_learned_terms, llm_kd.attach_clip_nets

    def spy_fm(model, objective, world_size=1):
        model, extras = real_fm(model, objective, world_size)
        nets.extend(m for k, m in extras.items() if k.startswith("dac-clip"))
        return model, extras

    def spy_lm(objective, *a, **kw):
        extras = real_lm(objective, *a, **kw)
        nets.extend(extras.values())
        return extras

    fashion_mnist.attach_learned_terms, llm_kd.attach_clip_nets = spy_fm, spy_lm
    raw = yaml.safe_load(args.config.read_text())
    key = "objective" if raw["recipe"] == "llm_kd" else "terms"
    method = next(m for m in raw["methods"] if m["name"] == args.method)
    params = next(t for t in method[key] if t["name"] == "dac_kl").get("params", {})
    raw["seeds"] = [args.seed]
    if raw["recipe"] == "llm_kd":
        raw["methods"] = [method]
    for dotted in args.set:
        _set(raw, dotted)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "out"
        if args.run is not None:
            shutil.copytree(args.run, work)
            shutil.rmtree(work / "students" / slug(args.method) / f"seed-{args.seed}", ignore_errors=True)
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        recipe, config = load_recipe_file(config_path)
        recipe.run(config, work)
        cached = work / "teacher" / "logits.safetensors"
        logits = load_file(str(cached))["test"] if cached.is_file() else None
    if len(nets) != 1:
        raise SystemExit(f"expected one learned DAC-KL sub-network, caught {len(nets)}")
    row = {"method": args.method, "seed": args.seed, "overrides": args.set,
           **{f"train_{k}": v for k, v in nets[0].region_stats.items()}}
    if logits is not None:
        row.update(describe(nets[0], logits, float(params.get("temperature", 1.0)), float(params.get("mass", 0.9)),
                            float(params.get("region_temperature", 0.05))))
    print(json.dumps(row))
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
