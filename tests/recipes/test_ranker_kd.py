"""Ranker distillation on tiny BERTs: RankingTask's outputs, Margin-MSE training moving the student's
margins toward the teacher's, and the ranker_kd recipe end to end from its shipped YAML."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from kdforge.errors import ConfigError, DataError
from kdforge.losses import margin_mse, pair_scores
from kdforge.models import ModelSource
from kdforge.students.encoder import encode, load_sentence_encoder
from kdforge.train import Distiller, Objective, RankingTask, TrainConfig

WORDS = ["emma", "anne", "walked", "talked", "laughed", "garden", "house", "ball", "letter", "rain", "sun",
         "happy", "sad", "quiet", "the", "a", "in", "to", "and", "with", "of", "was", "very", "soon"]


def _tiny_encoder(folder: Path, hidden: int, layers: int, seed: int) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS])}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(folder)
    return folder


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(6)).capitalize() + "."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    return _tiny_encoder(root / "teacher", 48, 2, 0), _tiny_encoder(root / "student", 32, 2, 1)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for name in ("one", "two", "three"):
        paragraphs = [" ".join(_sentence(rng) for _ in range(4)) for _ in range(30)]
        (folder / f"{name}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return folder


def _groups(rng: random.Random, n: int, teacher, ttok) -> list[dict]:
    groups = []
    for _ in range(n):
        texts = [_sentence(rng) for _ in range(3)]
        emb = encode(teacher, ttok, texts)
        groups.append({"texts": texts, "teacher_scores": pair_scores(emb[:1], emb[None, 1:])[0],
                       "teacher_embeddings": emb})
    return groups


def _collate(tok):
    from kdforge.data.ranking import collate_groups

    return collate_groups(tok, 16)


def test_ranking_task_scores_each_query_against_its_own_passages_and_pads_exactly(models):
    student, tok = load_sentence_encoder(ModelSource(model=str(models[1])))
    teacher, ttok = load_sentence_encoder(ModelSource(model=str(models[0])))
    batch = _collate(tok)(_groups(random.Random(1), 2, teacher, ttok))
    out = RankingTask("scores").run_student(student, batch)
    emb = student(batch["input_ids"], batch["attention_mask"]).view(2, 3, -1)
    torch.testing.assert_close(out.student_logits, torch.stack([emb[i, 1:] @ emb[i, 0] for i in range(2)]))
    assert out.mask.shape == (2,) and RankingTask("scores").count(batch) == 2

    padded = RankingTask("embeddings", pad_to=48).run_student(student, batch).student_logits
    flat = emb.reshape(6, -1)
    assert padded.shape == (6, 48) and torch.all(padded[:, 32:] == 0)
    torch.testing.assert_close(padded @ padded.T, flat @ flat.T)  # every dot product (and cosine) unchanged
    assert RankingTask("embeddings").count(batch) == 6
    with pytest.raises(DataError, match="6 texts for 4 groups of 3"):
        RankingTask().count({**batch, "teacher_scores": torch.zeros(4, 2)})
    with pytest.raises(ConfigError, match="pad_to"):
        RankingTask("scores", pad_to=48)


def test_margin_mse_training_moves_the_students_margins_toward_the_teachers(models, tmp_path):
    # unnormalised embeddings: dot-product margins of order 1 (random tiny BERTs' unit vectors are nearly parallel)
    teacher, ttok = load_sentence_encoder(ModelSource(model=str(models[0])), normalize=False)
    student, tok = load_sentence_encoder(ModelSource(model=str(models[1])), normalize=False)
    rng = random.Random(2)
    train, held = _groups(rng, 256, teacher, ttok), _groups(rng, 32, teacher, ttok)

    def held_out_error() -> float:
        batch = _collate(tok)(held)
        with torch.no_grad():
            scores = RankingTask("scores").run_student(student, batch).student_logits
        return margin_mse(scores, batch["teacher_scores"]).item()

    before = held_out_error()
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=1e-3, seed=0, output_dir=str(tmp_path), progress=False,
                      log_every=20)
    Distiller(student, None, task=RankingTask("scores"), objective=Objective([{"name": "margin_mse", "weight": 1.0}]),
              config=cfg, train_data=train, collate_fn=_collate(tok)).train()
    assert held_out_error() < 0.6 * before  # on held-out groups: it learnt the margins, not the batches


def _overrides(models, documents) -> dict:
    return {"teacher.model": str(models[0]), "student.model": str(models[1]), "student.layers": [0],
            "data.path": str(documents), "data.eval_documents": ["three"], "data.train_queries": 48,
            "data.eval_queries": 20, "data.min_chars": 10, "data.max_chars": 80, "data.max_length": 16,
            "negatives.top": 5, "train.epochs": 4, "train.batch_size": 8, "train.lr": 3e-3, "seeds": [0],
            "references": [str(models[0])]}


def test_ranker_kd_recipe_runs_from_its_yaml_and_reuses_finished_work(models, documents, tmp_path):
    from kdforge.recipes import load_recipe_file

    recipe, config = load_recipe_file("configs/ranker_kd.yaml", _overrides(models, documents))
    out = tmp_path / "run"
    results = recipe.run(config, out)
    rows = {m["name"]: m for m in results["models"]}
    assert set(rows) == {"teacher", "student before distillation", str(models[0]), "Margin-MSE", "similarity KD"}
    assert rows[str(models[0])]["metrics"]["teacher_top1"] == 1.0  # the teacher itself, scored as a reference
    assert rows[str(models[0])]["metrics"]["mrr@10"] == pytest.approx(rows["teacher"]["metrics"]["mrr@10"])
    for name in ("Margin-MSE", "similarity KD"):
        m = rows[name]["metrics"]
        assert {"mrr@10", "ndcg@10", "recall@1", "recall@10", "teacher_top1"} <= set(m)
        folder = out / "students" / name.lower().replace(" ", "-") / "seed-0"
        logs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert logs[-1]["loss"] < logs[0]["loss"], name
    assert results["train_queries"] == 48 and results["eval_queries"] == 20
    assert "mrr@10" in (out / "results.md").read_text()
    assert (out / "teacher" / "embeddings.safetensors").is_file()
    again = recipe.run(config, out)  # teacher and students reused: same numbers
    assert again["models"] == results["models"]


def test_ranker_kd_config_refuses_losses_that_do_not_fit_the_signal(models, documents):
    from kdforge.recipes import load_recipe_file

    base = _overrides(models, documents)
    with pytest.raises((ConfigError, ValueError), match="projection"):
        load_recipe_file("configs/ranker_kd.yaml", {**base, "methods": [
            {"name": "mse", "signal": "embeddings", "terms": [{"name": "embedding_mse", "weight": 1.0}]}]})
    with pytest.raises((ConfigError, ValueError), match="signal: scores"):
        load_recipe_file("configs/ranker_kd.yaml", {**base, "methods": [
            {"name": "m", "signal": "embeddings", "terms": [{"name": "margin_mse", "weight": 1.0}]}]})
