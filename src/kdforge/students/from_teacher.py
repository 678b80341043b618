"""Students built from the teacher: layer subsets (copied weights) and narrower fresh configs.

When no smaller pretrained model shares the teacher's tokenizer (SmolLM2-135M is the smallest
of its family), the best-initialised student is the teacher itself with most decoder layers
removed — the initialisation of DistilBERT (Sanh et al., 2019: "taking one layer out of two"),
of TinyBERT-style layer-mapped students and of Sheared-LLaMA-style pruning baselines.
:func:`student_from_teacher` copies

* the token embeddings (and position embeddings, for GPT-2),
* the final norm and the LM head,
* a chosen subset of decoder layers, renumbered ``0..n-1``,

into a new model of the same class whose config says ``num_hidden_layers = n`` (per-layer
config lists such as ``layer_types`` are subset the same way). The result is an ordinary
``transformers`` model: ``save_pretrained`` writes a folder that plain
``AutoModelForCausalLM.from_pretrained`` loads, without kdforge.

Layer choice (:func:`select_layers`):

* ``"every_k"`` with ``num_layers=n``: ``round(linspace(0, L-1, n))``, uniform and always keeping
  the first and last layer (for L=30, n=6: 0, 6, 12, 17, 23, 29);
* ``"first_last"``: layers ``0`` and ``L-1``;
* an explicit list of indices, e.g. ``[0, 1, 28, 29]``.

:func:`narrow_student` instead derives a *fresh* (randomly initialised) narrower config:
smaller ``hidden_size``/``intermediate_size``/heads/layers, same vocabulary and architecture.

Supported layouts: Llama/Qwen2/Mistral/Gemma-style ``model.layers`` and GPT-2-style
``transformer.h`` (plus ``gpt_neox.layers`` and ``model.decoder.layers``).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError
from kdforge.eval.cost import count_parameters  # re-exported: tied weights counted once

log = logging.getLogger(__name__)

#: attribute paths of the decoder layer list, tried in order
LAYER_PATHS: tuple[str, ...] = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")

LayerSpec = str | Sequence[int]


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, module_list)`` of the decoder layers of a causal LM.

    Raises:
        ConfigError: none of :data:`LAYER_PATHS` exists on the model.
    """
    for path in LAYER_PATHS:
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return path, node
    raise ConfigError(
        f"cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(LAYER_PATHS)})",
        "use a Llama/Qwen2/Mistral/GPT-2-style causal LM, or build the student with narrow_student()",
    )


def select_layers(total: int, layers: LayerSpec = "every_k", num_layers: int | None = None) -> list[int]:
    """Indices of the teacher layers a student keeps (sorted, unique).

    Args:
        total: number of teacher layers ``L``.
        layers: ``"every_k"`` (needs ``num_layers``), ``"first_last"``, or explicit indices
            (negative indices count from the end).
        num_layers: student depth for ``"every_k"``.

    Raises:
        ConfigError: an unknown strategy, a bad ``num_layers``, or out-of-range/duplicate indices.
    """
    if isinstance(layers, str):
        if layers == "first_last":
            return [0] if total == 1 else [0, total - 1]
        if layers == "every_k":
            if num_layers is None or not 1 <= num_layers <= total:
                raise ConfigError(
                    f"layers='every_k' needs 1 <= num_layers <= {total}, got {num_layers}",
                    f"set num_layers, e.g. num_layers={max(1, total // 5)}",
                )
            if num_layers == 1:
                return [0]
            step = (total - 1) / (num_layers - 1)
            return [int(round(i * step)) for i in range(num_layers)]
        raise ConfigError(
            f"unknown layer selection {layers!r}",
            "use 'every_k' (with num_layers), 'first_last', or a list of layer indices",
        )
    picked = [int(i) + total if int(i) < 0 else int(i) for i in layers]
    if not picked:
        raise ConfigError("the explicit layer list is empty", "keep at least one layer, e.g. [0]")
    bad = [i for i in picked if not 0 <= i < total]
    if bad:
        raise ConfigError(f"layer indices {bad} are out of range for a {total}-layer teacher",
                          f"use indices in 0..{total - 1}")
    if len(set(picked)) != len(picked):
        raise ConfigError(f"duplicate layer indices in {list(layers)}", "list each layer once")
    if num_layers is not None and num_layers != len(picked):
        raise ConfigError(
            f"num_layers={num_layers} disagrees with the {len(picked)} explicit layers",
            "drop num_layers when listing layers explicitly",
        )
    return sorted(picked)


def _subset_config(config: Any, keep: list[int], total: int) -> Any:
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(keep)  # attribute_map turns this into n_layer for GPT-2
    for key, value in list(vars(new).items()):
        if key.startswith("_") or key in ("architectures", "id2label", "label2id"):
            continue
        if isinstance(value, list | tuple) and len(value) == total and total > 1:
            setattr(new, key, type(value)(value[i] for i in keep))
    # Qwen2-style: sliding window applies from layer `max_window_layers` on; re-index it
    if isinstance(getattr(new, "max_window_layers", None), int):
        new.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
    return new


