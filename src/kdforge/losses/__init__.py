"""Distillation losses: pure functions, one file per family, all registered in :data:`LOSSES`.

Where is ...?

* forward / reverse KL, (generalised) JSD, TVD, skew KL, adaptive KL -> :mod:`.divergences`
* decoupled KD (DKD) -> :mod:`.dkd`
* BD-KD (entropy-balanced forward/reverse KL) -> :mod:`.bdkd`
* Sinkhorn KD (entropic optimal transport) -> :mod:`.sinkhorn`
* DAC-KL, dual-head KD, trilateral KD/CE fusion, swing (privacy) -> :mod:`.dac_kl`, :mod:`.dual_head`,
  :mod:`.trilateral`, :mod:`.swing`
* TAID and its ``t`` schedule -> :mod:`.taid`
* MiniLLM (sequence reverse KL by policy gradient on samples) -> :mod:`.minillm`
* DPO over sequence log-probs (preference distillation; not a per-position LossSpec) -> :mod:`.preference`
* cross-entropy with labels -> :mod:`.supervised`
* cross-tokenizer ULD and the GOLD-style hybrid -> :mod:`.uld`
* sentence-embedding losses (MSE, cosine, in-batch similarity KD) -> :mod:`.embedding`
* ranking: Margin-MSE over (query, positive, negative) score margins -> :mod:`.ranking`
* fused LM-head + loss over chunks for big vocabularies -> :mod:`.chunked`
* ``nn.Module`` wrappers (``ForwardKL(temperature=2.0)``) -> :mod:`.modules`
* the teacher signal (dense logits or sparse top-k) -> :mod:`.signal`
* what each loss needs and can do (:class:`LossSpec`, ``@register_loss``) -> :mod:`.spec`
* closed-form value + gradient machinery of the chunked path -> :mod:`.closed_form`
* per-position fidelity (agreement, KL both ways, JS) for metrics -> :mod:`.fidelity`

Every registered loss is a :class:`LossSpec` called the same way::

    LOSSES.get(name)(student_logits, teacher, mask=m, reduction="sum", temperature=T, labels=y, **params)

and declares what it needs: ``loss_spec(name).needs_labels``, ``.sparse_ok``, ``.kernel_for(...)``.
"""

from kdforge.losses._core import value_checks, value_checks_enabled
from kdforge.losses.bdkd import bdkd
from kdforge.losses.chunked import TeacherHead, auto_chunk_size, chunked_distillation_loss
from kdforge.losses.dac_clip import DACClipNet
from kdforge.losses.dac_kl import dac_kl
from kdforge.losses.divergences import (
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from kdforge.losses.dkd import dkd
from kdforge.losses.dual_head import dual_head_kd
from kdforge.losses.embedding import embedding_cosine, embedding_mse, similarity_kd
from kdforge.losses.minillm import minillm_loss
from kdforge.losses.modules import (
    DKD,
    TAID,
    TVD,
    AdaptiveKL,
    CrossEntropy,
    DistillationLoss,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
)
from kdforge.losses.preference import dpo_loss, sequence_logprobs
from kdforge.losses.ranking import margin_mse, pair_scores
from kdforge.losses.registry import LOSSES
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.sinkhorn import sinkhorn_kd
from kdforge.losses.spec import LossSpec, loss_spec, register_loss
from kdforge.losses.supervised import IGNORE_INDEX, cross_entropy
from kdforge.losses.swing import swing_kd
from kdforge.losses.taid import TAIDSchedule, taid
from kdforge.losses.trilateral import TrilateralBilevel, TrilateralFusion, trilateral_kd
from kdforge.losses.uld import CrossVocabTeacher, gold, uld

__all__ = [
    "DACClipNet",
    "DKD",
    "IGNORE_INDEX",
    "LOSSES",
    "LossSpec",
    "TAID",
    "TVD",
    "TrilateralBilevel",
    "TrilateralFusion",
    "AdaptiveKL",
    "CrossEntropy",
    "CrossVocabTeacher",
    "DistillationLoss",
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "SparseTeacher",
    "TAIDSchedule",
    "TeacherHead",
    "adaptive_kl",
    "auto_chunk_size",
    "bdkd",
    "chunked_distillation_loss",
    "cross_entropy",
    "dac_kl",
    "dkd",
    "dpo_loss",
    "dual_head_kd",
    "embedding_cosine",
    "embedding_mse",
    "forward_kl",
    "generalized_jsd",
    "gold",
    "jsd",
    "loss_spec",
    "margin_mse",
    "minillm_loss",
    "pair_scores",
    "register_loss",
    "reverse_kl",
    "sequence_logprobs",
    "similarity_kd",
    "sinkhorn_kd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "swing_kd",
    "taid",
    "trilateral_kd",
    "tvd",
    "uld",
    "value_checks",
    "value_checks_enabled",
]
