"""Taps: capture intermediate outputs of a model, and map student layers to teacher layers.

Two ways to read an intermediate tensor, chosen per request:

* **Model outputs** (preferred): Hugging Face models return every layer's hidden states with
  ``output_hidden_states=True`` and attention probabilities with ``output_attentions=True``. No
  code touches the model; the tensors are the ones the model's authors define. ``hidden_states``
  has ``L + 1`` entries: index 0 is the embedding output, index ``i`` the output of block ``i``
  (for most decoder LMs the last entry is after the final norm). Attention weights exist only
  with the ``eager`` attention implementation (SDPA/flash kernels never materialise them):
  :func:`use_eager_attention` switches a model.
* **Forward hooks** on named modules (torchdistill-style), for anything else: a projection's output
  (the value vectors ``...self_attn.v_proj`` of MiniLM), a conv block of a CNN. Hooks live only
  inside :class:`ModuleTaps` and are removed on exit, also when the forward raises.

Layer maps pair student layers with teacher layers (:func:`layer_map`): ``"uniform"`` (student
``i`` of ``L_s`` with teacher ``round(i * L_t / L_s)``), ``"last"``, ``"kept"`` (the teacher layers
a :func:`kdforge.students.student_from_teacher` student was copied from, recorded in its config as
``kdforge_source_layers``), or explicit indices.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn

from kdforge.errors import ConfigError, ShapeError

logger = logging.getLogger(__name__)

LayerSpec = Literal["auto", "uniform", "last", "kept"] | list[int] | dict[int, int]
Space = Literal["hidden_states", "blocks"]

__all__ = [
    "FeatureRequest",
    "Features",
    "ModuleTaps",
    "capture",
    "layer_map",
    "num_layers",
    "source_layers",
    "use_eager_attention",
    "value_modules",
]


@dataclass(frozen=True)
class FeatureRequest:
    """What to capture from one model in one forward pass.

    Attributes:
        hidden_states: ask the model for ``output_hidden_states``.
        attentions: ask the model for ``output_attentions`` (eager attention needed).
        modules: dotted module paths whose forward outputs are captured by hooks.
    """

    hidden_states: bool = False
    attentions: bool = False
    modules: tuple[str, ...] = ()

    def __or__(self, other: FeatureRequest) -> FeatureRequest:
        return FeatureRequest(self.hidden_states or other.hidden_states, self.attentions or other.attentions,
                              tuple(dict.fromkeys((*self.modules, *other.modules))))

    @property
    def empty(self) -> bool:
        return not (self.hidden_states or self.attentions or self.modules)


@dataclass
class Features:
    """Intermediate tensors of one forward pass.

    Attributes:
        hidden_states: ``L + 1`` tensors ``[B, T, H]`` (index 0 = embeddings) or None.
        attentions: ``L`` tensors ``[B, heads, T, T]`` or None.
        modules: module path -> its output tensor (the first tensor of a tuple output).
    """

    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    modules: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, source: str, ref: int | str) -> torch.Tensor:
        """The tensor ``ref`` (an index or a module path) of ``source`` (``hidden_states``,
        ``attentions`` or ``modules``)."""
        if source == "modules":
            return self.modules[str(ref)]
        items = self.hidden_states if source == "hidden_states" else self.attentions
        if items is None:
            raise ConfigError(f"{source} were not captured", "request them in the FeatureRequest")
        return items[int(ref)]


def _first_tensor(output: Any) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple | list):
        for item in output:
            if torch.is_tensor(item):
                return item
    if isinstance(output, Mapping):
        for item in output.values():
            if torch.is_tensor(item):
                return item
    return getattr(output, "last_hidden_state", None)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with a :class:`ConfigError` suggesting close paths."""
    root = _unwrap(model)
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else \
            f"module paths look like {names[min(len(names) - 1, 3)]!r}" if names else "the model has no submodules"
        raise ConfigError(f"{type(root).__name__} has no module {path!r}",
                          f"{hint} (list them with [n for n, _ in model.named_modules()])") from None


