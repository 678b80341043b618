"""The student of a causal-LM teacher, from YAML: cut from the teacher, built from a config, or pretrained.

Three kinds (:class:`StudentSpec` ``kind``):

* ``from_teacher`` (default): a shallower copy of the teacher (its embeddings, final norm, head and
  a subset of its layers: :func:`~kdforge.students.from_teacher.student_from_teacher`);
* ``from_config``: a fresh, randomly initialised model of the teacher's architecture with width and
  depth overrides (:func:`~kdforge.students.from_teacher.narrow_student`), seeded by ``init_seed``;
* ``pretrained``: any causal LM (offline asset, local folder or Hub id, loaded by
  :func:`kdforge.models.load_causal_lm`) whose vocabulary meets the teacher's under
  ``vocab_policy``: ``exact`` (same tokenizer, same logit width) or ``shared_prefix`` (the
  tokenizers agree on their shared ids, e.g. one adds chat tokens, or the embedding matrices are
  padded to different multiples; both sides keep the shared entries:
  :mod:`kdforge.teachers.vocab`).

Then, for every kind: frozen embeddings/head (``freeze_embeddings``, ``freeze_head``; default on
for ``from_teacher``, whose copied embeddings are already good, off otherwise), an optional LoRA
adapter (``lora:``, needs ``peft``: ``pip install 'kdforge[lora]'``; only the adapter trains, and
the saved student is the merged model, loadable without peft) and gradient checkpointing.

Example::

    student = build_student(StudentSpec(kind="pretrained", model="./my-small-llama"), teacher, tokenizer)
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from kdforge.config import StrictModel
from kdforge.errors import ConfigError, VocabMismatchError
from kdforge.models import (
    ModelSource,
    check_source,
    load_config,
    load_model,
    load_tokenizer,
    torch_dtype,
)

log = logging.getLogger(__name__)

StudentKind = Literal["from_teacher", "pretrained", "from_config"]
_LAYER_KEYS = {"layers"}
_CONFIG_KEYS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "init_seed"}
_PRETRAINED_KEYS = {"model", "revision", "trust_remote_code", "attn_implementation"}


class LoraSpec(StrictModel):
    """A LoRA adapter on the student (``peft``): only the low-rank matrices train (Hu et al., 2021).

    ``W x + (alpha / r) * B A x`` with ``A [r, d_in]``, ``B [d_out, r]`` (``B`` starts at zero, so the
    adapted student starts equal to the base).
    """

    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is (alpha / r) * B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]) or all-linear")


class StudentSpec(StrictModel):
    """The student (module doc of :mod:`kdforge.students.build`)."""

    kind: StudentKind = Field("from_teacher", description="from_teacher (cut the teacher's layers), "
                                                          "pretrained (any causal LM), from_config (fresh weights)")
    # from_teacher (and the depth of from_config)
    layers: Literal["every_k", "first_last"] | list[int] = Field(
        "every_k", description="from_teacher: which teacher layers to keep")
    num_layers: int | None = Field(6, ge=1, description="depth (from_teacher with layers=every_k; from_config: "
                                                        "null = the teacher's)")
    freeze_embeddings: bool | None = Field(None, description="freeze the input embeddings (default: true for "
                                                             "from_teacher, false otherwise)")
    freeze_head: bool | None = Field(None, description="freeze the LM head (default: true for from_teacher, "
                                                       "false otherwise)")
    # pretrained
    model: str | None = Field(None, description="pretrained: asset name, local folder or Hub id")
    revision: str | None = Field(None, description="pretrained: Hub revision")
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the student's parameter dtype while training")
    vocab_policy: Literal["exact", "shared_prefix"] = Field(
        "exact", description="how the student's vocabulary meets the teacher's (kdforge.teachers.vocab)")
    # from_config
    hidden_size: int | None = Field(None, ge=1, description="from_config: width (null = the teacher's)")
    intermediate_size: int | None = Field(None, ge=1, description="from_config: MLP width (null = scaled)")
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    init_seed: int = Field(0, description="from_config: seed of the random initialisation")
    # any kind
    lora: LoraSpec | None = Field(None, description="train a LoRA adapter instead of the full student (peft)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")

    @model_validator(mode="after")
    def _keys_match_kind(self) -> StudentSpec:
        given = set(self.model_fields_set)
        wrong = {"from_teacher": (given & (_CONFIG_KEYS | _PRETRAINED_KEYS)),
                 "from_config": (given & (_LAYER_KEYS | _PRETRAINED_KEYS)),
                 "pretrained": (given & (_LAYER_KEYS | _CONFIG_KEYS | {"num_layers"}))}[self.kind]
        if wrong:
            raise ValueError(f"{', '.join(sorted(wrong))} do(es) not apply to kind: {self.kind} "
                             f"(pretrained takes model/revision/...; from_config takes hidden_size/num_layers/...; "
                             f"from_teacher takes layers/num_layers); remove them or change kind")
        if self.kind == "pretrained" and not self.model:
            raise ValueError("kind: pretrained needs model: (an asset name, a local folder or a Hub id)")
        return self

    def frozen(self) -> tuple[bool, bool]:
        """``(freeze_embeddings, freeze_head)`` with the kind's defaults filled in."""
        default = self.kind == "from_teacher"
        emb = default if self.freeze_embeddings is None else self.freeze_embeddings
        head = default if self.freeze_head is None else self.freeze_head
        return emb, head

    def source(self) -> ModelSource:
        """The :class:`~kdforge.models.ModelSource` of a pretrained student (loaded on the CPU)."""
        return ModelSource(model=self.model or "", revision=self.revision, trust_remote_code=self.trust_remote_code,
                           dtype=self.dtype, device="cpu", attn_implementation=self.attn_implementation)

    def describe(self) -> str:
        """One line for logs and model cards."""
        if self.kind == "pretrained":
            text = f"pretrained {self.model}" + (f"@{self.revision}" if self.revision else "")
        elif self.kind == "from_config":
            text = (f"from the teacher's config (hidden_size={self.hidden_size or 'teacher'}, "
                    f"num_layers={self.num_layers or 'teacher'}), random init seed {self.init_seed}")
        else:
            text = f"cut from the teacher (layers={self.layers}, num_layers={self.num_layers})"
        return text + (f", LoRA r={self.lora.r}" if self.lora else "")


