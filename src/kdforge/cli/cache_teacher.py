"""``kdforge cache-teacher CONFIG.yaml``: run a teacher once over a corpus, store its top-k."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-teacher",
        help="build an offline top-k teacher cache (resumable; see docs/teacher-cache.md)",
        description="Run the teacher once over a tokenised corpus and store its top-k "
        "distribution per position. Rerun the same command to resume an interrupted build. "
        "Under `accelerate launch` with N processes each process writes 1/N of the shards "
        "(same bytes as one process).",
    )
    p.add_argument("config", help="YAML config (teacher, data, output_dir, k, encoding...; docs/data.md, "
                   "docs/teacher-cache.md), or a cache folder with --inspect")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted path, YAML value), e.g. --set k=32",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    p.add_argument(
        "--tail-samples", type=int, default=None, metavar="M",
        help="also store M draws per position from the teacher's distribution outside the top-k (an unbiased "
        "estimate of the full distribution; forward KL only); same as --set tail_samples=M",
    )
    p.add_argument("--list-encodings", action="store_true", help="list the encodings and exit")
    p.add_argument(
        "--inspect", action="store_true",
        help="treat the argument as a cache folder: verify every shard's checksum and print its manifest summary",
    )
    p.set_defaults(func=handle)


def _apply(data: dict, key: str, value: object) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            from kdforge.errors import ConfigError

            raise ConfigError(f"--set {key}: {part} is not a mapping", "check the dotted path")
    node[parts[-1]] = value


def handle(args: argparse.Namespace) -> int:
    from kdforge.cli.run import parse_overrides
    from kdforge.config import read_yaml, validate
    from kdforge.teachers.cache import ENCODINGS, open_teacher_cache
    from kdforge.teachers.cache.config import CacheTeacherConfig, run_cache_teacher

    if args.list_encodings:
        for entry in ENCODINGS.entries():
            print(f"{entry.name:18s} {entry.description}")
        return 0
    if args.inspect:
        return _inspect(args.config)
    data = read_yaml(args.config)
    for key, value in parse_overrides(args.set).items():
        _apply(data, key, value)
    if args.overwrite:
        data["overwrite"] = True
    if args.tail_samples is not None:
        data["tail_samples"] = args.tail_samples
    config = validate(CacheTeacherConfig, data, source=args.config)
    out = run_cache_teacher(config)
    if os.environ.get("RANK", "0") != "0":  # data-parallel launch: rank 0 reports
        return 0
    stats = open_teacher_cache(out, verify=False).manifest["stats"]
    samples = f" + {config.tail_samples} tail draws" if config.tail_samples else ""
    masked = (f" ({stats['bytes_per_loss_token']:.1f} per trained position)"
              if "bytes_per_loss_token" in stats else "")
    print(
        f"teacher cache ready at {out}: {stats['bytes_per_token']:.1f} bytes/token{masked}, "
        f"top-{config.k} mass mean {stats['topk_mass_mean']:.3f}{samples}"
    )
    return 0


def _inspect(cache_dir: str) -> int:
    from kdforge.teachers.cache import open_teacher_cache

    cache = open_teacher_cache(cache_dir, verify=True)  # raises CacheError naming a bad shard
    m = cache.manifest
    tok = m.get("tokenizer") or {}
    stats = m.get("stats", {})
    print(f"teacher cache {cache_dir}: OK ({len(m['shards'])} shards verified)")
    print(f"  teacher     {m['teacher']['id']} ({m['teacher'].get('dtype', '?')}, weights {m['teacher']['weights_sha256'][:16]})")
    print(f"  tokenizer   {tok.get('fingerprint', 'not recorded')[:16]} (size {tok.get('size', '?')})")
    print(f"  corpus      {m['dataset']['num_sequences']} x {m['dataset']['seq_len']} = {m['dataset']['num_tokens']} tokens "
          f"(fingerprint {m['dataset']['fingerprint'][:16]})")
    samples = m.get("tail_samples", 0)
    drawn = f" + {samples} tail draws per position (seed {m.get('sample_seed', 0)})" if samples else ""
    print(f"  signal      top-{m['k']} of {m['vocab_size']}{drawn}, encoding {m['encoding']['name']}")
    if "loss_tokens" in m["dataset"]:
        print(f"  loss mask   {m['dataset']['loss_tokens']} of {m['dataset']['num_tokens']} positions trained "
              "(response-only data; the signal elsewhere is blank)")
    print(f"  size        {stats.get('total_bytes', 0) / 1e6:.2f} MB, {stats.get('bytes_per_token', float('nan')):.1f} bytes/token")
    print(f"  top-k mass  mean {stats.get('topk_mass_mean', float('nan')):.3f}, min {stats.get('topk_mass_min', float('nan')):.3f}")
    return 0
