"""The born-again guidance table of docs/regimes.md from a finished ``configs/fashion_mnist_guidance.yaml``
run: per method, test accuracy per seed and mean ± std, the paired difference (mean ± std over seeds,
wins/losses) to a reference method, and each generation's label weight ``alpha`` (``guidance`` in
the sub-run's ``result.json``). Reads the run's files only; trains nothing.

    python benchmarks/born_again_guidance_table.py --run /tmp/guidance_fm/out \
        --reference "born-again x2 (KD T=2 a=0.5)"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _mean_std(values: list[float], sign: str = "") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{sign}.2f} ± {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the compare run's output folder")
    ap.add_argument("--reference", required=True, help="method name the paired differences are taken to")
    args = ap.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted((args.run / "students").glob("*/seed-*/result.json")):
        rec = json.loads(path.read_text())
        runs.setdefault(rec["method"], {})[rec["seed"]] = rec
    seeds = sorted(results.get("config", {}).get("seeds", []) or next(iter(runs.values())).keys())
    ref = {s: 100 * runs[args.reference][s]["metrics"]["accuracy"] for s in seeds}
    print(f"| method | test acc % ({len(seeds)} seeds) | per seed ({' / '.join(map(str, seeds))}) | "
          f"Δ vs {args.reference} (W/L) | alpha per generation (seed: g1, g2, ...) |")
    print("|---|---|---|---|---|")
    for method, per_seed in runs.items():
        if not all(s in per_seed for s in seeds):
            continue
        acc = [100 * per_seed[s]["metrics"]["accuracy"] for s in seeds]
        diff = [a - ref[s] for a, s in zip(acc, seeds)]
        paired = "–" if method == args.reference else (
            f"{_mean_std(diff, '+')} ({sum(d > 0 for d in diff)}/{sum(d < 0 for d in diff)})")
        alphas = "; ".join(f"{s}: " + ", ".join(f"{g['alpha']:.2f}" + (f" ({g['alpha_unclipped']:+.2f})"
                                                                     if g.get("estimated") else "")
                                                for g in per_seed[s]["guidance"])
                           for s in seeds if per_seed[s].get("guidance"))
        print(f"| {method} | {_mean_std(acc)} | {' / '.join(f'{a:.2f}' for a in acc)} | {paired} | {alphas or '–'} |")


if __name__ == "__main__":
    main()
