"""Pre-flight of the ``llm_kd`` recipe: everything its config says that can be checked without
training (:func:`check`), and what the run will need (:func:`estimate`).

Checked: every method's objective against the teacher signal that method will get (the top-k
cache, or the live teacher for on-policy and feature terms), the cache settings, the teacher
reference (asset, folder, Hub id), the documents (names exist, train and held-out differ, enough
tokens for the blocks asked: the documents are tokenised with the teacher's tokenizer, no model
weights are loaded), the trackers of ``train.log_with``, and the output folder.

Estimated: teacher and student weights (built on the ``meta`` device from the teacher's
config.json), gradients and AdamW state of the trainable student parameters, the largest logits
array (student step, teacher cache pass, evaluation), the trained students the recipe keeps in
memory for its final evaluation, the teacher cache, saved students and checkpoints on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.preflight.checks import (
    check_model_source,
    check_objective,
    check_output_dir,
    check_trackers,
)
from kdforge.preflight.estimate import (
    Estimate,
    adamw_state_bytes,
    cache_bytes,
    grad_bytes,
    logits_bytes,
    param_bytes,
    trainable_numel,
)
from kdforge.preflight.problems import Problem, Problems

log = logging.getLogger(__name__)

__all__ = ["check", "estimate", "probe"]


def check(config: Any, output_dir: Path) -> list[Problem]:
    """Every problem of an ``llm_kd`` config (:class:`~kdforge.recipes.llm_kd.LLMKDConfig`) found
    without training; empty when there is none."""
    problems = Problems()
    _check_methods(problems, config)
    if any(not _online(m) for m in config.methods):
        _check_cache(problems, config.cache)
    kind = check_model_source(problems, "teacher", config.teacher)
    _check_student(problems, config.student)
    tokenizer = _tokenizer(problems, config.teacher) if kind in ("asset", "folder", "hub") else None
    if hasattr(config.data, "corpus"):
        documents = _documents(problems, config.data)
        if documents is not None:
            _check_splits(problems, config.data, documents, tokenizer)
    else:
        _check_dataset(problems, config.data, tokenizer)
    check_trackers(problems, "train.log_with", config.train.log_with)
    check_output_dir(problems, "output_dir", output_dir)
    return problems.items


def _online(method: Any) -> bool:
    """Whether a method reads the live teacher (on-policy, feature terms, ``teacher: online``)."""
    uses = getattr(method, "uses_online_teacher", None)
    if uses is not None:
        return bool(uses())
    return method.on_policy is not None or any(t.source == "feature" for t in method.objective)


def _check_student(problems: Problems, student: Any) -> None:
    if getattr(student, "kind", "from_teacher") == "pretrained" and student.model:
        check_model_source(problems, "student", student)
    if getattr(student, "lora", None) is not None:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            problems.add("student.lora", "a LoRA student needs the peft package, which is not installed",
                         "pip install peft, or remove student.lora to train the full student")


# ------------------------------------------------------------------------------------------
# methods and cache


def _check_methods(problems: Problems, config: Any) -> None:
    c = config.cache
    for i, method in enumerate(config.methods):
        live = _online(method)
        check_objective(problems, f"methods.{i}.objective", method.objective,
                        teacher="dense" if live else "sparse", k=c.k, tail_samples=c.tail_samples,
                        chunked=method.chunked, max_steps=config.train.max_steps or 1,
                        vocab_size=max(16, c.k + c.tail_samples + 2))


def _check_cache(problems: Problems, c: Any) -> None:
    if c.k == 0 and c.tail_samples == 0:
        problems.add("cache.k", "k=0 and tail_samples=0 keep nothing of the teacher",
                     "set k >= 1, or tail_samples >= 1 for a pure-sampling cache")
    if c.tail_samples > 255:
        problems.add("cache.tail_samples", f"tail_samples={c.tail_samples}: the cache stores draw counts as "
                                           "one byte, so at most 255", "use tail_samples <= 255")
    try:
        from kdforge.teachers.cache.codec import get_encoding

        encoding = get_encoding(c.encoding)
    except KdforgeError as exc:
        problems.add("cache.encoding", exc.problem, exc.fix)
        return
    if encoding.compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            problems.add("cache.encoding", f"encoding {c.encoding!r} needs the zstandard package, not installed",
                         "pip install zstandard, or use encoding: compact-u8-zlib (standard library only)")


# ------------------------------------------------------------------------------------------
# data


def _documents(problems: Problems, d: Any) -> dict[str, str] | None:
    from kdforge.recipes.lm_data import load_corpus_documents

    try:
        return load_corpus_documents(d.corpus)
    except KdforgeError as exc:
        problems.add("data.corpus", exc.problem, exc.fix)
    except OSError as exc:
        problems.add("data.corpus", f"cannot read {d.corpus!r}: {exc}", "check the path and its permissions")
    return None


def _tokenizer(problems: Problems, source: Any) -> Any:
    """The teacher's tokenizer when it is on this machine (an installed asset, a folder, the Hub
    cache or a reachable Hub); None otherwise (the size checks are then skipped)."""
    if _asset_folder(source.model) is False:
        return None  # an asset installed on first use; the sizes are checked then
    from kdforge.models import load_tokenizer

    try:
        return load_tokenizer(source, what="teacher")
    except KdforgeError as exc:
        problems.add("teacher.model", exc.problem, exc.fix)
    except (OSError, ValueError) as exc:
        problems.add("teacher.model", f"cannot load the tokenizer of {source.model!r}: {str(exc).splitlines()[0]}",
                     "point teacher.model at a folder with the tokenizer files (tokenizer.json ...)")
    return None


def _asset_folder(name: str) -> str | bool | None:
    """An asset's folder when installed, False when it is an asset not installed yet, None when
    ``name`` is no asset."""
    import importlib

    from kdforge.assets import ASSET_MODULES

    name = name.removeprefix("asset:")
    if name not in ASSET_MODULES:
        return None
    module = importlib.import_module(ASSET_MODULES[name])
    target = module.target_dir() if hasattr(module, "target_dir") else None
    if target is None or not module.is_complete(target):
        return False
    return str(target)


def _check_dataset(problems: Problems, d: Any, tokenizer: Any) -> None:
    """A ``data: {path: ...}`` dataset: a local one (or a preset) is built exactly as the run builds
    it (fields, chat template, assistant turns, held-out rule, empty splits); a Hub one must be
    reachable."""
    from kdforge.data.sources import PRESETS, hub_offline_reason

    local = d.path in PRESETS or Path(d.path).expanduser().exists() or any(ch in d.path for ch in "*?[")
    if not local:
        reason = hub_offline_reason()
        if reason is not None:
            problems.add("data.path", f"{d.path!r} is not a local path or preset, and as a Hub dataset it cannot "
                                      f"be downloaded: {reason}",
                         f"point data.path at a local file, folder or save_to_disk copy (presets: "
                         f"{', '.join(PRESETS)}), or run with network access")
        return
    if tokenizer is None:
        return
    from kdforge.recipes.lm_data import build_lm_data

    with problems.catch("data"):
        build_lm_data(d, tokenizer)


def _check_splits(problems: Problems, d: Any, documents: dict[str, str], tokenizer: Any) -> None:
    names = sorted(documents)
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    for side in ("train_docs", "eval_docs"):
        docs = getattr(d, side)
        if not docs:
            problems.add(f"data.{side}", "names no document", f"name at least one of: {shown}")
        for j, name in enumerate(docs):
            if name not in documents:
                import difflib

                close = difflib.get_close_matches(name, names, n=1)
                problems.add(f"data.{side}.{j}", f"unknown document {name!r} in corpus {d.corpus!r}",
                             f"{f'did you mean {close[0]!r}? ' if close else ''}choose from: {shown}")
    overlap = sorted(set(d.train_docs) & set(d.eval_docs))
    if overlap:
        problems.add("data.eval_docs", f"documents {overlap} are in both the train and held-out splits",
                     "hold out different documents than you train on")
    if tokenizer is None:
        return
    from kdforge.data.text import tokenize_texts, unwrap_paragraphs

    for side, asked_key in (("train_docs", "train_sequences"), ("eval_docs", "eval_sequences")):
        docs = [n for n in getattr(d, side) if n in documents]
        if not docs:
            continue
        texts = [unwrap_paragraphs(documents[n]) if d.unwrap_paragraphs else documents[n] for n in docs]
        try:
            tokens = len(tokenize_texts(texts, tokenizer))
        except KdforgeError as exc:
            problems.add(f"data.{side}", exc.problem, exc.fix)
            continue
        blocks = tokens // d.seq_len
        asked = getattr(d, asked_key)
        split = "training" if side == "train_docs" else "held-out"
        if blocks == 0:
            problems.add(f"data.{side}", f"the {split} documents {docs} hold {tokens} tokens, fewer than one block "
                                         f"of data.seq_len={d.seq_len}",
                         f"add text to them, name more documents, or lower data.seq_len below {max(tokens, 2)}")
        elif asked is not None and asked > blocks:
            problems.add(f"data.{asked_key}", f"{asked} blocks of {d.seq_len} tokens asked, but the {split} "
                                              f"documents {docs} hold {tokens} tokens = {blocks} blocks",
                         f"set data.{asked_key} to at most {blocks} (or null for all), name more documents, "
                         "or lower data.seq_len")


# ------------------------------------------------------------------------------------------
# estimate


def estimate(config: Any, output_dir: Path, *, device: str | None = None) -> Estimate | None:
    """Memory and disk of an ``llm_kd`` run; None when the teacher's config is not on this machine
    (an asset not yet installed, a Hub id not cached)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = _meta_model(config.teacher.model, config.teacher.dtype, getattr(config.teacher, "revision", None))
    if teacher is None:
        return None
    student = _meta_student(config.student, teacher)
    if student is None:
        return None
    d, c, tr = config.data, config.cache, config.train
    vocab = int(teacher.config.vocab_size)
    seq_len = _seq_len(d)
    est = Estimate(device=device)
    runs = len(config.methods) * len(config.seeds)
    est.add("teacher weights", param_bytes(teacher), note=f"{_count(teacher)} params, {_dtype_name(teacher)}")
    student_bytes = param_bytes(student)
    est.add("student weights (template + training copy)", 2 * student_bytes,
            note=f"{_count(student)} params, {trainable_numel(student) / 1e6:.1f}M trainable")
    est.add("gradients", grad_bytes(student))
    est.add("AdamW state", adamw_state_bytes(student), note="exp_avg + exp_avg_sq of the trainable params"
            + ("; LoRA trains far fewer" if getattr(config.student, "lora", None) else ""))
    rows = tr.batch_size * seq_len
    step_logits = logits_bytes(rows, vocab)
    if all(m.chunked for m in config.methods):
        from kdforge.losses.chunked import auto_chunk_size

        step_logits = logits_bytes(auto_chunk_size(vocab, rows, device), vocab)
    uses_cache = any(not _online(m) for m in config.methods)
    cache_pass = logits_bytes(c.batch_size * seq_len, vocab, with_grad=False) * 2 if uses_cache else 0
    eval_pass = logits_bytes(config.eval.batch_size * seq_len, vocab, with_grad=False) * 2  # teacher + model
    largest = max(step_logits, cache_pass, eval_pass)
    which = {step_logits: f"training step [{rows}, {vocab}] + grad", cache_pass: "teacher cache pass",
             eval_pass: "evaluation pass"}[largest]
    est.add("largest logits array", largest, note=which)
    if runs > 1:
        est.add("trained students kept for evaluation", (runs - 1) * student_bytes,
                note=f"{runs} (method, seed) runs")
    n_train = getattr(d, "train_sequences", None) or getattr(d, "limit", None)
    if uses_cache and n_train:
        total, per_token = cache_bytes(n_train, seq_len, c.k, vocab, c.encoding, c.tail_samples)
        est.add("teacher cache", total, "disk", note=f"{n_train * seq_len} tokens x {per_token:.1f} B/token"
                + (", uncompressed: zlib/zstd write less on real text" if _compressed(c.encoding) else ""))
        from kdforge.recipes.llm_features import feature_cache_size

        feats = feature_cache_size(config, teacher, student, n_train, seq_len)
        if feats is not None:  # teacher: cache methods with feature terms (kdforge.recipes.llm_features)
            est.add("teacher hidden states (cache)", feats[0], "disk",
                    note=f"layers {feats[1]}, {c.feature_dtype}: {feats[0] / (n_train * seq_len):.0f} B/token")
    elif uses_cache:
        est.notes.append("the number of training rows is known only once the data is read: no cache size")
    if config.save_students:
        est.add("saved students", runs * student_bytes, "disk")
    if tr.save_every:
        keep = tr.keep_last or 1
        est.add("checkpoints", runs * keep * (student_bytes + adamw_state_bytes(student)), "disk",
                note=f"{keep} per run x (weights + AdamW state)")
    if tr.max_steps:
        est.steps = tr.max_steps * runs
    return est


