"""``kdforge sft``: sequence-level KD, fine-tune a student on teacher generations."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="fine-tune a student on teacher generations or chat / prompt-completion data "
                       "(sequence-level KD; loss on response tokens only)")
    p.add_argument("data", help="a `kdforge generate` output folder, curated.jsonl, JSONL of {prompt, text}, or "
                   "any data spec of the data layer (docs/data.md): chat messages, prompt/completion, a "
                   "preset, a save_to_disk folder, a Hub id, or a .yaml data spec")
    p.add_argument("--student", required=True, help="student model: local folder or Hub id")
    p.add_argument("--tokenizer", default=None, help="defaults to the student's")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--weight-field", default="weight",
                   help="per-sample weight field (curated.jsonl's 'weight' by default); the loss becomes the "
                        "weighted token mean; 'none' ignores weights")
    p.add_argument("--no-progress", action="store_true")
    from kdforge.data.options import add_data_options

    add_data_options(p)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from kdforge.data.options import spec_from_args
    from kdforge.elicit.sft import run_sft

    spec = spec_from_args(args.data, args, max_length=args.max_length)
    length = {"max_steps": args.max_steps} if args.max_steps else {"epochs": args.epochs}
    summary = run_sft(args.data, args.student, args.output_dir, tokenizer=args.tokenizer,
                      max_length=args.max_length, data_spec=spec,
                weight_field=None if args.weight_field.lower() == "none" else args.weight_field,
                      train={**length, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                             "mixed_precision": args.mixed_precision, "progress": not args.no_progress})
    print(json.dumps(summary, indent=2))
    return 0
