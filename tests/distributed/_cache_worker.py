"""Teacher-cache builder run by ``test_cache_parallel.py`` as 1 process or under ``accelerate launch``.

Usage::

    python tests/distributed/_cache_worker.py --out CACHE_DIR --log LOG_DIR [--die-after-first]
    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        tests/distributed/_cache_worker.py --out CACHE_DIR --log LOG_DIR [--die-after-first]

Builds a data-parallel top-k cache (``build_teacher_cache(..., data_parallel=True)``) of a tiny
Llama teacher (fixed seed, built from a config) over fixed token sequences, and appends every
shard index this process computed to ``LOG_DIR/computed-rank<R>-pid<PID>.txt``.
``--die-after-first``: every rank commits its first shard, waits for the others, and exits with
status 3 (all ranks of a launch dying at once, after some shards but before the manifest merge).

:func:`make_cli_setup` writes a teacher folder (model + tokenizer), a text corpus and a
``kdforge cache-teacher`` config for the CLI test.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

NUM_SEQ, SEQ_LEN, SHARD, BATCH, VOCAB = 26, 16, 4, 2, 256  # 7 shards, the last one holds 2 rows


def tiny_llama(vocab: int = VOCAB, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread the logits: realistic top-k mass
        model.lm_head.weight.mul_(30.0)
    return model.eval()


def sequences() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (NUM_SEQ, SEQ_LEN), generator=g)


def make_cli_setup(root: Path, shard_size: int = 3) -> Path:
    """Teacher folder (tiny Llama + a BPE tokenizer trained here), corpus, config; returns the config."""
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife. Emma Woodhouse, handsome, clever, and rich, with a comfortable home.")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([text] * 10, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"],
                                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    teacher_dir = root / "teacher"
    tiny_llama(len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"{text} Chapter {i}." for i in range(40)))
    config = {
        "teacher": {"name_or_path": str(teacher_dir), "dtype": "float32", "device": "cpu"},
        "corpus": {"path": str(corpus), "seq_len": 16, "max_sequences": 20},
        "output_dir": str(root / "cache"),
        "k": 8,
        "encoding": "compact-u8-zstd",
        "batch_size": 2,
        "shard_size": shard_size,
    }
    path = root / "cache.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--die-after-first", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from kdforge.teachers import build_teacher_cache

    rank = int(os.environ.get("RANK", "0"))
    log = Path(args.log)
    log.mkdir(parents=True, exist_ok=True)
    record = log / f"computed-rank{rank}-pid{os.getpid()}.txt"

    def on_shard(index: int, entry: dict) -> None:
        with record.open("a") as fh:
            fh.write(f"{index}\n")
        if args.die_after_first:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()  # every rank has committed its first shard
            os._exit(3)

    build_teacher_cache(tiny_llama(), sequences(), args.out, k=8, batch_size=BATCH, shard_size=SHARD,
                        encoding="compact-u8-zstd", data_parallel=True, on_shard=on_shard)
    return 0


if __name__ == "__main__":
    from _teardown import (
        exit_without_native_teardown,  # the launched script's folder is on sys.path
    )

    exit_without_native_teardown(main())
