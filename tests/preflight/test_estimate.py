"""The pre-flight estimate against measured sizes of tiny models: parameter bytes exact (also from
the meta-device build the estimate uses), gradients and AdamW state measured after a real step,
teacher-cache bytes equal to what the writer puts on disk for uncompressed encodings, the llm_kd
estimate equal to the models the recipe builds, and the fit checks."""

from __future__ import annotations

import pytest
import torch
from tests.recipes._tiny import seeded_teacher_and_corpus
from tests.train._tiny import tiny_llama

from kdforge.preflight import Estimate, Problems
from kdforge.preflight.estimate import (
    adamw_state_bytes,
    cache_bytes,
    fmt_bytes,
    grad_bytes,
    param_bytes,
)
from kdforge.preflight.fits import check_fits, check_free_disk


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what the process really holds)."""
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameter_bytes_are_exact_and_the_meta_build_agrees(dtype):
    model = tiny_llama(0, layers=3).to(dtype)
    assert param_bytes(model) == _storage_bytes(model.parameters())
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    assert param_bytes(meta) == param_bytes(model)


def test_gradients_and_adamw_state_are_what_one_step_allocates():
    model = tiny_llama(0, layers=2)
    model.model.embed_tokens.requires_grad_(False)  # frozen tensors get neither grads nor state
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grad_bytes(model) == _storage_bytes(grads)
    optimizer.step()
    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    assert adamw_state_bytes(model) == _storage_bytes(state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adamw_state_bytes(model) == 2 * 4 * trainable  # two float32 moments per trainable parameter


@pytest.mark.parametrize("encoding, k, tail", [("raw-fp32", 8, 0), ("raw-fp16", 4, 0), ("compact-u8", 8, 0),
                                               ("compact-u8", 4, 6)])
def test_cache_bytes_equal_what_the_writer_puts_on_disk(tmp_path, encoding, k, tail):
    from kdforge.teachers import build_teacher_cache
    from kdforge.teachers.cache.format import read_manifest

    teacher = tiny_llama(0, layers=1)
    blocks = torch.randint(3, 64, (10, 12), generator=torch.Generator().manual_seed(0))
    out = build_teacher_cache(teacher, blocks, tmp_path / "cache", k=k, tail_samples=tail, encoding=encoding,
                              batch_size=4, shard_size=4)
    written = sum(e["bytes"] for e in read_manifest(out)["shards"])
    total, per_token = cache_bytes(10, 12, k, 64, encoding, tail)
    assert written == total
    assert per_token * 10 * 12 == pytest.approx(total)


def test_the_llm_kd_estimate_sizes_the_models_the_recipe_builds(tmp_path):
    from kdforge.models import load_model
    from kdforge.preflight import llm_kd
    from kdforge.recipes import load_recipe_file
    from kdforge.students.build import build_student

    assets = seeded_teacher_and_corpus(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"recipe: llm_kd\nteacher: {{model: {assets / 'teacher'}}}\n"
                      f"student: {{layers: first_last}}\n"
                      f"data: {{corpus: {assets / 'corpus'}, train_docs: [book_a], eval_docs: [book_b], seq_len: 16, "
                      f"train_sequences: 8}}\ncache: {{k: 8, encoding: raw-fp32}}\n"
                      "train: {max_steps: 2, batch_size: 4, save_every: 1, keep_last: 2}\nseeds: [0, 1]\n")
    _, config = load_recipe_file(recipe)
    est = llm_kd.estimate(config, tmp_path / "out", device="cpu")
    items = {i.name: i.bytes for i in est.items}
    teacher, tokenizer = load_model(config.teacher, role="teacher")
    student = build_student(config.student, teacher, tokenizer)
    assert items["teacher weights"] == _storage_bytes(teacher.parameters())
    assert items["student weights (template + training copy)"] == 2 * param_bytes(student)
    assert items["AdamW state"] == 2 * 4 * sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert items["teacher cache"] == cache_bytes(8, 16, 8, teacher.config.vocab_size, "raw-fp32")[0]
    assert items["largest logits array"] == max(2 * 4 * 16 * teacher.config.vocab_size * 4,  # step: logits + grad
                                                2 * 8 * 16 * teacher.config.vocab_size * 4)  # cache/eval passes
    assert items["checkpoints"] == 4 * 2 * (param_bytes(student) + items["AdamW state"])  # 4 runs x keep_last 2
    assert est.steps == 2 * 2 * 2 and est.memory_bytes == sum(v for k, v in items.items()
                                                              if k not in ("teacher cache", "saved students",
                                                                           "checkpoints"))
    seconds = llm_kd.probe(config, device="cpu")
    assert seconds is not None and seconds > 0


def test_fits_reports_memory_and_disk_that_do_not_suffice(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 2**20))
    est = Estimate(device="cpu")
    est.add("weights", 3 * 2**30)
    est.add("cache", 5 * 2**30, "disk")
    problems = Problems()
    check_fits(problems, est, tmp_path / "new" / "run", available=2**30)
    assert [p.key for p in problems] == ["memory", "disk"]
    assert "3.0 GiB" in problems.items[0].problem and "1.0 GiB is available" in problems.items[0].problem
    assert "5.0 GiB" in problems.items[1].problem and "1.0 MiB free" in problems.items[1].problem
    problems = Problems()
    check_fits(problems, est, tmp_path, available=2**40)
    assert [p.key for p in problems] == ["disk"]
    problems = Problems()
    check_free_disk(problems, "disk", tmp_path, 2**19)
    assert not problems


def test_fmt_bytes():
    assert [fmt_bytes(x) for x in (0, 1023, 1536, 3 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "3.0 GiB"]
