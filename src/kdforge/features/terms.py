"""Feature terms of an objective: registry, validated parameters, and the :class:`FeatureTerms` module.

An objective term such as ``{name: hidden_mse, weight: 1.0, params: {layers: uniform}}`` names a
loss registered in :data:`FEATURE_LOSSES`; its ``params`` are validated against that loss's
parameter model when the config is read. :meth:`kdforge.train.Objective.bind` turns the feature
terms into one :class:`FeatureTerms` module for a given (student, teacher) pair: it resolves the
layer map, the tensors to capture from each model, and builds the learned projectors (the only
trainable state of the method, optimised with the student and checkpointed in
``extras.safetensors``, never inside the student).

Every term's value is **summed over real positions and averaged over its matched layer pairs**,
so its weight does not grow with the number of layers matched and it shares the objective's
normaliser (real positions of the whole accumulated batch).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from kdforge.config import StrictModel
from kdforge.errors import ConfigError, ShapeError
from kdforge.features.losses import (
    attention_kl,
    cka_loss,
    cosine_hidden,
    hidden_mse,
    value_relation_kl,
)
from kdforge.features.modules import make_projector
from kdforge.features.nd import ClassMeans, nd_loss
from kdforge.features.nd import embedding as nd_embedding
from kdforge.features.ofa import OFAHead, ofa_loss, ofa_targets
from kdforge.features.talking import TalkingChannel, TalkingWeights, run_frozen, talking_loss
from kdforge.features.taps import (
    FeatureRequest,
    Features,
    layer_map,
    num_layers,
    resolve_module,
    source_layers,
    use_eager_attention,
    value_modules,
)
from kdforge.features.trg import trg_loss
from kdforge.registry import Registry

__all__ = ["EXTRAS_KEY", "FEATURE_LOSSES", "FeatureLossDef", "FeatureTerms", "build_feature_terms"]

#: name of the :class:`FeatureTerms` module among the trainer's ``extra_modules`` (checkpoint
#: keys ``features.projectors.<term>_<pair>.weight`` in ``extras.safetensors``)
EXTRAS_KEY = "features"

LayerField = Literal["auto", "uniform", "last", "kept"] | list[int] | dict[int, int]
Kind = Literal["hint", "cka", "attention", "value", "nd", "ofa", "trg", "talking"]


# -- parameters (what a YAML `params:` may hold) ------------------------------------------------
class _Tapped(StrictModel):
    student_modules: list[str] | None = Field(
        None, description="module paths of the student to tap with hooks (instead of layers)")
    teacher_modules: list[str] | None = Field(None, description="matching module paths of the teacher")

    @model_validator(mode="after")
    def _pairs(self) -> _Tapped:
        s, t = self.student_modules, self.teacher_modules
        if (s is None) != (t is None):
            raise ValueError("give both student_modules and teacher_modules (matched one to one), or neither")
        if s is not None and t is not None:
            if not s or len(s) != len(t):
                raise ValueError(f"student_modules ({len(s)}) and teacher_modules ({len(t)}) must be "
                                 "non-empty lists of the same length")
            if "layers" in self.model_fields_set:
                raise ValueError("set either layers or student_modules/teacher_modules, not both")
        return self


class HintParams(_Tapped):
    """``hidden_mse`` / ``cosine_hidden``."""

    layers: LayerField = Field("auto", description="auto (kept layers, else uniform), uniform, last, kept, "
                                                   "a list of teacher indices or {student: teacher}")
    projector: Literal["auto", "linear", "identity"] = Field(
        "auto", description="auto: identity when widths match, else a learned linear map")


class HiddenMSEParams(HintParams):
    """``hidden_mse``."""

    normalize: bool = Field(False, description="standardise each token's features on both sides first "
                                               "(scale-free; for LLMs with very large activations)")


class CKAParams(_Tapped):
    """``cka``."""

    layers: LayerField = "last"


class AttentionParams(StrictModel):
    """``attention_kl``."""

    layers: LayerField = "last"
    heads: Literal["auto", "match", "average"] = Field(
        "auto", description="match head i with head i (same count), or average each side's heads")


class ValueRelationParams(_Tapped):
    """``value_relation_kl``."""

    layers: LayerField = "last"
    relation_heads: int | None = Field(None, ge=1, description="default: gcd of the two models' KV head counts")
    causal: bool | None = Field(None, description="relations to past tokens only (default: true for causal LMs)")


class TRGParams(HintParams):
    """``trg``."""

    layers: LayerField = "last"
    k: int = Field(8, ge=1, description="neighbours per token in the k-NN graph")
    sigma: float | Literal["auto"] = Field(
        "auto", description="Gaussian edge width; auto: the mean squared token distance of each sample")
    local_weight: float = Field(1.0, ge=0.0, description="weight of the local preserving (graph) KL")
    contextual_weight: float = Field(1.0, ge=0.0, description="weight of the contextual (inner-instance) MSE")
    global_weight: float = Field(1.0, ge=0.0, description="weight of the token InfoNCE (needs the projector)")
    global_temperature: float = Field(0.1, gt=0.0, description="InfoNCE temperature")

    @model_validator(mode="after")
    def _sigma(self) -> TRGParams:
        if self.sigma != "auto" and self.sigma <= 0:
            raise ValueError("sigma must be positive or auto")
        return self


class NDParams(StrictModel):
    """``nd`` (classifiers: taps by module path)."""

    student_modules: list[str] = Field(min_length=1, max_length=1, description="the student's penultimate "
                                       "module (its embedding; a conv map is average-pooled)")
    teacher_modules: list[str] = Field(min_length=1, max_length=1, description="the teacher's penultimate module")
    num_classes: int | None = Field(None, ge=2, description="default: out_features of the teacher's last Linear")
    projector: Literal["auto", "linear", "identity"] = Field(
        "auto", description="student embedding -> teacher width (auto: identity when widths match)")
    unlabeled: Literal["teacher", "skip"] = Field(
        "teacher", description="samples without a label: use the teacher's predicted class, or leave them out")


class OFAParams(StrictModel):
    """``ofa`` (classifiers: taps by module path)."""

    student_modules: list[str] = Field(min_length=1, description="student stages, one learned logit head each")
    num_classes: int | None = Field(None, ge=2, description="default: out_features of the teacher's last Linear")
    gamma: float = Field(1.0, ge=1.0, description="modulating exponent of the target class (1: plain KD)")
    temperature: float = Field(1.0, gt=0.0)


class TalkingParams(_Tapped):
    """``talking`` (talking models: learned encoders/decoders into a shared message space)."""

    layers: LayerField = "last"
    message_dim: int = Field(64, ge=1, description="width m of the shared message space")
    reconstruction_weight: float = Field(1.0, ge=0.0, description="each model's decoder(encoder(h)) ~ h")
    agreement_weight: float = Field(1.0, ge=0.0, description="student message ~ teacher message")
    passing_weight: float = Field(1.0, ge=0.0, description="student decoder(teacher message) ~ student feature")
    interactive_weight: float = Field(1.0, ge=0.0, description="the teacher's answer to the student's message: "
                                      "the student matches it, it matches the teacher's logits and the label")
    temperature: float = Field(1.0, gt=0.0, description="T of the interactive KLs")
    answer_labels: bool = Field(True, description="add the cross-entropy of the teacher's answer to the label")
    teacher_head: Literal["auto"] | list[str] = Field(
        "auto", description="the teacher's modules after the tapped one, run on the decoded student message "
                            "(auto: the later modules of the tapped one's nn.Sequential, or the LM head for the "
                            "last hidden state); checked against the teacher's logits on the first batch")


@dataclass(frozen=True)
class FeatureLossDef:
    """A registered feature loss: the pure function, what it reads and its parameter model."""

    fn: Callable[..., torch.Tensor]
    kind: Kind
    params_model: type[StrictModel]

    def validate_params(self, params: Mapping[str, Any]) -> StrictModel:
        return self.params_model.model_validate(dict(params))


FEATURE_LOSSES: Registry[FeatureLossDef] = Registry("feature loss")
FEATURE_LOSSES.add("hidden_mse", FeatureLossDef(hidden_mse, "hint", HiddenMSEParams),
                   "FitNets hint: MSE(proj(h_student), h_teacher) on matched hidden states")
FEATURE_LOSSES.add("cosine_hidden", FeatureLossDef(cosine_hidden, "hint", HintParams),
                   "1 - cos(proj(h_student), h_teacher) on matched hidden states")
FEATURE_LOSSES.add("attention_kl", FeatureLossDef(attention_kl, "attention", AttentionParams),
                   "MiniLM: KL(teacher attention || student attention) per query, heads matched or averaged")
FEATURE_LOSSES.add("value_relation_kl", FeatureLossDef(value_relation_kl, "value", ValueRelationParams),
                   "MiniLM(v2): KL between softmax(V V^T / sqrt(d)) value relations, any head counts")
FEATURE_LOSSES.add("cka", FeatureLossDef(cka_loss, "cka", CKAParams),
                   "1 - linear CKA between student and teacher hidden states (widths may differ)")
FEATURE_LOSSES.add("trg", FeatureLossDef(trg_loss, "trg", TRGParams),
                   "TRG: per-sample token graphs (k-NN Gaussian KL + contextual MSE) and a token InfoNCE")
FEATURE_LOSSES.add("nd", FeatureLossDef(nd_loss, "nd", NDParams),
                   "ND: student embedding toward the teacher's class-mean direction, its norm up to the teacher's")
FEATURE_LOSSES.add("ofa", FeatureLossDef(ofa_loss, "ofa", OFAParams),
                   "OFA-KD: learned heads map student stages to logits, distilled with adaptive target enhancement")
FEATURE_LOSSES.add("talking", FeatureLossDef(talking_loss, "talking", TalkingParams),
                   "Talking models: learned encoders/decoders of both models into a shared message space, the "
                   "teacher answering the student's message")


# -- plans ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    key: str
    name: str
    kind: Kind
    source: Literal["hidden_states", "attentions", "modules"]
    pairs: tuple[tuple[int | str, int | str | None], ...]  # teacher None: nothing tapped on the teacher (ofa)
    params: StrictModel
    projectors: tuple[str | None, ...]  # key in FeatureTerms.projectors per pair, None = identity (ofa: its head)


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _hidden_width(model: nn.Module) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(_config(model), name, None)
        if isinstance(value, int):
            return value
    emb = getattr(model, "get_input_embeddings", None)
    if callable(emb) and hasattr(emb(), "embedding_dim"):
        return int(emb().embedding_dim)
    raise ConfigError(f"cannot tell the hidden width of {type(model).__name__}", "use projector: identity")


def _own_width(m: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels", "num_features", "embedding_dim"):
        value = getattr(m, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(m, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def _width_source(model: nn.Module, path: str) -> nn.Module | None:
    """The module whose attributes tell the width of ``path``'s output: itself, the last such module
    inside it (a Sequential), or, for a shape-keeping module of a Sequential (activation, dropout,
    pooling), the nearest such module before it (a Flatten in between: unknown)."""
    module = resolve_module(model, path)
    candidates = [module]
    if isinstance(module, nn.Sequential | nn.ModuleList):
        candidates = list(reversed(list(module.modules())))
    for m in candidates:
        if _own_width(m) is not None:
            return m
    if isinstance(module, nn.Flatten | nn.Unflatten):
        return None  # its width is not its input's (see _flatten_width)
    parent_path, _, index = path.rpartition(".")
    if index.isdigit():
        parent = resolve_module(model, parent_path) if parent_path else model
        if isinstance(parent, nn.Sequential):
            for sibling in reversed(list(parent)[: int(index)]):
                for m in reversed(list(sibling.modules())):
                    if isinstance(m, nn.Flatten | nn.Unflatten):
                        return None
                    if _own_width(m) is not None:
                        return m
    return None


def _flatten_width(model: nn.Module, path: str) -> int | None:
    """The width of a Flatten inside a Sequential: the in_features of the Linear right after it."""
    if not isinstance(resolve_module(model, path), nn.Flatten):
        return None
    parent_path, _, index = path.rpartition(".")
    parent = resolve_module(model, parent_path) if parent_path else model
    if index.isdigit() and isinstance(parent, nn.Sequential):
        for sibling in list(parent)[int(index) + 1:]:
            if isinstance(sibling, nn.Linear):
                return int(sibling.in_features)
            if not isinstance(sibling, nn.Dropout | nn.Identity):
                return None
    return None


def _module_width(model: nn.Module, path: str) -> int:
    """Channel/feature width of a module's output, from its attributes (no forward pass)."""
    source = _width_source(model, path)
    if source is not None:
        return int(_own_width(source))  # type: ignore[arg-type]
    flat = _flatten_width(model, path)
    if flat is not None:
        return flat
    if re.search(r"\.\d+$", path):  # a transformer block: its output has the hidden width
        return _hidden_width(model)
    module = resolve_module(model, path)
    raise ConfigError(f"cannot tell the output width of module {path!r} ({type(module).__name__}) for a projector",
                      "tap a Linear/Conv/Norm module, or set projector: identity when the widths match")