def probe(config: Any, *, device: str | None = None, steps: int = 2) -> float | None:
    """Seconds per optimizer step of the run's student on a batch of the run's shape (the first
    distillation method's objective against a random teacher signal of the kind it reads;
    :mod:`kdforge.preflight.probe`). None when the teacher's config is not on this machine."""
    import torch

    from kdforge.losses import LOSSES
    from kdforge.losses.dac_clip import with_stand_in_net
    from kdforge.preflight.checks import random_signal
    from kdforge.preflight.probe import materialize, time_steps

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = _meta_model(config.teacher.model, config.teacher.dtype, getattr(config.teacher, "revision", None))
    meta = _meta_student(config.student, teacher) if teacher is not None else None
    if meta is None:
        return None
    student = materialize(meta, device)
    method = next((m for m in config.methods if m.role != "baseline"), config.methods[0])
    c, tr = config.cache, config.train
    rows, seq_len, vocab = tr.batch_size, _seq_len(config.data), int(teacher.config.vocab_size)
    gen = torch.Generator(device="cpu").manual_seed(0)
    kind = "dense" if _online(method) else "sparse"
    terms = [(LOSSES.get(t.name), t.weight, with_stand_in_net(t.name, t.params)) for t in method.objective
             if t.source == "loss" and not t.scheduled]

    def batch() -> dict[str, Any]:
        ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
        teacher_logits = torch.randn(rows, seq_len, vocab, generator=gen)
        signal = random_signal(kind, teacher_logits, c.k, c.tail_samples)
        if signal is not None and not torch.is_tensor(signal):
            signal = type(signal)(signal.ids.to(device), signal.logprobs.to(device), signal.vocab_size,
                                  signal.num_exact)
        elif signal is not None:
            signal = signal.to(device)
        return {"input_ids": ids.to(device), "labels": ids.to(device), "signal": signal}

    def loss(model: Any, b: dict[str, Any]) -> Any:
        logits = model(input_ids=b["input_ids"]).logits.float()
        total = logits.new_zeros(())
        for fn, weight, params in terms:
            total = total + weight * fn(logits, b["signal"], labels=b["labels"], **params)
        return total if terms else logits.mean()

    return time_steps(student, batch, loss, steps=steps, lr=tr.lr)