class ModuleTaps:
    """Context manager capturing the outputs of named modules with forward hooks.

    Example::

        with ModuleTaps(model, ["layer2", "layer3"]) as taps:
            model(x)
        taps.outputs["layer3"]      # the tensor layer3 returned

    The hooks are removed when the block exits, whatever happens inside it. A module that runs
    more than once in the block (weight sharing, generation) is an error: which call to use would
    be a guess.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], *, detach: bool = False) -> None:
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modules = {p: resolve_module(model, p) for p in self.paths}

    def _hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                raise ShapeError(f"module {path!r} returned {type(output).__name__}, with no tensor to capture",
                                 "tap a module that returns a tensor (e.g. a Linear, a block, a norm)")
            if path in self.outputs:
                raise ConfigError(f"module {path!r} ran more than once in one forward pass",
                                  "tap a module that runs once per forward (not a shared or looped one)")
            self.outputs[path] = tensor.detach() if self.detach else tensor

        return hook

    def __enter__(self) -> ModuleTaps:
        self.outputs = {}
        try:
            for path, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook(path)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


def capture(model: nn.Module | Any, request: FeatureRequest, *args: Any, **kwargs: Any) -> tuple[Any, Features]:
    """Run ``model(*args, **kwargs)`` and collect what ``request`` asks for.

    Hidden states / attentions are requested through the model's own ``output_hidden_states`` /
    ``output_attentions`` arguments; module outputs through temporary forward hooks.

    Returns:
        ``(model output, Features)``.

    Raises:
        ConfigError: the model does not return the requested hidden states or attentions (e.g.
            attentions under SDPA attention), or a module path does not exist.
    """
    call_kwargs = dict(kwargs)
    if request.hidden_states:
        call_kwargs["output_hidden_states"] = True
    if request.attentions:
        call_kwargs["output_attentions"] = True
    module = model if isinstance(model, nn.Module) else getattr(model, "model", model)
    with ModuleTaps(module, request.modules) as taps:
        try:
            output = model(*args, **call_kwargs)
        except TypeError as exc:
            if request.hidden_states or request.attentions:
                raise ConfigError(
                    f"{type(module).__name__} does not accept output_hidden_states/output_attentions ({exc})",
                    "use a Hugging Face model, or tap modules by path (student_modules / teacher_modules)",
                ) from None
            raise
    missing = [p for p in request.modules if p not in taps.outputs]
    if missing:
        raise ConfigError(f"modules {missing} did not run in the forward pass of {type(module).__name__}",
                          "tap modules on the path from the input to the output")
    feats = Features(modules=dict(taps.outputs))
    if request.hidden_states:
        hs = _field(output, "hidden_states")
        if not hs:
            raise ConfigError(f"{type(module).__name__} returned no hidden_states",
                              "use a model that supports output_hidden_states, or tap modules by path")
        feats.hidden_states = tuple(hs)
    if request.attentions:
        attn = _field(output, "attentions")
        if not attn or any(a is None for a in attn):
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
            raise ConfigError(
                f"{type(module).__name__} returned no attention weights (attention implementation: {impl})",
                "switch it to eager attention: kdforge.features.use_eager_attention(model) "
                "(Objective.bind does this for attention terms)",
            )
        feats.attentions = tuple(attn)
    return output, feats


def _field(output: Any, name: str) -> Any:
    value = getattr(output, name, None)
    if value is None and isinstance(output, Mapping):
        value = output.get(name)
    return value


def use_eager_attention(model: nn.Module) -> bool:
    """Switch a Hugging Face model to ``eager`` attention (the only one returning weights).

    Returns True when the implementation changed. Eager attention is slower and uses more memory
    than SDPA: only attention-based terms (``attention_kl``) need it.
    """
    root = _unwrap(model)
    config = getattr(root, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager"):
        return False
    setter = getattr(root, "set_attn_implementation", None)
    if not callable(setter):
        raise ConfigError(f"cannot switch {type(root).__name__} to eager attention",
                          "load it with attn_implementation='eager'")
    setter("eager")
    logger.info("%s: attention implementation %s -> eager (attention_kl needs the weights)",
                type(root).__name__, current)
    return True


# -- layers ------------------------------------------------------------------------------------
def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks (``config.num_hidden_layers`` or the longest ModuleList)."""
    root = _unwrap(model)
    config = getattr(root, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList)]
    if lists:
        return max(len(m) for m in lists)
    raise ConfigError(f"cannot tell how many layers {type(root).__name__} has",
                      "give explicit layer indices, or tap modules by path")


def source_layers(student: nn.Module) -> list[int] | None:
    """Teacher block indices a :func:`~kdforge.students.student_from_teacher` student was copied
    from (``config.kdforge_source_layers``), or None."""
    kept = getattr(getattr(_unwrap(student), "config", None), "kdforge_source_layers", None)
    return [int(i) for i in kept] if isinstance(kept, list | tuple) and kept else None


