"""Measure what a response-only loss mask costs or saves in a teacher cache (docs/teacher-cache.md).

Builds chat data from the packaged Austen preset (user: a paragraph of *Persuasion*; assistant: the
next one), renders it with SmolLM2-135M-Instruct's chat template, and caches the teacher's top-k
over the same token rows twice: without a mask (every position stored) and with the response-only
mask (positions whose next token is not an assistant token blanked). Prints bytes per stored
token and per trained position for each, padded (one row per chat) and packed.

    python tools/cache_mask_bytes.py --chats 48 --k 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chats", type=int, default=48)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--encoding", default="compact-u8-zstd")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.assets import ensure
    from kdforge.constants import IGNORE_INDEX
    from kdforge.data import load_documents, prepare_blocks
    from kdforge.data.sources import split_txt
    from kdforge.teachers.cache import build_teacher_cache, open_teacher_cache

    torch.manual_seed(0)
    model_dir = ensure("smollm2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    paras = split_txt(load_documents("austen")["persuasion"], unit="paragraph")
    paras = [p for p in paras if 20 <= len(p.split()) <= 60]
    tmp = Path(tempfile.mkdtemp())
    chats = tmp / "chats.jsonl"
    with open(chats, "w", encoding="utf-8") as fh:
        for i in range(args.chats):
            fh.write(json.dumps({"messages": [{"role": "user", "content": paras[2 * i]},
                                              {"role": "assistant", "content": paras[2 * i + 1]}]}) + "\n")
    rows = []
    for packing in (False, True):
        ids, labels = prepare_blocks({"path": str(chats), "block_size": args.block_size, "packing": packing}, tok)
        mask = labels != IGNORE_INDEX
        for name, loss_mask in (("every position", None), ("response-only mask", mask)):
            out = build_teacher_cache(model, ids, tmp / f"{packing}-{loss_mask is None}", k=args.k,
                                      encoding=args.encoding, teacher_id="smollm2", weights_hash="m",
                                      loss_mask=loss_mask, batch_size=8)
            m = open_teacher_cache(out).manifest
            total = m["stats"]["total_bytes"]
            trained = int(mask[:, 1:].sum())
            rows.append((("packed" if packing else "padded"), name, ids.numel(), trained, total,
                         total / ids.numel(), total / trained))
    print("| rows | stored | tokens | trained positions | bytes | B/token | B/trained position |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2f} | {r[6]:.2f} |")


if __name__ == "__main__":
    main()