def _seq_len(d: Any) -> int:
    """Tokens per row: the corpus's ``seq_len``, a dataset's block or truncation length."""
    return int(getattr(d, "seq_len", None) or getattr(d, "block_size", None) or getattr(d, "max_length", None)
               or 1024)


def _dtype_name(model: Any) -> str:
    return str(next(iter(model.parameters())).dtype).removeprefix("torch.")


def _meta_model(name: str, dtype: str | None = None, revision: str | None = None) -> Any:
    """A causal LM built on the meta device from its config.json (no weights read), or None when
    the config is not on this machine."""
    import torch

    folder = _asset_folder(name)
    if folder is False:
        return None
    path = folder or name
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(path, revision=revision, local_files_only=folder is None
                                               and not Path(name).expanduser().is_dir())
        if dtype in (None, "auto"):
            torch_dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
            torch_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        log.debug("no estimate for %r: %s", name, exc)
        return None


def _meta_student(spec: Any, teacher: Any) -> Any:
    """The untrained student on the meta device, frozen as the recipe freezes it."""
    import torch

    kind = getattr(spec, "kind", "from_teacher")
    frozen = spec.frozen() if hasattr(spec, "frozen") else (spec.freeze_embeddings, spec.freeze_head)
    quiet = logging.getLogger("kdforge.students.from_teacher")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the sizing copy is not news
    try:
        if kind == "pretrained":
            student = _meta_model(spec.model, spec.dtype, spec.revision)
        else:
            with torch.device("meta"):
                if kind == "from_config":
                    from kdforge.students.build import _from_config

                    student = _from_config(spec, teacher)
                else:
                    from kdforge.students.from_teacher import student_from_teacher

                    student = student_from_teacher(teacher, spec.layers,
                                                   num_layers=spec.num_layers if spec.layers == "every_k" else None,
                                                   freeze_embeddings=frozen[0], freeze_head=frozen[1])
    finally:
        quiet.setLevel(level)
    if student is None:
        return None
    dtype = getattr(spec, "dtype", None)
    if dtype not in (None, "auto"):
        student = student.to(dtype=getattr(torch, dtype))
    if kind != "from_teacher":
        from kdforge.students.build import freeze

        freeze(student, *frozen)
    return student


def _count(model: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _compressed(encoding: str) -> bool:
    from kdforge.teachers.cache.codec import get_encoding

    return get_encoding(encoding).compression is not None

