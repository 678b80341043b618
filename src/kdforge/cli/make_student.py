"""``kdforge make-student TEACHER OUT``: save a shallower student built from a teacher."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-student",
        help="copy a subset of a teacher's layers into a new, loadable student model",
        description="Copies embeddings, final norm, LM head and the chosen decoder layers of a "
        "Hugging Face causal LM into a shallower model saved with save_pretrained (loadable "
        "without kdforge). TEACHER is read like `kdforge run`'s teacher.model: an offline asset "
        "name (`smollm2`: SmolLM2-135M-Instruct), a local folder or a Hub id.",
    )
    p.add_argument("teacher", help="teacher: asset name (smollm2), folder, or Hub id")
    p.add_argument("output", help="folder to write the student to")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a Hub id")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the teacher's own code from its Hub repo/folder (only for models you trust)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--num-layers", type=int, help="keep N layers spread uniformly (first and last kept)")
    group.add_argument("--layers", help="explicit comma-separated teacher layer indices, e.g. 0,6,12,29")
    group.add_argument("--first-last", action="store_true", help="keep only the first and last layers")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from kdforge.errors import AssetError, ConfigError
    from kdforge.models import ModelSource, load_causal_lm, load_tokenizer
    from kdforge.students.from_teacher import count_parameters, student_from_teacher

    # kdforge.models: the names, Hub handling and errors of `kdforge run`'s teacher section; the
    # cut happens on the CPU (the student is saved, not trained, here)
    source = ModelSource(model=args.teacher, device="cpu", dtype="auto", revision=args.revision,
                         trust_remote_code=args.trust_remote_code)
    teacher = load_causal_lm(source, what="teacher")
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
        load_tokenizer(source, what="teacher").save_pretrained(args.output)
    except AssetError as exc:  # a bare model folder: the student is still usable with the teacher's tokenizer
        log.warning("teacher tokenizer not copied (%s); load it from %s", exc, args.teacher)
    print(
        f"student with layers {student.config.kdforge_source_layers} of "
        f"{teacher.config.num_hidden_layers}, {count_parameters(student) / 1e6:.1f}M params, "
        f"saved to {args.output}"
    )
    return 0