# --------------------------------------------------------------------------------------------- build
def build_student(spec: StudentSpec, teacher: torch.nn.Module, tokenizer: Any) -> torch.nn.Module:
    """The untrained student for ``teacher`` (on the CPU, in ``spec.dtype``, train-ready).

    Raises:
        VocabMismatchError: a pretrained student whose vocabulary does not align with the teacher's.
        ConfigError: LoRA without ``peft``; sizes that do not divide; an unsupported layout.
        AssetError / DeviceError: from loading a pretrained student (:mod:`kdforge.models`).
    """
    if spec.kind == "from_teacher":
        from kdforge.students.from_teacher import student_from_teacher

        emb, head = spec.frozen()
        student = student_from_teacher(teacher, spec.layers,
                                       num_layers=spec.num_layers if spec.layers == "every_k" else None,
                                       freeze_embeddings=emb, freeze_head=head)
    elif spec.kind == "from_config":
        student = _from_config(spec, teacher)
    else:
        student, student_tok = load_model(spec.source(), role="student", place=False)
        check_student_vocab(_width(teacher), tokenizer, _width(student), student_tok, spec.vocab_policy)
    dtype = torch_dtype(spec.dtype)
    param = next(student.parameters())
    if param.dtype != dtype or param.device.type != "cpu":
        student = student.to(device="cpu", dtype=dtype)
    if spec.kind != "from_teacher":  # student_from_teacher froze its copies (position embeddings too)
        freeze(student, *spec.frozen())
    if spec.gradient_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(student).__name__} does not support gradient checkpointing",
                              "set student.gradient_checkpointing: false")
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora is not None:
        student = add_lora(student, spec.lora)
    return student


