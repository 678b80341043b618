"""Recipe ``diswot``: search a student for a teacher without training (DisWOT), then check the ranking.

``kdforge run configs/diswot.yaml``:

1. **teacher**: trained (or reused) exactly as ``fashion_mnist_kd`` does, in ``RUN_DIR/distill/teacher``;
2. **search** (:func:`kdforge.students.diswot.evolutionary_search`): regularised evolution over
   ConvNet students under a parameter budget, each candidate scored at random initialisation by
   DisWOT's semantic + relation distance to the teacher on ``search.images`` training images
   (``search.json``: every scored candidate, best first; reused on a rerun with the same settings);
3. **check** (``evaluate.top``/``evaluate.bottom`` > 0): the best- and worst-scored candidates whose
   parameter counts lie within ``evaluate.params_tolerance`` of each other are distilled with
   ``evaluate.terms`` through ``fashion_mnist_kd`` (one method per candidate: the same data, seeds
   and schedule; ``RUN_DIR/distill``), and the recipe reports Spearman's rank correlation between
   the DisWOT score and the distilled accuracy, and the top-minus-bottom accuracy gap.

``results.json`` holds the ranking, the trained candidates with their per-seed accuracies and the
correlations; ``results.md`` the table.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

from pydantic import Field

from kdforge.config import StrictModel
from kdforge.recipes import RECIPES, Recipe
from kdforge.recipes.fashion_mnist import (
    FashionMnistConfig,
    FashionMnistKD,
    MethodConfig,
    StudentConfig,
    TermSpec,
)

log = logging.getLogger(__name__)

__all__ = ["DisWOTConfig", "DisWOTRecipe", "EvaluateConfig", "SearchConfig", "SpaceConfig"]

RECIPE_NAME = "diswot"


class SpaceConfig(StrictModel):
    """ConvNet students: conv blocks (3x3 conv, ReLU, 2x2 max-pool) and one optional hidden layer."""

    widths: list[int] = Field([4, 8, 12, 16, 24, 32], min_length=1, description="channels a conv block may have")
    blocks: list[int] = Field([1, 2, 3], min_length=1, description="numbers of conv blocks allowed")
    hidden: list[int] = Field([0, 32, 64], min_length=1, description="hidden-layer widths (0 = linear head)")
    max_params: int | None = Field(20_000, ge=1, description="parameter budget (null = none)")
    min_params: int = Field(0, ge=0)


class SearchConfig(StrictModel):
    """Regularised evolution scored by DisWOT at random initialisation."""

    space: SpaceConfig = Field(default_factory=SpaceConfig)
    population: int = Field(12, ge=1)
    cycles: int = Field(40, ge=0, description="mutations after the initial population")
    sample_size: int = Field(4, ge=1, description="tournament size")
    images: int = Field(64, ge=2, description="training images the scores are measured on")
    inits: int = Field(2, ge=1, description="random initialisations averaged per candidate")
    seed: int = 0


class EvaluateConfig(StrictModel):
    """Which searched candidates are distilled to check the ranking."""

    top: int = Field(3, ge=0, description="best-scored candidates to distil")
    bottom: int = Field(3, ge=0, description="worst-scored candidates to distil")
    params_tolerance: float = Field(
        0.5, gt=0, description="only candidates within this relative distance of the best one's parameter count "
        "(so that size does not explain the ranking)")
    terms: list[TermSpec] = Field(
        default_factory=lambda: [TermSpec(name="forward_kl", weight=0.5, params={"temperature": 2.0}),
                                 TermSpec(name="cross_entropy", weight=0.5)],
        min_length=1, description="the distillation objective every candidate trains with")


class DisWOTConfig(FashionMnistConfig):
    """``fashion_mnist_kd``'s config (data, teacher, train, seeds: the check's distillation runs)
    plus ``search`` and ``evaluate``; its ``methods`` and ``student`` are replaced by the candidates."""

    search: SearchConfig = Field(default_factory=SearchConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    output_dir: str = "outputs/diswot"


def _space(config: SpaceConfig) -> Any:
    from kdforge.students.diswot import ConvNetSpace

    return ConvNetSpace(widths=tuple(config.widths), blocks=tuple(config.blocks), hidden=tuple(config.hidden),
                        max_params=config.max_params, min_params=config.min_params)


def pick_for_check(ranked: list[dict[str, Any]], top: int, bottom: int, tolerance: float) -> list[dict[str, Any]]:
    """The ``top`` best and ``bottom`` worst of ``ranked`` (best first) among the candidates whose
    parameter count is within ``tolerance`` (relative) of the best candidate's; no candidate twice."""
    if not ranked:
        return []
    ref = ranked[0]["params"]
    near = [c for c in ranked if abs(c["params"] - ref) <= tolerance * ref]
    rest = near[top:]
    return near[:top] + rest[max(0, len(rest) - bottom):]


