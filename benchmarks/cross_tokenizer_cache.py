"""Cross-tokenizer KD from a teacher cache vs the live teacher, on the cross_tokenizer_kd setup.

SmolLM2-135M-Instruct teacher -> the recipe's BPE-4096 student tokenizer, Pride and Prejudice
excerpts of 500 characters cut to what 128 student tokens cover (the recipe's defaults):

* cost: ``token_offsets.bin`` bytes per teacher token over all ``--texts`` training texts
  (tokenization only, no teacher run);
* fidelity: on the first ``--batch`` texts, a cache (``--k``, ``--encoding``) is built and the ULD
  and GOLD losses of the recipe's freshly initialised student (seed 0) are computed against the
  live and the cached aligned signals, with the teacher's top-k mass at the compared positions.

    PYTHONPATH=src python benchmarks/cross_tokenizer_cache.py --k 64 --batch 8
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch


def main() -> None:
    from kdforge.losses.uld import gold, uld
    from kdforge.recipes.cross_tokenizer import StudentSpec, build_student, cut_texts, train_bpe
    from kdforge.recipes.llm_kd import TeacherSpec, load_documents, load_teacher
    from kdforge.teachers import (
        CachedCrossTokenizerCollator,
        CachedCrossTokenizerTeacher,
        CrossTokenizerCacheDataset,
        CrossTokenizerTeacher,
        build_cross_tokenizer_cache,
        encode_texts,
    )
    from kdforge.teachers.cache.crosstok import teacher_tokenize
    from kdforge.teachers.cache.offsets import encode_offsets
    from kdforge.teachers.crosstok import encode_student
    from kdforge.train import CausalLMTask

    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--encoding", default="compact-u8-zstd")
    ap.add_argument("--texts", type=int, default=480)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    docs = load_documents("austen")
    texts = cut_texts(docs["prideprejudice"], 500, args.texts)[: args.texts]
    student_tok = train_bpe([docs["prideprejudice"]], 4096)
    covered = encode_student(texts, student_tok, max_length=128)[1]
    teacher, teacher_tok = load_teacher(TeacherSpec(model="smollm2"))
    _, offsets, lengths = teacher_tokenize(covered, teacher_tok)
    blob = encode_offsets(offsets, lengths)
    real = int(lengths.sum())
    print(f"offsets: {len(covered)} texts, {real} teacher tokens, {len(blob)} B = {len(blob) / real:.3f} B/token "
          "(int32 start/end pairs: 8 B/token)")

    part = covered[: args.batch]
    with tempfile.TemporaryDirectory() as tmp:
        build_cross_tokenizer_cache(teacher, teacher_tok, part, tmp, k=args.k, encoding=args.encoding,
                                    batch_size=args.batch)
        ds = CrossTokenizerCacheDataset(tmp, part, teacher_tokenizer=teacher_tok)
        stats = ds.cache.manifest["stats"]
        n_real = int(sum(ds.cache.token_offsets(i)[1] for i in range(len(ds))))
        cache_bpt = stats["total_bytes"] / n_real + len(encode_offsets(*_rows(ds))) / n_real
        cached_batch = CachedCrossTokenizerCollator(student_tok, max_length=128)([ds[i] for i in range(len(ds))])
        cached = CachedCrossTokenizerTeacher(teacher_tok, student_tok, vocab_size=ds.vocab_size)
        c_sig = cached.signal(cached_batch, CausalLMTask()).cross
    live_batch = encode_texts(part, student_tok, teacher_tok, max_length=128)
    live = CrossTokenizerTeacher(teacher, teacher_tok, student_tok)
    l_sig = live.signal(live_batch, CausalLMTask()).cross
    assert torch.equal(c_sig.mask, l_sig.mask)
    student = build_student(StudentSpec(), len(student_tok), seed=0)
    with torch.no_grad():
        z = student(input_ids=live_batch["input_ids"], attention_mask=live_batch["attention_mask"]).logits[:, :-1]
    m = l_sig.mask
    mass = torch.log_softmax(l_sig.logits[m].float(), -1).exp().topk(args.k, -1).values.sum(-1)
    print(f"cache k={args.k} {args.encoding}: {cache_bpt:.1f} B per teacher token incl. offsets; "
          f"{int(m.sum())} compared positions, teacher top-{args.k} mass there {mass.mean():.3f} "
          f"(min {mass.min():.3f})")
    print("| loss (untrained student, seed 0) | live teacher | cache | rel. diff |")
    print("|---|---|---|---|")
    for name, fn in (("ULD", uld), ("GOLD hybrid", gold)):
        a, b = float(fn(z, l_sig)), float(fn(z, c_sig))
        print(f"| {name} | {a:.4f} | {b:.4f} | {abs(b - a) / abs(a):.2%} |")


def _rows(ds):  # (offsets, lengths) of the cache's rows, to size its token_offsets.bin
    pairs = [ds.cache.token_offsets(i) for i in range(len(ds))]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


if __name__ == "__main__":
    main()
