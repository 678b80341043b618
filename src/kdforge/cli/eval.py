"""``kdforge eval``: evaluate a student (and its teacher and baselines) on LM data.

Writes ``results.json`` + ``results.md`` (``docs/run-format.md``) to ``--out`` and prints a table;
``kdforge report OUT`` turns them into a page.

Example::

    kdforge eval --teacher ~/.cache/kdforge/smollm2 --baseline runs/ce/final \\
        --student runs/kd/final --data heldout.txt --max-tokens 20000 -o runs/eval
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TOKEN_FILES = (".npy", ".pt")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate student/teacher/baseline LMs or classifiers: quality, fidelity, calibration, cost",
        description="Evaluate causal LMs on held-out data: perplexity, next-token accuracy and "
        "ECE, fidelity to the teacher (top-1 agreement, KL both ways, JS), optional QA (exact "
        "match, ROUGE-L, answer calibration), parameters, size and latency.",
    )
    p.add_argument("--student", action="append", default=[], metavar="[NAME=]PATH",
                   help="student model: an asset name (smollm2), a folder, a .gguf file or a Hub id "
                   "(repeatable)")
    p.add_argument("--teacher", default=None, metavar="[NAME=]PATH", help="teacher model")
    p.add_argument("--baseline", action="append", default=[], metavar="[NAME=]PATH",
                   help="baseline model, e.g. the same student trained on labels only (repeatable)")
    p.add_argument("--data", required=True, action="append", metavar="[DOMAIN=]SPEC",
                   help="data read by kdforge.data (docs/data.md): a preset (austen), a .txt/.json/"
                   ".jsonl/.csv/.parquet file, glob or folder, a save_to_disk folder, a Hub id, or a "
                   ".yaml data spec; chat and prompt/completion rows are scored on response tokens "
                   "only. Or token ids (.npy, .pt, .jsonl with input_ids). Repeat for several domains "
                   "(each gets its own perplexity/agreement breakdown; --max-tokens applies per domain)")
    p.add_argument("--task", choices=("lm", "classification"), default="lm",
                   help="lm: causal LMs on text (default); classification: sequence classifiers "
                   "(AutoModelForSequenceClassification) on labelled text")
    p.add_argument("--label-field", default="label", help="label column for --task classification")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: teacher's, else first student's)")
    p.add_argument("--qa", default=None, help=".jsonl of {prompt, answer} and/or {prompt, choices, gold}")
    p.add_argument("--block-size", type=int, default=128, help="block length when packing")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack examples into --block-size blocks (default: text yes, chat and "
                   "prompt/completion no: one padded row per example)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=20_000,
                   help="evaluate at most this many tokens (samples for --task classification)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length for --qa")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the models' own code from their Hub repo/folder (only for models you trust)")
    p.add_argument("--no-cost", action="store_true", help="skip parameter/size/latency measurement")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("-o", "--out", default=None, help="output folder for results.json/results.md")
    from kdforge.data.options import add_data_options

    add_data_options(p, split_help="split to evaluate (default: test, else validation, else train)")
    p.set_defaults(func=handle)


def _split_spec(spec: str, default_name: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare PATH is named after its last component."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name.strip(), path.strip()
    return (Path(spec).stem or default_name), spec


def _resolve_device(device: str):
    """``--device``: the accelerator for ``auto`` (:func:`kdforge.models.resolve_device`)."""
    from kdforge.models import resolve_device

    return resolve_device(device)


def _resolve_dtype(dtype: str, device):
    import torch

    from kdforge.teachers.online import resolve_dtype

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return resolve_dtype(dtype)


def _source(path: str, args: argparse.Namespace, device=None, dtype=None) -> Any:
    """A :class:`~kdforge.models.ModelSource` for ``path`` (asset name, folder, ``.gguf`` file or Hub
    id): the same names, Hub handling and errors as ``kdforge run``'s ``teacher:``/``student:``."""
    from kdforge.models import ModelSource

    return ModelSource(model=path, device=str(device) if device is not None else "cpu",
                       dtype=str(dtype).replace("torch.", "") if dtype is not None else "float32",
                       trust_remote_code=bool(getattr(args, "trust_remote_code", False)))


def load_causal_lm(path: str, *, device, dtype, trust_remote_code: bool = False) -> Any:
    """A causal LM (asset name, folder, ``.gguf`` file or Hub id) in eval mode on ``device``,
    loaded by :func:`kdforge.models.load_causal_lm`."""
    from kdforge import models

    args = argparse.Namespace(trust_remote_code=trust_remote_code)
    return models.load_causal_lm(_source(path, args, device, dtype), what="model").to(device).eval()


def _load_tokenizer(path: str, args: argparse.Namespace | None = None) -> Any:
    from kdforge.models import load_tokenizer

    return load_tokenizer(_source(path, args or argparse.Namespace()), what="model")