def _method_name(candidate: dict[str, Any]) -> str:
    hidden, *channels = candidate["genes"]
    return f"conv {'-'.join(map(str, channels))} hidden {hidden}"


@RECIPES.register(RECIPE_NAME, "DisWOT: search a student without training (Fashion-MNIST), then check the ranking")
class DisWOTRecipe(Recipe):
    """See the module docstring."""

    config_model = DisWOTConfig

    def check(self, config: DisWOTConfig, output_dir: Path) -> list[Any]:
        from kdforge.preflight import fashion_mnist as checks
        from kdforge.preflight.problems import Problems

        problems = checks.check(config, Path(output_dir))
        extra = Problems()
        with extra.catch("search.space"):
            space = _space(config.search.space)
            smallest = (min(space.hidden), *([min(space.widths)] * min(space.blocks)))
            if space.max_params is not None and space.params(smallest) > space.max_params:
                extra.add("search.space.max_params",
                          f"even the smallest student ({space.params(smallest)} parameters) exceeds {space.max_params}",
                          "raise max_params or allow narrower widths / fewer blocks")
        return [*problems, *extra.items]

    def run(self, config: DisWOTConfig, output_dir: Path) -> dict[str, Any]:
        from kdforge.io import write_json_atomic, write_text_atomic
        from kdforge.recipes.fashion_mnist import _load_data
        from kdforge.recipes.subrun import RecipeRun
        from kdforge.students.diswot import evolutionary_search, score_candidates, spearman

        out = Path(output_dir)
        run = RecipeRun.start(RECIPE_NAME, config, out)
        base = FashionMnistConfig.model_validate({k: getattr(config, k) for k in FashionMnistConfig.model_fields})
        distill_run = RecipeRun.start("fashion_mnist_kd", base, out / "distill")
        data = _load_data(base)
        teacher, teacher_info = FashionMnistKD()._teacher(distill_run, base, data, {})
        teacher.eval()
        ranked = self._search(run, config, data, teacher, teacher_info, evolutionary_search, score_candidates)
        checked = pick_for_check(ranked, config.evaluate.top, config.evaluate.bottom, config.evaluate.params_tolerance)
        results: dict[str, Any] = {"recipe": RECIPE_NAME, "teacher": {"accuracy": teacher_info["metrics"]["accuracy"],
                                                                       "fingerprint": teacher_info["fingerprint"]},
                                   "searched": len(ranked), "ranking": ranked, "checked": []}
        if checked:
            methods = [MethodConfig(name=_method_name(c), terms=config.evaluate.terms,
                                    student=StudentConfig(arch="convnet", kwargs=c["kwargs"])) for c in checked]
            distilled = FashionMnistKD().run(base.model_copy(update={"methods": methods}), out / "distill")
            by_name = {m["method"]: m for m in distilled["models"] if m["role"] != "teacher"}
            for c in checked:
                row = by_name[_method_name(c)]
                results["checked"].append({**c, "method": row["method"], "accuracy": row["metrics"]["accuracy"],
                                           "accuracy_std": row["metrics"]["accuracy_std"],
                                           "per_seed": {p["seed"]: p["accuracy"] for p in row["per_seed"]}})
            results |= _correlations(results["checked"], config, spearman)
        if run.main:
            write_json_atomic(out / "results.json", results)
            from rich.console import Console

            markdown = results_markdown(results)
            write_text_atomic(out / "results.md", markdown)
            Console().print(markdown, markup=False, highlight=False)
        return results

    @staticmethod
    def _search(run: Any, config: DisWOTConfig, data: Any, teacher: Any, teacher_info: dict[str, Any],
                search: Any, score: Any) -> list[dict[str, Any]]:
        """Every scored candidate, best first (``search.json``; reused under the same settings)."""
        from kdforge.data.vision import stratified_indices
        from kdforge.recipes.subrun import config_key

        sub = run.subrun("the DisWOT search", "search", {"search": config_key(config.search),
                                                          "teacher": teacher_info["fingerprint"]},
                         length=16, record="search.json")
        cached = sub.reuse()
        if cached is not None:
            return cached["ranking"]
        sub.prepare(resume=False)
        idx = stratified_indices(data.y_train, config.search.images, seed=config.search.seed)
        images = data.x_train[idx]
        s = config.search

        def score_fn(kwargs: dict[str, Any]) -> Any:
            return score(teacher, images, [kwargs], init_seed=s.seed, inits=s.inits)[0]

        found = search(score_fn, _space(s.space), population=s.population, cycles=s.cycles,
                       sample_size=s.sample_size, seed=s.seed)
        ranking = [c.as_dict() for c in found]
        log.info("DisWOT scored %d candidates; best %s (%d params, score %.4f)", len(ranking),
                 ranking[0]["kwargs"], ranking[0]["params"], ranking[0]["score"])
        if run.main:  # no weights: the record itself is the result (written atomically, fingerprinted)
            from kdforge.io import write_json_atomic

            write_json_atomic(sub.record, {"fingerprint": sub.fingerprint, "ranking": ranking})
        run.barrier()
        return ranking


