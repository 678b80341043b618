"""Feature and relation distillation: hints (FitNets), attention/value relations (MiniLM), CKA, TRG, ND, OFA-KD,
talking models.

Where is ...?

* the losses as pure functions (``hidden_mse``, ``cosine_hidden``, ``attention_kl``,
  ``value_relation_kl``, ``linear_cka`` / ``cka_loss``) -> :mod:`.losses`
* ``nn.Module`` wrappers with their projector (``HiddenMSE(256, 576)``) -> :mod:`.modules`
* capturing intermediate outputs (``output_hidden_states`` / forward hooks) and layer maps -> :mod:`.taps`
* per-layer linear CKA between a student and its teacher (a diagnostic) -> :mod:`.diagnostics`
* ND (norm and direction toward the teacher's class means) -> :mod:`.nd`; OFA-KD (logit heads on
  student stages, adaptive target enhancement) -> :mod:`.ofa`; TRG (token relationship graphs) -> :mod:`.trg`;
  talking models (encoders/decoders into a shared message space, the teacher answering) -> :mod:`.talking`
* the objective terms (registry :data:`FEATURE_LOSSES`, validated params, :class:`FeatureTerms`)
  -> :mod:`.terms`

In a training objective::

    objective = Objective([
        {"name": "forward_kl", "weight": 1.0},
        {"name": "hidden_mse", "weight": 1.0, "params": {"layers": "uniform"}},
    ])
    Distiller(student, teacher, task=CausalLMTask(), objective=objective,
              extra_modules=objective.bind(student, teacher), ...)

See ``docs/features.md``.
"""

from kdforge.features.diagnostics import LayerSimilarity, layer_similarity
from kdforge.features.losses import (
    attention_kl,
    cka_loss,
    cosine_hidden,
    hidden_mse,
    linear_cka,
    relation_matrix,
    value_relation_kl,
)
from kdforge.features.modules import (
    AttentionKL,
    CKALoss,
    CosineHidden,
    HiddenMSE,
    ValueRelationKL,
    make_projector,
)
from kdforge.features.nd import ClassMeans, class_means, nd_loss
from kdforge.features.ofa import OFAHead, ofa_loss, ofa_targets
from kdforge.features.talking import TalkingChannel, TalkingWeights, talking_loss, talking_parts
from kdforge.features.taps import (
    FeatureRequest,
    Features,
    ModuleTaps,
    capture,
    layer_map,
    num_layers,
    source_layers,
    use_eager_attention,
    value_modules,
)
from kdforge.features.terms import FEATURE_LOSSES, FeatureLossDef, FeatureTerms, build_feature_terms
from kdforge.features.trg import knn_graph, trg_contextual, trg_global, trg_local, trg_loss

__all__ = [
    "AttentionKL",
    "CKALoss",
    "ClassMeans",
    "CosineHidden",
    "FEATURE_LOSSES",
    "FeatureLossDef",
    "FeatureRequest",
    "FeatureTerms",
    "Features",
    "HiddenMSE",
    "LayerSimilarity",
    "ModuleTaps",
    "OFAHead",
    "TalkingChannel",
    "TalkingWeights",
    "ValueRelationKL",
    "attention_kl",
    "build_feature_terms",
    "capture",
    "cka_loss",
    "class_means",
    "cosine_hidden",
    "hidden_mse",
    "knn_graph",
    "layer_map",
    "layer_similarity",
    "linear_cka",
    "make_projector",
    "nd_loss",
    "num_layers",
    "ofa_loss",
    "ofa_targets",
    "relation_matrix",
    "source_layers",
    "talking_loss",
    "talking_parts",
    "trg_contextual",
    "trg_global",
    "trg_local",
    "trg_loss",
    "use_eager_attention",
    "value_modules",
    "value_relation_kl",
]
