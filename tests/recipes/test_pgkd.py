"""PGKD loop: hard examples reach the teacher, its examples are parsed, deduped, added, and
the retrained student improves; early stopping; resume without regenerating."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from kdforge.config import validate
from kdforge.elicit.backends.base import Backend
from kdforge.elicit.types import GenerationResult
from kdforge.recipes import load_recipe
from kdforge.recipes import pgkd as pg

FRESH = ["superb", "delightful", "charming", "gripping", "moving", "brilliant", "witty", "stunning"]
ROTTEN = ["tedious", "clumsy", "bland", "dreary", "messy", "lifeless", "hollow", "shallow"]
FILLER = ["with a long second act", "from a first time director", "set in a small town",
          "about two old friends", "shot on location", "with a big cast"]


def _rows(words_f, words_r, n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lab, w = ("fresh", rng.choice(words_f)) if i % 2 == 0 else ("rotten", rng.choice(words_r))
        rows.append({"text": f"the film was {w} {rng.choice(FILLER)} number {rng.randint(0, 10**6)}", "label": lab})
    return rows


class RuleTeacher(Backend):
    """A teacher that knows the rule: it rewrites each hard example with its sentiment word."""

    name = "rule-teacher"
    batch_size = 4

    def __init__(self):
        super().__init__()
        self.prompts: list[str] = []

    async def generate_batch(self, requests):
        out = []
        for r in requests:
            text = r.prompt[-1]["content"]
            self.prompts.append(text)
            lines = []
            for lab, body in re.findall(r"^(fresh|rotten): (.+)$", text, flags=re.M):
                w = next(x for x in FRESH + ROTTEN if x in body.split())
                for f in FILLER[:2]:
                    lines.append(f"{lab}: honestly a {w} picture {f} take {len(lines)} {r.sample_index}")
            lines.append("this line has no label and is ignored")
            out.append(GenerationResult(text="\n".join(lines), completion_tokens=len(lines)))
        return out


@pytest.fixture
def data(tmp_path):
    files = {}
    for split, (wf, wr, n, seed) in {"train": (FRESH[:2], ROTTEN[:2], 16, 1),
                                     "validation": (FRESH, ROTTEN, 80, 2),
                                     "test": (FRESH, ROTTEN, 80, 3)}.items():
        p = tmp_path / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in _rows(wf, wr, n, seed)))
        files[f"{split}_path"] = str(p)
    return files


def _config(data, out, rounds=2):
    return validate(pg.PGKDConfig, {
        "output_dir": str(out), "teacher": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "t"},
        "data": {"asset": None, **data, "train_limit": None, "validation_limit": None},
        "student": {"buckets": 4096, "dim": 16}, "train": {"epochs": 30, "batch_size": 16, "lr": 0.05},
        "rounds": rounds, "patience": 1, "prompts_per_round": 3, "hard_per_prompt": 4,
    })


def test_pgkd_adds_teacher_examples_for_student_errors_and_beats_labels_only(data, tmp_path, monkeypatch):
    teacher = RuleTeacher()
    monkeypatch.setattr(pg, "build_backend", lambda cfg: teacher)
    cfg = _config(data, tmp_path / "run")
    res = load_recipe("pgkd")().run(cfg, tmp_path / "run")
    rounds = res["rounds"]
    base, student = res["models"][0]["metrics"], res["models"][1]["metrics"]
    assert rounds[0]["added"] == 0 and rounds[1]["added"] > 0
    assert rounds[1]["pool"] == 16 + rounds[1]["added"]
    assert student["accuracy"] > base["accuracy"] + 0.05  # the unseen sentiment words were taught
    assert rounds[1]["val"]["accuracy"] > rounds[0]["val"]["accuracy"]
    assert "accuracy" in teacher.prompts[0] and re.search(r"^(fresh|rotten): the film was", teacher.prompts[0], re.M)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["primary_metric"] == "accuracy"
    assert (tmp_path / "run" / "results.md").exists()

    n_prompts = len(teacher.prompts)
    res2 = load_recipe("pgkd")().run(cfg, tmp_path / "run")  # rerun: teacher output reused
    assert len(teacher.prompts) == n_prompts and res2["models"][1]["metrics"] == student


def test_parse_generated_reads_label_lines_and_maps_labels():
    reply = "1. Fresh: a warm and witty film overall\n- **rotten** - dull dull and dull again\nnoise\nfresh: too short"
    assert pg.parse_generated(reply, ["fresh", "rotten"]) == [
        ("fresh", "a warm and witty film overall"), ("rotten", "dull dull and dull again")]


def test_hard_examples_are_the_most_confidently_wrong_first():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
    labels = [1, 1, 1, 0]
    assert pg.hard_examples(probs, labels, 2) == [0, 1]
    assert pg.hard_examples(probs, labels, 3) == [0, 1, 3]  # then the least confident correct one


def test_features_are_stable_hashed_ngrams():
    cfg = pg.StudentConfig(buckets=1000, max_features=8)
    a = pg.featurize("Great fun!", cfg)
    assert a == pg.featurize("great   FUN", cfg) and len(a) == 3 and all(1 <= x <= 1000 for x in a)


class UselessTeacher(RuleTeacher):
    async def generate_batch(self, requests):
        return [GenerationResult(text="I cannot help with that.") for _ in requests]


def test_pgkd_stops_early_when_the_teacher_adds_nothing(data, tmp_path, monkeypatch):
    monkeypatch.setattr(pg, "build_backend", lambda cfg: UselessTeacher())
    res = load_recipe("pgkd")().run(_config(data, tmp_path / "run", rounds=5), tmp_path / "run")
    assert [r["added"] for r in res["rounds"]] == [0, 0]  # round 1 brings no gain: stop (patience 1)
    assert res["models"][1]["name"].endswith("(round 0)")


# ---- few-shot generation, filters, seeds ------------------------------------------------------
class FewshotTeacher(Backend):
    """Continues a few-shot prompt: writes a review with a sentiment word taken from the shots
    (every third one with the *opposite* sentiment: a careless teacher), and judges a text by
    its sentiment word (log-likelihood-like scores for the verbalizers)."""

    name = "fewshot-teacher"
    batch_size = 8

    def __init__(self):
        super().__init__()
        self.requests = []
        self.scored: list[str] = []

    async def generate_batch(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            lab = re.search(r"Sentiment: (\w+)\nReview:$", r.prompt).group(1)
            shots = re.findall(r"^Review: (.+)$", r.prompt, flags=re.M)
            w = next(x for x in FRESH + ROTTEN if x in shots[len(self.requests) % len(shots)].split())
            if len(self.requests) % 3 == 0:
                w = ROTTEN[FRESH.index(w)] if w in FRESH else FRESH[ROTTEN.index(w)]
            out.append(GenerationResult(text=f' "a {w} film {FILLER[len(self.requests) % 6]} take '
                                             f'{len(self.requests)} {lab}"\nSentiment: more', completion_tokens=9,
                                        prompt_tokens=50,
                                        finish_reason="length" if len(self.requests) == 5 else "stop"))
        return out

    def score_continuations(self, prompt, continuations):
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        self.scored.append(text)
        fresh = any(w in text.split() for w in FRESH)
        rotten = any(w in text.split() for w in ROTTEN)
        return [float(fresh), float(rotten)]


def _fewshot_config(data, out, **over):
    return validate(pg.PGKDConfig, {
        "output_dir": str(out), "teacher": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "t"},
        "data": {"asset": None, **data, "train_limit": None, "validation_limit": None},
        "student": {"buckets": 4096, "dim": 16}, "train": {"epochs": 30, "batch_size": 16, "lr": 0.05},
        "rounds": 1, "patience": 1, "prompts_per_round": 12, "hard_per_prompt": 3,
        "sampling": {"temperature": 0.9, "max_tokens": 40, "seed": 0},
        "generation": {"mode": "fewshot", "verbalizers": {"fresh": "positive", "rotten": "negative"},
                       "label_name": "Sentiment", "text_name": "Review", "filters": ["teacher_agrees"],
                       "judge_template": "Review: {text}\nPositive or negative?", "judge_prompt": {"chat": True}},
        **over,
    })


def test_fewshot_prompts_show_one_labels_misclassified_rows_and_the_judge_drops_mislabelled_output(
        data, tmp_path, monkeypatch):
    teacher = FewshotTeacher()
    monkeypatch.setattr(pg, "build_backend", lambda cfg: teacher)
    cfg = _fewshot_config(data, tmp_path / "run")
    res = load_recipe("pgkd")().run(cfg, tmp_path / "run")
    rows = [json.loads(x) for k in ("train_path", "validation_path") for x in Path(data[k]).read_text().splitlines()]
    label_of = {r["text"]: r["label"] for r in rows}
    assert len(teacher.requests) == 12
    word = {"positive": "fresh", "negative": "rotten"}
    for r in teacher.requests:
        assert isinstance(r.prompt, str) and r.params["stop"] == ["\n"]  # completion prompt, one line back
        lab = word[re.search(r"Sentiment: (\w+)\nReview:$", r.prompt).group(1)]
        shots = re.findall(r"^Review: (.+)$", r.prompt, flags=re.M)
        assert len(shots) == 3 and all(label_of[s] == lab for s in shots)  # shots of the asked label
        assert set(re.findall(r"^Sentiment: (\w+)$", r.prompt, flags=re.M)) == {word_ for word_, v in word.items()
                                                                                if v == lab}
    assert sum(r.meta["label"] == "fresh" for r in teacher.requests) == 6  # split evenly over the labels

    t = res["rounds"][1]["teacher"]
    assert t["generation_calls"] == 12 and t["completion_tokens"] == 12 * 9 and t["prompt_tokens"] == 12 * 50
    assert t["truncated"] == 1 and t["parsed"] == 11  # the one cut by max_tokens is dropped
    assert t["duplicates"] == 0 and t["rejected"]["teacher_agrees"] == 4  # the flipped ones
    assert t["added"] == 11 - 4 and t["judge_calls"] == 11  # batch calibration: no extra input
    added = json.loads((tmp_path / "run" / "rounds" / "round-01" / "added.json").read_text())
    for row in added:  # only texts whose sentiment word matches the requested label were kept
        assert any(w in row["text"].split() for w in (FRESH if row["label"] == "fresh" else ROTTEN))
        assert not row["text"].startswith('"')  # quotes stripped, first line only
    assert res["teacher_spent"]["generation_calls"] == 12

    n_req, n_scored = len(teacher.requests), len(teacher.scored)  # rerun: nothing generated or scored again
    res2 = load_recipe("pgkd")().run(cfg, tmp_path / "run")
    assert (len(teacher.requests), len(teacher.scored)) == (n_req, n_scored)
    assert res2["rounds"][1]["teacher"]["judge_calls"] == t["judge_calls"]


def test_student_wrong_filter_keeps_only_rows_the_current_student_misclassifies(data, tmp_path, monkeypatch):
    teacher = FewshotTeacher()
    monkeypatch.setattr(pg, "build_backend", lambda cfg: teacher)
    seen = {}
    real_grow = pg.PGKD._grow

    def spy(self, cfg, backend, out, rnd, last, train, val, names, dedup, pool_x, pool_y, rng, model):
        seen["model"] = model
        return real_grow(self, cfg, backend, out, rnd, last, train, val, names, dedup, pool_x, pool_y, rng, model)

    monkeypatch.setattr(pg.PGKD, "_grow", spy)
    cfg = _fewshot_config(data, tmp_path / "run", generation={"mode": "fewshot", "label_name": "Sentiment",
                                                               "text_name": "Review", "filters": ["student_wrong"],
                                                               "verbalizers": {"fresh": "positive",
                                                                               "rotten": "negative"}})
    res = load_recipe("pgkd")().run(cfg, tmp_path / "run")
    added = json.loads((tmp_path / "run" / "rounds" / "round-01" / "added.json").read_text())
    t = res["rounds"][1]["teacher"]
    assert t["added"] == len(added)
    assert t["added"] + t["rejected"]["student_wrong"] + t["duplicates"] + t["truncated"] == 12
    assert teacher.scored == []  # no judge asked
    if added:
        probs = pg.predict(seen["model"], [a["text"] for a in added], cfg.student)
        assert all(p != ["fresh", "rotten"].index(a["label"]) for p, a in zip(probs.argmax(-1).tolist(), added))


def test_seeds_run_the_loop_per_seed_and_report_mean_and_std(data, tmp_path, monkeypatch):
    monkeypatch.setattr(pg, "build_backend", lambda cfg: FewshotTeacher())
    cfg = _fewshot_config(data, tmp_path / "run", seeds=[0, 1], prompts_per_round=4)
    res = load_recipe("pgkd")().run(cfg, tmp_path / "run")
    base, student = res["models"]
    assert [s["seed"] for s in base["per_seed"]] == [0, 1] and base["run_dir"][1].startswith("seed-1/")
    accs = [s["accuracy"] for s in student["per_seed"]]
    assert student["metrics"]["accuracy"] == pytest.approx(sum(accs) / 2)
    assert student["metrics"]["accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert [r["round"] for r in res["rounds_mean"]] == [0, 1] and res["rounds_mean"][1]["generation_calls"] == 4
    for s in (0, 1):
        per = json.loads((tmp_path / "run" / f"seed-{s}" / "results.json").read_text())
        assert per["seed"] == s and {"seed": s, **per["models"][0]["metrics"]} == base["per_seed"][s]
    assert "± " in (tmp_path / "run" / "results.md").read_text()
    from kdforge.eval.report import build_report

    paths = build_report([tmp_path / "run"])  # the aggregated results.json follows the run-folder contract
    assert "PGKD" in Path(paths.html).read_text()


def test_parse_completion_takes_the_first_line_and_checks_its_length():
    assert pg.parse_completion(' "A warm, witty film."\nSentiment: positive') == "A warm, witty film."
    assert pg.parse_completion("\n\n  too short\n") is None
    assert pg.parse_completion("one two three four", max_words=3) is None
    gen = pg.PGKDGeneration(header="Reviews.", label_name="S", text_name="R")
    assert pg.fewshot_prompt(["a\nb", "c"], "pos", gen) == "Reviews.\n\nS: pos\nR: a b\n\nS: pos\nR: c\n\nS: pos\nR:"


def test_judge_calibration_removes_the_label_prior():
    raw = [[-1.0, -3.0], [-2.0, -2.5], [-0.5, -2.9], [-1.5, -1.0]]  # a judge that leans to label 0
    pick = lambda rows: [max(range(2), key=r.__getitem__) for r in rows]  # noqa: E731
    assert pick(pg.calibrate_scores(raw, "none")) == [0, 0, 0, 1]
    assert pick(pg.calibrate_scores(raw, "content_free", prior=[-1.0, -2.0])) == [0, 1, 0, 1]
    batch = pg.calibrate_scores(raw, "batch")  # column means [-1.25, -2.35] subtracted
    assert batch[0] == pytest.approx([0.25, -0.65]) and pick(batch) == [0, 1, 0, 1]


def test_pgkd_under_a_multi_process_launch_is_refused_before_any_work(tmp_path, monkeypatch):
    from kdforge.errors import ConfigError
    from kdforge.recipes.pgkd import PGKD

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one process"):
        PGKD().run(None, tmp_path / "run")  # refused before the config is even read
    assert not (tmp_path / "run").exists()


def _f1_by_counting(pred, labels, names):
    """Reference: accuracy and per-class F1 counted row by row (the definition)."""
    out = {"accuracy": sum(p == y for p, y in zip(pred, labels)) / len(labels)}
    f1s = []
    for c, name in enumerate(names):
        tp = sum(p == c and y == c for p, y in zip(pred, labels))
        fp = sum(p == c and y != c for p, y in zip(pred, labels))
        fn = sum(p != c and y == c for p, y in zip(pred, labels))
        prec, rec = (tp / (tp + fp) if tp + fp else 0.0), (tp / (tp + fn) if tp + fn else 0.0)
        out[f"f1/{name}"] = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(out[f"f1/{name}"])
    out["macro_f1"] = sum(f1s) / len(f1s)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_metrics_from_kdforge_eval_equal_accuracy_and_f1_counted_by_hand(seed):
    """pgkd's metrics come from kdforge.eval (float32) and equal the counted definition; a class
    that is never predicted (seed 0 drops class 2 from the predictions) has F1 0."""
    g = torch.Generator().manual_seed(seed)
    names = ["a", "b", "c"]
    labels = torch.randint(0, 3, (57,), generator=g).tolist()
    probs = torch.rand(57, 3, generator=g)
    if seed == 0:
        probs[:, 2] = 0.0
    got = pg.classification_metrics(probs, labels, names)
    want = _f1_by_counting(probs.argmax(-1).tolist(), labels, names)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    if seed == 0:
        assert got["f1/c"] == 0.0


def test_metrics_of_a_hand_worked_example():
    # labels a a b b, predictions a b b b: accuracy 3/4; a: P 1, R 1/2, F1 2/3; b: P 2/3, R 1, F1 4/5
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.4, 0.6]])
    got = pg.classification_metrics(probs, [0, 0, 1, 1], ["a", "b"])
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["f1/a"] == pytest.approx(2 / 3, rel=1e-6) and got["f1/b"] == pytest.approx(0.8, rel=1e-6)
    assert got["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2, rel=1e-6)