def _is_token_file(path: Path) -> bool:
    if path.suffix in _TOKEN_FILES:
        return True
    if path.suffix == ".jsonl" and path.is_file():
        with path.open(encoding="utf-8") as fh:
            first = fh.readline()
        return '"input_ids"' in first
    return False


def handle(args: argparse.Namespace) -> int:
    from kdforge.data.options import spec_from_args
    from kdforge.errors import ConfigError
    from kdforge.eval import lm

    if not args.student:
        raise ConfigError("no --student given", "pass --student PATH (repeat for several students)")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    specs: list[tuple[str, str, str]] = []
    if args.teacher:
        specs.append(("teacher", *_split_spec(args.teacher, "teacher")))
    specs += [("baseline", *_split_spec(s, f"baseline{i}")) for i, s in enumerate(args.baseline)]
    specs += [("student", *_split_spec(s, f"student{i}")) for i, s in enumerate(args.student)]
    names = [n for _, n, _ in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must differ, got {names}", "name them with NAME=PATH")
    from kdforge.models import check_source

    for role, _, path in specs:  # a missing folder or an offline Hub id fails before any data is read
        check_source(_source(path, args), what=role)

    if args.task == "classification":
        results = _classify(args, specs, device, dtype)
        _finish(args, results)
        return 0

    data = [_split_spec(d, f"data{i}") for i, d in enumerate(args.data)]
    tok_source = args.tokenizer or (specs[0][2] if args.teacher else specs[-len(args.student)][2])
    tokenizer = None
    if not all(_is_token_file(Path(path)) for _, path in data) or args.qa:
        tokenizer = _load_tokenizer(tok_source, args)
    batches: list[dict[str, Any]] = []
    for domain, path in data:
        tag = domain if len(data) > 1 else None
        if _is_token_file(Path(path)):
            blocks = lm.load_token_blocks(path, block_size=args.block_size)
            if args.max_tokens:
                blocks = blocks[: max(args.max_tokens // blocks.shape[1], 1)]
            batches += lm.batches_from_blocks(blocks, batch_size=args.batch_size, domain=tag)
        else:
            spec = spec_from_args(path, args)
            batches += lm.data_batches(spec, tokenizer, block_size=args.block_size, batch_size=args.batch_size,
                                       max_tokens=args.max_tokens, domain=tag, packing=args.packing)
    qa_rows = lm.load_qa_rows(args.qa) if args.qa else None

    models = {}
    for role, name, path in specs:
        log.info("loading %s %s from %s", role, name, path)
        models[name] = (role, load_causal_lm(path, device=device, dtype=dtype,
                                             trust_remote_code=args.trust_remote_code))
    results = lm.evaluate_lm_suite(
        models, batches, tokenizer=tokenizer, qa_rows=qa_rows, measure_cost=not args.no_cost,
        latency_repeats=args.latency_repeats, max_new_tokens=args.max_new_tokens,
        data_description=", ".join(path for _, path in data),
    )
    results["device"] = str(device)
    results["dtype"] = str(dtype).replace("torch.", "")
    _finish(args, results)
    return 0


def _finish(args: argparse.Namespace, results: dict[str, Any]) -> None:
    from kdforge.eval import lm
    from kdforge.io import write_json_atomic, write_text_atomic

    _print_table(results)
    if args.out:
        out = Path(args.out)
        write_json_atomic(out / "results.json", results)
        write_text_atomic(out / "results.md", lm.results_markdown(results))
        print(f"results: {out / 'results.json'}")


def _load_labelled(path: str, text_field: str, label_field: str, split: str | None) -> tuple[list[str], list[Any]]:
    """(texts, labels) from a .jsonl, .csv or dataset folder."""
    import csv

    from kdforge.errors import DataError

    p = Path(path)
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or ("test" if "test" in ds else "validation" if "validation" in ds else next(iter(ds)))]
        rows = list(ds)
    elif p.suffix == ".csv":
        with p.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif p.suffix == ".jsonl":
        from kdforge.eval.lm import _read_jsonl

        rows = list(_read_jsonl(p))
    else:
        raise DataError(f"cannot read labelled data from {p}", "use a .jsonl, .csv or a save_to_disk folder")
    if not rows:
        raise DataError(f"no rows in {p}", "pass a non-empty labelled dataset")
    missing = [f for f in (text_field, label_field) if f not in rows[0]]
    if missing:
        raise DataError(f"{p} has no field(s) {missing} (fields: {list(rows[0])})",
                        "pass --text-field / --label-field")
    return [str(r[text_field]) for r in rows], [r[label_field] for r in rows]


def _label_ids(labels: list[Any], config: Any) -> tuple[Any, list[str]]:
    """Integer label tensor and class names (from the model's label2id when labels are names)."""
    import torch

    from kdforge.errors import DataError

    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i, str(i)) for i in range(int(config.num_labels))]
    ids = []
    for y in labels:
        if isinstance(y, int) or (isinstance(y, str) and y.strip().lstrip("-").isdigit()):
            ids.append(int(y))
        elif str(y) in names:
            ids.append(names.index(str(y)))
        else:
            raise DataError(f"label {y!r} is not a class of the model ({names})",
                            "use integer labels or the model's id2label names")
    if any(not 0 <= i < len(names) for i in ids):
        raise DataError(f"labels outside 0..{len(names) - 1}", "check --label-field and the model's num_labels")
    return torch.tensor(ids, dtype=torch.long), names