def _correlations(checked: list[dict[str, Any]], config: DisWOTConfig, spearman: Any) -> dict[str, Any]:
    """Spearman's rho of score vs accuracy (seed means and per seed) and the top-minus-bottom gap."""
    scores = [c["score"] for c in checked]
    out: dict[str, Any] = {"spearman": spearman(scores, [c["accuracy"] for c in checked])}
    seeds = sorted({s for c in checked for s in c["per_seed"]})
    out["spearman_per_seed"] = {s: spearman(scores, [c["per_seed"][s] for c in checked]) for s in seeds}
    top = [c["accuracy"] for c in checked[: config.evaluate.top]]
    bottom = [c["accuracy"] for c in checked[config.evaluate.top:]]
    out["top_minus_bottom"] = statistics.fmean(top) - statistics.fmean(bottom) if top and bottom else math.nan
    return out


def results_markdown(results: dict[str, Any]) -> str:
    lines = [f"# DisWOT search: {results['searched']} candidates scored at random init "
             f"(teacher accuracy {results['teacher']['accuracy'] * 100:.2f} %)", ""]
    lines += ["| rank | student | params | semantic d | relation d | score |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(results["ranking"][:10], 1):
        lines.append(f"| {i} | {_method_name(c)} | {c['params']} | {c['semantic']:.4f} | {c['relation']:.4f} | "
                     f"{c['score']:.4f} |")
    if results["checked"]:
        lines += ["", "## Check: the chosen candidates distilled", "",
                  "| student | params | score | distilled accuracy % |", "|---|---|---|---|"]
        for c in results["checked"]:
            lines.append(f"| {c['method']} | {c['params']} | {c['score']:.4f} | "
                         f"{c['accuracy'] * 100:.2f} ± {c['accuracy_std'] * 100:.2f} |")
        lines += ["", f"Spearman rho (score vs accuracy, seed means): {results['spearman']:.3f}; per seed: "
                  + ", ".join(f"{s}: {v:.3f}" for s, v in results["spearman_per_seed"].items())
                  + f"; top minus bottom: {results['top_minus_bottom'] * 100:+.2f} points."]
    return "\n".join(lines) + "\n"
