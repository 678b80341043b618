"""``kdforge select --method miniplm``: refine a corpus with a teacher (docs/data-selection.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="select training documents with a teacher (MiniPLM difference sampling; resumable)",
        description="Score every document by log p_teacher - log p_reference (per-token averages, each model "
        "with its own tokenizer), keep the top fraction (or sample), and write the refined dataset "
        "(datasets.save_to_disk) plus the scores. Rerun the same command to resume an interrupted pass.",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML config (optional; flags override its keys)")
    p.add_argument("--method", choices=["miniplm"], default=None, help="selection method (default: miniplm)")
    p.add_argument("--teacher", help="teacher: asset name (smollm2), model folder, or Hub id")
    p.add_argument("--reference", help="reference model (small, same family or same data)")
    p.add_argument("--corpus", help=".jsonl, saved HF dataset, or .txt file/folder")
    p.add_argument("--text-field", default=None, help="text column (default: text)")
    p.add_argument("--max-documents", type=int, default=None, help="use only the first N documents")
    p.add_argument("--out", dest="output_dir", default=None, help="output folder")
    p.add_argument("--fraction", type=float, default=None, help="share of documents kept (default 0.5)")
    p.add_argument("--mode", choices=["top", "sample"], default=None, help="top (default) or sample")
    p.add_argument("--temperature", type=float, default=None, help="temperature of --mode sample")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="tokens per document, per model (default 512)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=None, help="documents per resumable chunk (default 256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted path, YAML value), e.g. --set teacher.dtype=bfloat16")
    p.add_argument("--overwrite", action="store_true", help="rescore a folder scored with other settings")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from kdforge.cli.cache_teacher import _apply
    from kdforge.cli.run import parse_overrides
    from kdforge.config import read_yaml, validate
    from kdforge.data.select.config import SelectConfig, run_select

    data: dict = read_yaml(args.config) if args.config else {}
    flat = {"method": args.method, "output_dir": args.output_dir, "fraction": args.fraction, "mode": args.mode,
            "temperature": args.temperature, "seed": args.seed, "max_length": args.max_length,
            "batch_size": args.batch_size, "chunk_size": args.chunk_size}
    data.update({k: v for k, v in flat.items() if v is not None})
    for role in ("teacher", "reference"):
        if getattr(args, role):
            data.setdefault(role, {})["name_or_path"] = getattr(args, role)
    for key, value in (("path", args.corpus), ("text_field", args.text_field), ("max_documents", args.max_documents)):
        if value is not None:
            data.setdefault("corpus", {})[key] = value
    for key, value in parse_overrides(args.set).items():
        _apply(data, key, value)
    if args.overwrite:
        data["overwrite"] = True
    config = validate(SelectConfig, data, source=args.config or "command line")
    result = run_select(config)
    print(f"kept {len(result.kept)} of {len(result.scores)} documents: {result.dataset_dir} "
          f"(scores: {result.out_dir / 'scores.jsonl'})")
    return 0