def _num_classes(model: nn.Module, given: int | None) -> int:
    """``given``, else the model's ``config.num_labels``, else the out_features of its last Linear."""
    if given is not None:
        return given
    value = getattr(_config(model), "num_labels", None)
    if isinstance(value, int) and value > 1:
        return value
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    raise ConfigError(f"cannot tell how many classes {type(model).__name__} predicts", "set params.num_classes")


def _kv_heads(model: nn.Module) -> int | None:
    c = _config(model)
    for name in ("num_key_value_heads", "num_attention_heads", "n_head"):
        value = getattr(c, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


class FeatureTerms(nn.Module):
    """All feature terms of one objective for one (student, teacher) pair.

    Build it with :meth:`kdforge.train.Objective.bind` (or :func:`build_feature_terms`). It tells a
    task what to capture (:attr:`student_request`, :attr:`teacher_request`) and computes every
    term from the captured :class:`~kdforge.features.taps.Features`. Its only parameters are the
    projectors (``projectors[<term>_<pair>]``, ``nn.Linear(H_s, H_t)``, applied to the student
    side on the first feature axis) and the OFA heads (``projectors[<ofa term>_<stage>]``); its
    buffers are the ND class means (``states[<nd term>]``, updated in training mode).
    """

    def __init__(self, plans: Sequence[_Plan], projectors: Mapping[str, nn.Module],
                 states: Mapping[str, nn.Module] | None = None,
                 teacher_heads: Mapping[str, Sequence[nn.Module]] | None = None) -> None:
        super().__init__()
        self.plans = list(plans)
        self.projectors = nn.ModuleDict(dict(projectors))
        self.states = nn.ModuleDict(dict(states or {}))
        # the rest of the teacher after a talking term's tap, per channel key: the teacher's own modules,
        # deliberately not registered (never optimised, moved or checkpointed with the terms)
        self.teacher_heads: dict[str, tuple[nn.Module, ...]] = {k: tuple(v) for k, v in (teacher_heads or {}).items()}
        self._heads_checked: set[str] = set()

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.plans]

    def _request(self, side: int) -> FeatureRequest:
        req = FeatureRequest()
        for p in self.plans:
            req = req | FeatureRequest(
                hidden_states=p.source == "hidden_states", attentions=p.source == "attentions",
                modules=tuple(str(pair[side]) for pair in p.pairs if pair[side] is not None)
                if p.source == "modules" else ())
        return req

    @property
    def student_request(self) -> FeatureRequest:
        return self._request(0)

    @property
    def teacher_request(self) -> FeatureRequest:
        return self._request(1)

    def project(self, x: torch.Tensor, key: str | None, feature_axis: int) -> torch.Tensor:
        """Apply projector ``key`` to axis ``feature_axis`` of ``x`` (identity for None)."""
        if key is None:
            return x
        proj = self.projectors[key]
        weight = getattr(proj, "weight", None)
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)
        if x.shape[feature_axis] != getattr(proj, "in_features", x.shape[feature_axis]):
            raise ShapeError(f"projector {key!r} expects width {proj.in_features}, the student feature has "
                             f"{x.shape[feature_axis]} on axis {feature_axis} (shape {tuple(x.shape)})",
                             "check the tapped modules / layers of this term")
        if feature_axis == x.dim() - 1:
            return proj(x)
        return proj(x.movedim(feature_axis, -1)).movedim(-1, feature_axis)

    def set_class_means(self, key: str, means: torch.Tensor) -> None:
        """Replace the running class means of ND term ``key`` with precomputed ``[K, D]`` teacher
        means (:func:`kdforge.features.nd.class_means`); later training batches refine them."""
        if _safe(key) not in self.states:
            raise ConfigError(f"no nd term {key!r} (nd terms: {list(self.states)})", "pass the key of an nd term")
        self.states[_safe(key)].set(means)  # type: ignore[operator]

    def forward(self, student: Features, teacher: Features, mask: torch.Tensor, *,
                key_mask: torch.Tensor | None = None, causal: bool = False, labels: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None,
                student_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each term summed over real positions, averaged over its layer pairs.

        Args:
            student: captured student features (with grad).
            teacher: captured teacher features (no grad).
            mask: ``[*P]`` bool, the real positions of the features (``[B, T]`` tokens, ``[B]`` samples).
            key_mask: ``[B, T]`` bool, tokens that exist (attention mask), for relations.
            causal: decoder model (value relations to past tokens only, unless the term says).
            labels: ``[B]`` class labels (``-100``: none), for ``nd`` and ``ofa``.
            teacher_logits: ``[B, K]`` dense teacher logits, for ``ofa`` (and ``nd``'s unlabelled samples),
                and ``talking`` (``[B, T-1, V]`` for an LM).
            student_logits: the student's logits at the same positions, for ``talking``'s interactive part.

        Returns:
            ``{term key: scalar}`` (float32, graph attached to student and projectors).
        """
        out: dict[str, torch.Tensor] = {}
        for plan in self.plans:
            total: torch.Tensor | None = None
            for (s_ref, t_ref), proj in zip(plan.pairs, plan.projectors):
                s = student.get(plan.source, s_ref)
                t = teacher.get(plan.source, t_ref).to(s.device) if t_ref is not None else s
                m = mask.to(s.device)
                if plan.kind in ("nd", "ofa"):
                    value = self._classwise(plan, proj, s, t, m, labels, teacher_logits)
                elif plan.kind == "hint":
                    extra = {"normalize": True} if getattr(plan.params, "normalize", False) else {}
                    value = FEATURE_LOSSES.get(plan.name).fn(self.project(s, proj, m.dim()), t, m, reduction="sum",
                                                             **extra)
                elif plan.kind == "trg":
                    value = self._trg(plan, proj, s, t, m)
                elif plan.kind == "talking":
                    value = self._talking(plan, str(proj), s, t, m, labels, teacher_logits, student_logits)
                elif plan.kind == "cka":
                    value = cka_loss(s, t, m, reduction="sum")
                elif plan.kind == "attention":
                    value = attention_kl(s, t, m, heads=plan.params.heads, reduction="sum")  # type: ignore[attr-defined]
                else:
                    p: ValueRelationParams = plan.params  # type: ignore[assignment]
                    value = value_relation_kl(s, t, m, relation_heads=int(p.relation_heads or 1),
                                              key_mask=key_mask, causal=causal if p.causal is None else p.causal,
                                              reduction="sum")
                total = value if total is None else total + value
            assert total is not None
            out[plan.key] = total / len(plan.pairs)
        return out

    def _trg(self, plan: _Plan, proj: str | None, s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """TRG on one pair: tokens ``[B, T, H]`` with a ``[B, T]`` mask, or a conv map ``[B, C, H, W]``
        with a ``[B]`` mask (its ``H·W`` positions are the tokens; a sample counts the mean over them)."""
        p: TRGParams = plan.params  # type: ignore[assignment]
        per_sample = m.dim() == 1
        if per_sample:
            if s.dim() < 3:
                raise ConfigError(f"term {plan.key!r} (trg) needs tokens: a [B, T, H] or [B, C, H, W] feature, got "
                                  f"{tuple(s.shape)}", "tap a layer with positions (hidden states, a conv stage)")
            s, t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)
            tokens_mask = m[:, None].expand(s.shape[0], s.shape[1])
        else:
            tokens_mask = m
        projected = self.project(s, proj, 2) if p.global_weight else None
        per_token = trg_loss(s, t, tokens_mask, projected=projected, k=p.k, sigma=p.sigma,
                             local_weight=p.local_weight, contextual_weight=p.contextual_weight,
                             global_weight=p.global_weight, global_temperature=p.global_temperature,
                             reduction="none")
        if per_sample:
            return (per_token.mean(1) * m).sum()
        return per_token.sum()

    def _talking(self, plan: _Plan, key: str, s: torch.Tensor, t: torch.Tensor, m: torch.Tensor,
                 labels: torch.Tensor | None, teacher_logits: torch.Tensor | None,
                 student_logits: torch.Tensor | None) -> torch.Tensor:
        """``talking`` on one pair (:mod:`kdforge.features.talking`), summed over real positions."""
        p: TalkingParams = plan.params  # type: ignore[assignment]
        heads = self.teacher_heads.get(key)
        weights = TalkingWeights(p.reconstruction_weight, p.agreement_weight, p.passing_weight,
                                 p.interactive_weight, p.temperature, p.answer_labels)
        answer_fn = None
        if heads is not None and p.interactive_weight:
            if not torch.is_tensor(teacher_logits) or student_logits is None:
                raise ConfigError(f"term {plan.key!r} (talking): the interactive part needs the student's and the "
                                  "teacher's dense logits", "train it with an online teacher, or set "
                                  "interactive_weight: 0")
            if key not in self._heads_checked:
                self._check_head(plan, key, heads, t, m, teacher_logits)  # type: ignore[arg-type]
            answer_fn = lambda x: run_frozen(heads, x)  # noqa: E731
        return talking_loss(self.projectors[key], s, t, m, weights=weights,  # type: ignore[arg-type]
                            answer_fn=answer_fn, student_logits=student_logits,
                            teacher_logits=teacher_logits if torch.is_tensor(teacher_logits) else None,
                            labels=labels, reduction="sum")

    def _check_head(self, plan: _Plan, key: str, heads: Sequence[nn.Module], t: torch.Tensor, m: torch.Tensor,
                    teacher_logits: torch.Tensor) -> None:
        """The teacher head must turn the teacher's own tapped feature into its logits (checked once)."""
        with torch.no_grad():
            x = t[:, :-1] if teacher_logits.dim() == 3 and m.dim() == 2 and t.shape[1] == teacher_logits.shape[1] + 1 \
                else t
            got = run_frozen(heads, x).float().to(teacher_logits.device)
            want = teacher_logits.float()
            keep = m[:, : want.shape[1]] if m.dim() == 2 else m
            ok = got.shape == want.shape and bool(torch.allclose(
                got[keep.to(want.device)], want[keep.to(want.device)], rtol=1e-2,
                atol=1e-2 * (1.0 + float(want.abs().max()))))
        if not ok:
            names = [type(h).__name__ for h in heads]
            tap = plan.pairs[plan.projectors.index(key)][1]
            raise ConfigError(f"term {plan.key!r} (talking): the teacher head {names} run on the teacher's tapped "
                              f"feature {tap!r} does not give the teacher's logits, so it is not the rest of the "
                              "teacher (or the logits are not this model's own, e.g. an ensemble's)",
                              "set params.teacher_head to the module paths that follow the tap (in order), or "
                              "interactive_weight: 0")
        self._heads_checked.add(key)

    def _classwise(self, plan: _Plan, proj: str | None, s: torch.Tensor, t: torch.Tensor, m: torch.Tensor,
                   labels: torch.Tensor | None, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """``nd`` / ``ofa`` on one tapped pair (classifier batches: one position per sample)."""
        if m.dim() != 1:
            raise ConfigError(f"term {plan.key!r} ({plan.name}) is for classifiers (one position per sample), "
                              f"got positions of shape {tuple(m.shape)}", "use it with ClassificationTask batches")
        if teacher_logits is not None and not torch.is_tensor(teacher_logits):
            teacher_logits = None  # a sparse (top-k) teacher: no dense logits
        if plan.kind == "ofa":
            if teacher_logits is None:
                raise ConfigError(f"term {plan.key!r} (ofa) needs the teacher's dense logits [B, K]",
                                  "train it with an online teacher or cached dense logits of a classifier")
            p: OFAParams = plan.params  # type: ignore[assignment]
            head = self.projectors[str(proj)]
            logits = head(s.to(head.fc.weight.dtype))  # type: ignore[union-attr]
            target = ofa_targets(labels, teacher_logits)
            return ofa_loss(logits, teacher_logits.to(logits.device), target, m, gamma=p.gamma,
                            temperature=p.temperature, reduction="sum")
        q: NDParams = plan.params  # type: ignore[assignment]
        classes = torch.full(m.shape, -100, dtype=torch.long, device=m.device)
        if labels is not None:
            classes = labels.to(m.device).long()
        if q.unlabeled == "teacher":
            if teacher_logits is None and (labels is None or bool((classes < 0).any())):
                raise ConfigError(f"term {plan.key!r} (nd): samples without a label and no dense teacher logits",
                                  "set params.unlabeled: skip, or label every sample")
            if teacher_logits is not None:
                classes = torch.where(classes >= 0, classes, teacher_logits.argmax(-1).to(m.device))
        state: ClassMeans = self.states[_safe(plan.key)]  # type: ignore[assignment]
        t_emb = nd_embedding(t)
        if self.training:
            keep = m & (classes >= 0)
            state.update(t_emb[keep], classes[keep])
        s_emb = self.project(nd_embedding(s), proj, 1)
        return nd_loss(s_emb, t_emb, state.means.to(s_emb.device), classes, m, reduction="sum")

    def extra_repr(self) -> str:
        return "; ".join(f"{p.key}: {p.source} {list(p.pairs)}" for p in self.plans)


def build_feature_terms(terms: Sequence[tuple[str, str, Mapping[str, Any] | StrictModel]], student: nn.Module,
                        teacher: nn.Module) -> FeatureTerms:
    """Resolve feature terms ``(key, loss name, params)`` for ``student`` and ``teacher``.

    Layer maps are resolved against the two models' depths, module paths are checked, projectors
    are created (a square projector starts as the identity, so a student equal to its teacher starts
    at zero loss), and models are switched to eager attention when an ``attention_kl`` term needs
    attention weights.

    Raises:
        ConfigError: unknown loss, bad parameters, layers out of range, unknown module paths,
            ``projector: identity`` with different widths.
    """
    plans: list[_Plan] = []
    projectors: dict[str, nn.Module] = {}
    states: dict[str, nn.Module] = {}
    teacher_heads: dict[str, tuple[nn.Module, ...]] = {}
    device = next((p.device for p in student.parameters()), torch.device("cpu"))
    for key, name, raw in terms:
        spec = FEATURE_LOSSES.get(name)
        params = raw if isinstance(raw, StrictModel) else spec.validate_params(raw)
        if spec.kind in ("nd", "ofa"):
            plan, made, state = _classwise_plan(key, name, spec.kind, params, student, teacher, device)
            plans.append(plan)
            projectors.update(made)
            states.update(state)
            continue
        if spec.kind == "talking":
            plan, made, heads = _talking_plan(key, name, params, student, teacher, device)
            plans.append(plan)
            projectors.update(made)
            teacher_heads.update(heads)
            continue
        tapped = getattr(params, "student_modules", None)
        s_layers = t_layers = 0
        if not tapped:
            s_layers, t_layers = num_layers(student), num_layers(teacher)
        kept = source_layers(student)
        layers = getattr(params, "layers", "last")
        if spec.kind in ("hint", "cka", "trg"):
            source, pairs = _tapped_or_hidden_pairs(params, student, teacher)
        elif spec.kind == "attention":
            source = "attentions"
            pairs = layer_map(layers, s_layers, t_layers, space="blocks", kept=kept)
            use_eager_attention(student)
            use_eager_attention(teacher)
        else:
            source = "modules"
            if tapped:
                pairs = _module_pairs(params, student, teacher)
            else:
                vs, vt = value_modules(student), value_modules(teacher)
                blocks = layer_map(layers, len(vs), len(vt), space="blocks", kept=kept)
                pairs = [(vs[s], vt[t]) for s, t in blocks]
            if params.relation_heads is None:  # type: ignore[attr-defined]
                hs, ht = _kv_heads(student), _kv_heads(teacher)
                params = params.model_copy(update={"relation_heads": math.gcd(hs, ht) if hs and ht else 1})
        proj_keys: list[str | None] = []
        for i, (s_ref, t_ref) in enumerate(pairs):
            if spec.kind not in ("hint", "trg") or (spec.kind == "trg" and not params.global_weight):  # type: ignore[attr-defined]
                proj_keys.append(None)
                continue
            ws, wt = _pair_widths(source, student, teacher, s_ref, t_ref)
            mode = params.projector  # type: ignore[attr-defined]
            if mode == "identity" and ws != wt:
                raise ConfigError(f"term {key!r}: projector identity, but the student width {ws} differs from the "
                                  f"teacher width {wt} at pair {s_ref} -> {t_ref}",
                                  "use projector: linear (or auto)")
            if mode == "identity" or (mode == "auto" and ws == wt):
                proj_keys.append(None)
                continue
            proj = nn.Linear(ws, wt)
            with torch.no_grad():
                if ws == wt:
                    proj.weight.copy_(torch.eye(ws))
                proj.bias.zero_()
            pkey = f"{_safe(key)}_{i}"
            projectors[pkey] = proj.to(device)
            proj_keys.append(pkey)
        plans.append(_Plan(key, name, spec.kind, source, tuple(pairs), params, tuple(proj_keys)))
    return FeatureTerms(plans, projectors, states, teacher_heads)


def _module_pairs(params: Any, student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """``student_modules`` matched one to one with ``teacher_modules``, each path checked to exist."""
    pairs = list(zip(params.student_modules, params.teacher_modules))
    for s_path, t_path in pairs:
        resolve_module(student, str(s_path)), resolve_module(teacher, str(t_path))
    return pairs


def _tapped_or_hidden_pairs(params: Any, student: nn.Module, teacher: nn.Module) -> tuple[str, list[Any]]:
    """``("modules", module path pairs)`` when the term taps modules, else ``("hidden_states", layer pairs)``
    by ``params.layers``."""
    if getattr(params, "student_modules", None):
        return "modules", _module_pairs(params, student, teacher)
    return "hidden_states", list(layer_map(getattr(params, "layers", "last"), num_layers(student), num_layers(teacher),
                                           space="hidden_states", kept=source_layers(student)))


def _pair_widths(source: str, student: nn.Module, teacher: nn.Module, s_ref: Any, t_ref: Any) -> tuple[int, int]:
    """Feature widths (student, teacher) of one tapped pair."""
    if source == "modules":
        return _module_width(student, str(s_ref)), _module_width(teacher, str(t_ref))
    return _hidden_width(student), _hidden_width(teacher)


def _talking_plan(key: str, name: str, params: Any, student: nn.Module, teacher: nn.Module, device: torch.device
                  ) -> tuple[_Plan, dict[str, nn.Module], dict[str, tuple[nn.Module, ...]]]:
    """``talking``: matched pairs (modules or hidden states), one :class:`TalkingChannel` per pair and,
    when the interactive part is on, the teacher modules that follow each teacher tap."""
    source, pairs = _tapped_or_hidden_pairs(params, student, teacher)
    channels: dict[str, nn.Module] = {}
    heads: dict[str, tuple[nn.Module, ...]] = {}
    for i, (s_ref, t_ref) in enumerate(pairs):
        ws, wt = _pair_widths(source, student, teacher, s_ref, t_ref)
        ckey = f"{_safe(key)}_{i}"
        channels[ckey] = TalkingChannel(ws, wt, params.message_dim).to(device)
        if params.interactive_weight:
            heads[ckey] = _teacher_head(key, params.teacher_head, teacher, source, t_ref)
    return _Plan(key, name, "talking", source, tuple(pairs), params, tuple(channels)), channels, heads


def _teacher_head(key: str, given: Any, teacher: nn.Module, source: str, t_ref: int | str | None
                  ) -> tuple[nn.Module, ...]:
    """The teacher's modules after its tap ``t_ref`` (``given`` paths, or found: module docstring of
    :mod:`kdforge.features.talking`); checked against the teacher's logits on the first batch."""
    if given != "auto":
        return tuple(resolve_module(teacher, path) for path in given)
    if source == "hidden_states":
        head = getattr(teacher, "get_output_embeddings", None)
        out = head() if callable(head) else None
        if t_ref == num_layers(teacher) and isinstance(out, nn.Module):
            return (out,)
        raise ConfigError(f"term {key!r} (talking): teacher_head auto needs the teacher's last hidden state "
                          f"(layer {num_layers(teacher)}, read by its LM head), got layer {t_ref}",
                          "tap layers: last, give params.teacher_head (module paths after the tap), or set "
                          "interactive_weight: 0")
    path = str(t_ref)
    rest: list[nn.Module] = []
    while path:
        parent_path, _, index = path.rpartition(".")
        parent = resolve_module(teacher, parent_path)
        if not (index.isdigit() and isinstance(parent, nn.Sequential)):
            break
        rest += list(parent)[int(index) + 1:]
        path = parent_path
    return tuple(rest)


def _classwise_plan(key: str, name: str, kind: Kind, params: Any, student: nn.Module, teacher: nn.Module,
                    device: torch.device) -> tuple[_Plan, dict[str, nn.Module], dict[str, nn.Module]]:
    """``nd``: one (student, teacher) embedding pair, a projector where widths differ, the class-mean
    buffers; ``ofa``: one learned logit head per student stage, nothing tapped on the teacher."""
    num_classes = _num_classes(teacher, params.num_classes)
    if kind == "ofa":
        pairs: list[tuple[int | str, int | str | None]] = []
        heads: dict[str, nn.Module] = {}
        for i, path in enumerate(params.student_modules):
            source = _width_source(student, path)
            width = _own_width(source) if source is not None else _flatten_width(student, path)
            if width is None:
                raise ConfigError(f"term {key!r}: cannot tell the output width of student module {path!r} for its "
                                  "OFA head", "tap a Conv/Linear/Norm module (or an activation right after one)")
            conv = isinstance(source, nn.Conv2d | nn.BatchNorm2d)
            heads[f"{_safe(key)}_{i}"] = OFAHead(int(width), num_classes, conv=conv).to(device)
            pairs.append((path, None))
        return _Plan(key, name, kind, "modules", tuple(pairs), params, tuple(heads)), heads, {}
    s_path, t_path = params.student_modules[0], params.teacher_modules[0]
    ws, wt = _module_width(student, s_path), _module_width(teacher, t_path)
    if params.projector == "identity" and ws != wt:
        raise ConfigError(f"term {key!r}: projector identity, but the student embedding width {ws} differs from "
                          f"the teacher's {wt}", "use projector: linear (or auto)")
    made: dict[str, nn.Module] = {}
    proj_key = None
    if params.projector == "linear" or (params.projector == "auto" and ws != wt):
        proj_key = f"{_safe(key)}_0"
        made[proj_key] = make_projector(ws, wt, "linear").to(device)
    plan = _Plan(key, name, kind, "modules", ((s_path, t_path),), params, (proj_key,))
    return plan, made, {_safe(key): ClassMeans(num_classes, wt).to(device)}
