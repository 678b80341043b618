"""``kdforge sft``: sequence-level KD, fine-tune a student on teacher generations."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="fine-tune a student on teacher generations (sequence-level KD)")
    p.add_argument("data", help="a `kdforge generate` output folder, curated.jsonl, or JSONL of {prompt, text}")
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
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from kdforge.elicit.sft import run_sft

    length = {"max_steps": args.max_steps} if args.max_steps else {"epochs": args.epochs}
    summary = run_sft(args.data, args.student, args.output_dir, tokenizer=args.tokenizer,
                      max_length=args.max_length,
                weight_field=None if args.weight_field.lower() == "none" else args.weight_field,
                      train={**length, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                             "mixed_precision": args.mixed_precision, "progress": not args.no_progress})
    print(json.dumps(summary, indent=2))
    return 0