def student_from_teacher(
    teacher: nn.Module,
    layers: LayerSpec = "every_k",
    *,
    num_layers: int | None = None,
    freeze_embeddings: bool = False,
    freeze_head: bool = False,
) -> nn.Module:
    """A shallower copy of ``teacher``: embeddings, final norm, LM head and chosen layers.

    Args:
        teacher: a ``transformers`` causal LM (``PreTrainedModel``); left unchanged.
        layers: see :func:`select_layers`.
        num_layers: student depth for ``layers="every_k"``.
        freeze_embeddings: set ``requires_grad=False`` on the input embeddings (and position
            embeddings). With tied embeddings this freezes the LM head too.
        freeze_head: set ``requires_grad=False`` on the output embeddings (LM head).

    Returns:
        A new model of ``type(teacher)`` with ``config.num_hidden_layers = len(keep)`` on the
        teacher's device and dtype; ``student.config.kdforge_source_layers`` records which
        teacher layers were kept.
    """
    path, teacher_layers = find_layers(teacher)
    total = len(teacher_layers)
    keep = select_layers(total, layers, num_layers)
    config = _subset_config(teacher.config, keep, total)
    config.kdforge_source_layers = keep
    param = next(teacher.parameters())
    student = type(teacher)(config).to(device=param.device, dtype=param.dtype)

    remap = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    state: dict[str, torch.Tensor] = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in remap:
            state[f"{path}.{remap[int(match.group(1))]}.{match.group(2)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    # tied heads are absent from the teacher's state dict on some versions; anything else is a bug
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(
            f"copying {type(teacher).__name__} weights into the student failed "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})",
            "this architecture is not supported by student_from_teacher; use narrow_student()",
        )
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    student.generation_config = copy.deepcopy(getattr(teacher, "generation_config", None))

    if freeze_embeddings:
        for module in _embedding_modules(student):
            module.requires_grad_(False)
    if freeze_head:
        head = student.get_output_embeddings()
        if head is not None:
            head.requires_grad_(False)
    log.info(
        "student from %s: kept layers %s of %d, %.1fM params (%.1fM trainable)",
        type(teacher).__name__, keep, total, count_parameters(student) / 1e6,
        count_parameters(student, trainable_only=True) / 1e6,
    )
    return student


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    modules = [model.get_input_embeddings()]
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)  # GPT-2 positions
    if wpe is not None:
        modules.append(wpe)
    return modules


def narrow_student(
    teacher_config: Any,
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
) -> Any:
    """A fresh, narrower config of the teacher's architecture (same vocabulary and tokenizer).

    Unset sizes follow the teacher: heads keep the teacher's head dimension
    (``heads = hidden_size // head_dim``), the MLP keeps its width ratio, key/value heads keep
    the grouped-query ratio. Build the model with ``AutoModelForCausalLM.from_config(cfg)``.

    Raises:
        ConfigError: sizes that do not divide (hidden by heads, heads by kv heads).
    """
    cfg = copy.deepcopy(teacher_config)
    t_hidden = int(cfg.hidden_size)
    t_heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or t_hidden // t_heads)
    hidden = int(hidden_size or t_hidden)
    heads = int(num_attention_heads or max(1, hidden // head_dim))
    if hidden % heads:
        raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}",
                          "choose sizes such that hidden_size % num_attention_heads == 0")
    cfg.hidden_size = hidden
    cfg.num_attention_heads = heads
    if getattr(cfg, "head_dim", None) is not None:
        cfg.head_dim = hidden // heads
    if hasattr(cfg, "num_key_value_heads"):
        t_kv = int(cfg.num_key_value_heads or t_heads)
        kv = int(num_key_value_heads or max(1, heads * t_kv // t_heads))
        while heads % kv:  # keep the GQA ratio as close as possible while dividing evenly
            kv -= 1
        if num_key_value_heads is not None and kv != num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={heads} is not divisible by num_key_value_heads={num_key_value_heads}",
                "pick a divisor of the number of heads",
            )
        cfg.num_key_value_heads = kv
    if hasattr(cfg, "intermediate_size") and cfg.intermediate_size:
        cfg.intermediate_size = int(intermediate_size or round(cfg.intermediate_size * hidden / t_hidden))
    elif hasattr(cfg, "n_inner"):  # GPT-2
        cfg.n_inner = intermediate_size or (None if cfg.n_inner is None else round(cfg.n_inner * hidden / t_hidden))
    if num_layers is not None:
        total = int(cfg.num_hidden_layers)
        cfg = _subset_config(cfg, select_layers(total, "every_k", num_layers), total)
    return cfg
