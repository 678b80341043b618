"""PGKD loop: hard examples reach the teacher, its examples are parsed, deduped, added, and
the retrained student improves; early stopping; resume without regenerating."""

from __future__ import annotations

import json
import random
import re

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