def _from_config(spec: StudentSpec, teacher: torch.nn.Module) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from kdforge.students.from_teacher import narrow_student

    cfg = narrow_student(teacher.config, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                         intermediate_size=spec.intermediate_size, num_attention_heads=spec.num_attention_heads,
                         num_key_value_heads=spec.num_key_value_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    student.generation_config = copy.deepcopy(getattr(teacher, "generation_config", None))
    return student


def freeze(model: torch.nn.Module, embeddings: bool, head: bool) -> None:
    """``requires_grad_(False)`` on the input embeddings and/or the LM head (tied: both at once)."""
    if embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if head and model.get_output_embeddings() is not None:
        model.get_output_embeddings().requires_grad_(False)


def check_student(spec: StudentSpec, teacher: ModelSource, teacher_tokenizer: Any) -> None:
    """Every check of the student that needs no weights (run before anything is written).

    LoRA needs ``peft``; a pretrained student must exist (folder, asset, or a reachable/cached Hub
    id) and its tokenizer and logit width must meet the teacher's (:func:`check_student_vocab`,
    widths from the configs).

    Raises:
        ConfigError, AssetError, DeviceError, VocabMismatchError: naming the fix.
    """
    if spec.lora is not None:
        _peft()
    if spec.kind != "pretrained":
        return
    source = spec.source()
    check_source(source, what="student")
    student_tok = load_tokenizer(source, what="student")
    t_width = getattr(load_config(teacher, what="teacher"), "vocab_size", None)
    s_width = getattr(load_config(source, what="student"), "vocab_size", None)
    if t_width is None or s_width is None:  # unusual configs: the check runs on the loaded models
        return
    check_student_vocab(int(t_width), teacher_tokenizer, int(s_width), student_tok, spec.vocab_policy)


def _width(model: torch.nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_student_vocab(t_width: int, teacher_tokenizer: Any, s_width: int, student_tokenizer: Any,
                        policy: str) -> None:
    """Refuse a pretrained student whose token ids do not mean the teacher's.

    ``exact``: the tokenizers map every token to the same id and both logit widths are equal.
    ``shared_prefix``: the tokenizers agree on their shared ids and both models have a logit for
    every real token (:func:`kdforge.teachers.vocab.check_vocab`); the trainer keeps the shared
    entries.

    Raises:
        VocabMismatchError: naming the fix (a student of the teacher's family, ``shared_prefix``,
            or cross-tokenizer KD).
    """
    from kdforge.teachers.vocab import check_vocab, tokenizer_fingerprint

    same_tok = tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(student_tokenizer)
    if policy == "exact":
        if not same_tok:
            check_vocab(t_width, s_width, teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer,
                        cross_tokenizer_fix=CROSS_TOKENIZER_RECIPE_FIX)
            raise VocabMismatchError(
                "the student's tokenizer differs from the teacher's (it agrees on the shared ids but adds or "
                "lacks tokens), and student.vocab_policy is exact",
                "set student.vocab_policy: shared_prefix to distil over the shared ids, or use the teacher's "
                "tokenizer")
        if t_width != s_width:
            raise VocabMismatchError(
                f"teacher and student share a tokenizer but their logits have {t_width} and {s_width} entries "
                "(embedding matrices padded differently), and student.vocab_policy is exact",
                "set student.vocab_policy: shared_prefix (both sides keep the shared entries)")
        return
    check_vocab(t_width, s_width, teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer,
                cross_tokenizer_fix=CROSS_TOKENIZER_RECIPE_FIX)


#: the fix for a pretrained student whose token ids mean other tokens than the teacher's
CROSS_TOKENIZER_RECIPE_FIX = (
    "pick a student of the teacher's family (same tokenizer), or distil across tokenizers with the recipe "
    "cross_tokenizer_kd (ULD / GOLD losses over text-aligned positions: `kdforge init cross_tokenizer DIR`, "
    "docs/cross-tokenizer.md)")


def add_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Wrap ``model`` in a ``peft`` LoRA adapter (``task_type=CAUSAL_LM``); only the adapter trains.

    Raises:
        ConfigError: ``peft`` is not installed.
    """
    peft = _peft()
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules)
    peft_model = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %.2fM trainable parameters", spec.r, spec.target_modules, trainable / 1e6)
    return peft_model


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("student.lora needs the peft package, which is not installed",
                          "pip install 'kdforge[lora]' (or pip install peft), or remove student.lora") from None
    return peft


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (its adapter is merged before saving)."""
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain ``transformers`` model: a LoRA student merged into a copy of its base; others as they are."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


__all__ = ["LoraSpec", "StudentKind", "StudentSpec", "add_lora", "build_student", "check_student", "check_student_vocab",
           "freeze", "is_lora", "merged"]
