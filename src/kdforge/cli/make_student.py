"""``kdforge make-student TEACHER OUT``: save a shallower student built from a teacher."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-student",
        help="copy a subset of a teacher's layers into a new, loadable student model",
        description="Copies embeddings, final norm, LM head and the chosen decoder layers of a "
        "Hugging Face causal LM into a shallower model saved with save_pretrained (loadable "
        "without kdforge). TEACHER is a local folder or a Hub id; `smollm2` means the offline "
        "SmolLM2-135M-Instruct asset.",
    )
    p.add_argument("teacher", help="teacher folder, Hub id, or 'smollm2'")
    p.add_argument("output", help="folder to write the student to")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--num-layers", type=int, help="keep N layers spread uniformly (first and last kept)")
    group.add_argument("--layers", help="explicit comma-separated teacher layer indices, e.g. 0,6,12,29")
    group.add_argument("--first-last", action="store_true", help="keep only the first and last layers")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.errors import AssetError, ConfigError
    from kdforge.students.from_teacher import count_parameters, student_from_teacher

    source = args.teacher
    if source == "smollm2":
        from kdforge.assets import ensure

        source = str(ensure("smollm2"))
    try:
        teacher = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise AssetError(
            f"cannot load the teacher {source!r}: {str(exc).splitlines()[0]}",
            "check the folder holds config.json and weights"
            if Path(source).exists()
            else "check the path or Hub id (a Hub id needs the network: HF_HUB_OFFLINE=0), or use 'smollm2'",
        ) from None
    if args.layers:
        try:
            spec: object = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--layers {args.layers!r} is not a list of integers",
                              "write e.g. --layers 0,6,12,29") from None
        num = None
    elif args.first_last:
        spec, num = "first_last", None
    else:
        spec, num = "every_k", args.num_layers
    student = student_from_teacher(teacher, spec, num_layers=num)  # type: ignore[arg-type]
    student.save_pretrained(args.output)
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(args.output)
    except (OSError, ValueError) as exc:
        log.warning("teacher tokenizer not copied (%s); load it from %s", exc, source)
    print(
        f"student with layers {student.config.kdforge_source_layers} of "
        f"{teacher.config.num_hidden_layers}, {count_parameters(student) / 1e6:.1f}M params, "
        f"saved to {args.output}"
    )
    return 0