def layer_map(spec: LayerSpec, student_layers: int, teacher_layers: int, *, space: Space = "hidden_states",
              kept: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Pairs ``(student index, teacher index)`` of the tensors to match.

    Indices are in ``space``: ``"hidden_states"`` (``0`` = embeddings, ``i`` = output of block
    ``i``, ``L`` = last) or ``"blocks"`` (``0 .. L-1``, for attentions and value vectors).

    Args:
        spec: ``"uniform"``: every student block ``i`` (1-based) with teacher block
            ``round(i * L_t / L_s)`` (the embeddings are not matched); ``"last"``: the last layers
            only; ``"kept"``: the teacher blocks the student was copied from (``kept``);
            ``"auto"``: ``"kept"`` when ``kept`` is given, else ``"uniform"``; a list of ``L_s``
            teacher indices (one per student layer, same order as ``uniform``); or a dict
            ``{student index: teacher index}`` in ``space`` (negative indices count from the end).
        student_layers: ``L_s`` blocks; teacher_layers: ``L_t`` blocks.
        kept: teacher block of each student block (``source_layers(student)``).

    Raises:
        ConfigError: unknown spec, ``"kept"`` without a record, an index out of range.
    """
    ls, lt = int(student_layers), int(teacher_layers)
    offset = 1 if space == "hidden_states" else 0  # hidden_states[i] follows block i-1

    def one_based_pairs(teacher_of: Sequence[int]) -> list[tuple[int, int]]:
        return [(i - 1 + offset, t - 1 + offset) for i, t in zip(range(1, ls + 1), teacher_of)]

    if spec == "auto":
        spec = "kept" if kept else "uniform"
    if spec == "uniform":
        if ls > lt:
            logger.info("uniform layer map: the student has more layers (%d) than the teacher (%d)", ls, lt)
        return one_based_pairs([max(1, round(i * lt / ls)) for i in range(1, ls + 1)])
    if spec == "last":
        return [(ls - 1 + offset, lt - 1 + offset)]
    if spec == "kept":
        if not kept:
            raise ConfigError("layers: kept needs a student built by student_from_teacher "
                              "(its config records kdforge_source_layers)",
                              "use layers: uniform, last, or explicit indices")
        if len(kept) != ls:
            raise ConfigError(f"the student has {ls} layers but records {len(kept)} source layers {list(kept)}",
                              "use layers: uniform or explicit indices")
        return one_based_pairs([k + 1 for k in kept])
    size_s, size_t = ls + offset, lt + offset
    if isinstance(spec, Mapping):
        pairs = [(int(s), int(t)) for s, t in spec.items()]
    elif isinstance(spec, list | tuple):
        if len(spec) != ls:
            raise ConfigError(f"layers: a list needs one teacher index per student layer ({ls}), got {len(spec)}",
                              "give a list of that length, or a {student: teacher} mapping")
        pairs = [(i + offset, int(t)) for i, t in enumerate(spec)]
    else:
        raise ConfigError(f"unknown layer map {spec!r}",
                          "use 'auto', 'uniform', 'last', 'kept', a list of teacher indices or {student: teacher}")
    out = []
    for s, t in pairs:
        s_n, t_n = s % size_s if -size_s <= s < size_s else None, t % size_t if -size_t <= t < size_t else None
        if s_n is None or t_n is None:
            raise ConfigError(f"layer pair ({s}, {t}) is out of range: the student has indices 0..{size_s - 1}, "
                              f"the teacher 0..{size_t - 1} ({space})", "fix the layer indices")
        out.append((s_n, t_n))
    return out


_LAYER_NUM = re.compile(r"\.(\d+)\.")


def value_modules(model: nn.Module) -> list[str]:
    """Paths of the per-block value projections (``*.v_proj`` of Llama/Mistral/Qwen, ``*.value``
    of BERT), in block order.

    Raises:
        ConfigError: none found (fused QKV projections, e.g. GPT-2's ``c_attn``).
    """
    root = _unwrap(model)
    found = [n for n, _ in root.named_modules() if n.endswith(".v_proj") or n.endswith(".value")]
    if not found:
        raise ConfigError(f"{type(root).__name__} has no separate value projection (*.v_proj or *.value)",
                          "tap the value vectors by path with student_modules / teacher_modules")

    def key(name: str) -> int:
        m = _LAYER_NUM.search(name)
        return int(m.group(1)) if m else 0

    return sorted(found, key=key)
