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
        help="evaluate student/teacher/baseline LMs: perplexity, fidelity, calibration, cost",
        description="Evaluate causal LMs on held-out data: perplexity, next-token accuracy and "
        "ECE, fidelity to the teacher (top-1 agreement, KL both ways, JS), optional QA (exact "
        "match, ROUGE-L, answer calibration), parameters, size and latency.",
    )
    p.add_argument("--student", action="append", default=[], metavar="[NAME=]PATH",
                   help="student model folder or Hub id (repeatable)")
    p.add_argument("--teacher", default=None, metavar="[NAME=]PATH", help="teacher model")
    p.add_argument("--baseline", action="append", default=[], metavar="[NAME=]PATH",
                   help="baseline model, e.g. the same student trained on labels only (repeatable)")
    p.add_argument("--data", required=True, action="append", metavar="[DOMAIN=]PATH",
                   help=".txt / .jsonl (field --text-field) / HF dataset folder, or token ids "
                   "(.npy, .pt, .jsonl with input_ids); repeat for several domains (each gets "
                   "its own perplexity/agreement breakdown; --max-tokens applies per domain)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", default=None, help="split of a DatasetDict folder (default test/validation)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: teacher's, else first student's)")
    p.add_argument("--qa", default=None, help=".jsonl of {prompt, answer} and/or {prompt, choices, gold}")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=20_000, help="evaluate at most this many tokens")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length for --qa")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32), float32, bfloat16, float16")
    p.add_argument("--no-cost", action="store_true", help="skip parameter/size/latency measurement")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("-o", "--out", default=None, help="output folder for results.json/results.md")
    p.set_defaults(func=handle)


def _split_spec(spec: str, default_name: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare PATH is named after its last component."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name.strip(), path.strip()
    return (Path(spec).stem or default_name), spec


def _resolve_device(device: str):
    import torch

    from kdforge.errors import DeviceError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} but CUDA is not available", "use --device cpu (or auto)")
    return dev


def _resolve_dtype(dtype: str, device):
    import torch

    from kdforge.teachers.online import resolve_dtype

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return resolve_dtype(dtype)


def load_causal_lm(path: str, *, device, dtype) -> Any:
    """A causal LM from a folder, a Hub id, or a ``.gguf`` file, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    from kdforge.errors import AssetError

    p = Path(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    source = str(path)
    if p.suffix == ".gguf":
        source, kwargs["gguf_file"] = str(p.parent), p.name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise AssetError(
            f"cannot load model {path!r}: {str(exc).splitlines()[0]}",
            "pass a folder with config.json and weights (save_pretrained), a .gguf file, or a Hub "
            "id with network access",
        ) from None
    return model.to(device).eval()


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    from kdforge.errors import AssetError

    p = Path(path)
    kwargs: dict[str, Any] = {}
    source = path
    if p.suffix == ".gguf":
        source, kwargs["gguf_file"] = str(p.parent), p.name
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise AssetError(
            f"cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0]}",
            "pass --tokenizer with a folder holding tokenizer files",
        ) from None


def _is_token_file(path: Path) -> bool:
    if path.suffix in _TOKEN_FILES:
        return True
    if path.suffix == ".jsonl" and path.is_file():
        with path.open(encoding="utf-8") as fh:
            first = fh.readline()
        return '"input_ids"' in first
    return False


def handle(args: argparse.Namespace) -> int:
    from kdforge.errors import ConfigError
    from kdforge.eval import lm
    from kdforge.io import write_json_atomic, write_text_atomic

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

    data = [_split_spec(d, f"data{i}") for i, d in enumerate(args.data)]
    tok_source = args.tokenizer or (specs[0][2] if args.teacher else specs[-len(args.student)][2])
    tokenizer = None
    if not all(_is_token_file(Path(path)) for _, path in data) or args.qa:
        tokenizer = _load_tokenizer(tok_source)
    batches: list[dict[str, Any]] = []
    for domain, path in data:
        tag = domain if len(data) > 1 else None
        if _is_token_file(Path(path)):
            blocks = lm.load_token_blocks(path, block_size=args.block_size)
            if args.max_tokens:
                blocks = blocks[: max(args.max_tokens // blocks.shape[1], 1)]
            batches += lm.batches_from_blocks(blocks, batch_size=args.batch_size, domain=tag)
        else:
            texts = lm.load_texts(path, text_field=args.text_field, split=args.split)
            batches += lm.block_batches(tokenizer, texts, block_size=args.block_size,
                                        batch_size=args.batch_size, max_tokens=args.max_tokens,
                                        domain=tag)
    qa_rows = lm.load_qa_rows(args.qa) if args.qa else None

    models = {}
    for role, name, path in specs:
        log.info("loading %s %s from %s", role, name, path)
        models[name] = (role, load_causal_lm(path, device=device, dtype=dtype))
    results = lm.evaluate_lm_suite(
        models, batches, tokenizer=tokenizer, qa_rows=qa_rows, measure_cost=not args.no_cost,
        latency_repeats=args.latency_repeats, max_new_tokens=args.max_new_tokens,
        data_description=", ".join(path for _, path in data),
    )
    results["device"] = str(device)
    results["dtype"] = str(dtype).replace("torch.", "")
    _print_table(results)
    if args.out:
        out = Path(args.out)
        write_json_atomic(out / "results.json", results)
        write_text_atomic(out / "results.md", lm.results_markdown(results))
        print(f"results: {out / 'results.json'}")
    return 0


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from kdforge.eval.report import fmt

    keys: set[str] = set()
    for m in results["models"]:
        keys |= set(m["metrics"])
    cols = fmt.ordered_metric_keys(keys, results.get("primary_metric")) + [
        k for k in fmt.COST_KEYS if k in keys]
    table = Table(title=f"kdforge eval ({results.get('n_tokens', 0)} tokens)")
    table.add_column("metric", style="bold")
    for m in results["models"]:
        table.add_column(f"{m['name']}\n({m['role']})", justify="right")
    for k in cols:
        arrow = "↓" if fmt.lower_is_better(k) else "↑"
        table.add_row(f"{fmt.label(k)} {arrow}", *[fmt.fmt_value(k, m["metrics"].get(k)) for m in results["models"]])
    Console(width=max(100, 24 + 22 * len(results["models"]))).print(table)