def _classify(args: argparse.Namespace, specs: list[tuple[str, str, str]], device, dtype) -> dict[str, Any]:
    """Sequence classifiers: accuracy, ECE, per-class accuracy, fidelity to the teacher, cost."""
    import datetime as _dt

    import torch

    from kdforge.errors import DataError
    from kdforge.eval.classification import classification_metrics
    from kdforge.eval.cost import cost_report
    from kdforge.eval.fidelity import fidelity
    from kdforge.models import load_sequence_classifier

    if len(args.data) != 1:
        raise DataError("--task classification takes one --data", "pass one labelled dataset")
    texts, raw_labels = _load_labelled(_split_spec(args.data[0], "data")[1], args.text_field or "text",
                                       args.label_field, args.split)
    texts, raw_labels = texts[: args.max_tokens or None], raw_labels[: args.max_tokens or None]
    tokenizer = _load_tokenizer(args.tokenizer or specs[0][2], args)
    logits: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    labels = names = None
    for role, name, path in specs:
        model = load_sequence_classifier(_source(path, args, device, dtype), what=role).to(device)
        if labels is None:
            labels, names = _label_ids(raw_labels, model.config)
        outs = []
        with torch.inference_mode():
            for i in range(0, len(texts), args.batch_size):
                enc = tokenizer(texts[i : i + args.batch_size], padding=True, truncation=True,
                                max_length=args.block_size, return_tensors="pt").to(device)
                outs.append(model(**enc).logits.float().cpu())
        logits[name] = torch.cat(outs)
        entry: dict[str, Any] = {"name": name, "role": role}
        if not args.no_cost:
            example = tokenizer(texts[:1], return_tensors="pt")
            cost = cost_report(model, dict(example), warmup=2, repeats=max(args.latency_repeats, 1))
            entry.update(params=cost["params"], size_mb=cost["size_mb"])
            entry["cost"] = {"latency_ms": cost["latency_ms_p50"], "params": float(cost["params"]),
                             "size_mb": cost["size_mb"], "samples_per_s": cost["throughput_per_s"]}
        entries.append(entry)
        del model
    teacher = next((n for r, n, _ in specs if r == "teacher"), None)
    for entry in entries:
        name = entry["name"]
        m = classification_metrics(logits[name], labels,
                                   teacher_logits=logits[teacher] if teacher and name != teacher else None)
        metrics = {k: float(v) for k, v in m.items() if isinstance(v, int | float)}
        if teacher and name != teacher:
            fid = fidelity(logits[name], logits[teacher])
            metrics.update({k: fid[k] for k in ("kl_from_teacher", "js_to_teacher")})
        metrics.update(entry.pop("cost", {}))
        entry["metrics"] = metrics
        entry["per_class_accuracy"] = m["per_class_accuracy"]
        entry["reliability"] = m["reliability"]
    if teacher and not args.no_cost:
        t = next(e for e in entries if e["name"] == teacher)["metrics"]
        for e in entries:
            if e["name"] != teacher:
                e["metrics"]["speedup_vs_teacher"] = t["latency_ms"] / e["metrics"]["latency_ms"]
                e["metrics"]["compression_vs_teacher"] = t["params"] / max(e["metrics"]["params"], 1.0)
    roles = ("teacher", "baseline", "student")
    entries.sort(key=lambda e: roles.index(e["role"]))
    return {
        "recipe": "eval", "task": "classification",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "primary_metric": "accuracy", "higher_is_better": True, "classes": names,
        "data": args.data[0], "n_samples": len(texts), "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "models": entries,
    }


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from kdforge.eval.report import fmt

    keys: set[str] = set()
    for m in results["models"]:
        keys |= set(m["metrics"])
    cols = fmt.ordered_metric_keys(keys, results.get("primary_metric")) + [
        k for k in fmt.COST_KEYS if k in keys]
    size = f"{results['n_tokens']} tokens" if "n_tokens" in results else f"{results.get('n_samples', 0)} samples"
    table = Table(title=f"kdforge eval ({size})")
    table.add_column("metric", style="bold")
    for m in results["models"]:
        table.add_column(f"{m['name']}\n({m['role']})", justify="right")
    for k in cols:
        arrow = "↓" if fmt.lower_is_better(k) else "↑"
        table.add_row(f"{fmt.label(k)} {arrow}", *[fmt.fmt_value(k, m["metrics"].get(k)) for m in results["models"]])
    Console(width=max(100, 24 + 22 * len(results["models"]))).print(table)
