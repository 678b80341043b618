"""Data selection with a teacher: which documents the student should see (docs/data-selection.md).

- :mod:`kdforge.data.select.scorer`: per-document log-likelihood of a causal LM from text;
- :mod:`kdforge.data.select.miniplm`: MiniPLM difference sampling (teacher vs reference score,
  resumable scoring pass, refined ``datasets`` folder);
- :mod:`kdforge.data.select.active`: robust active distillation (budgeted teacher queries on
  informative, likely-correct points);
- :mod:`kdforge.data.select.kd3`: KD3 selection of a shifted pool by combined teacher/student predictions;
- :mod:`kdforge.data.select.config`: the ``kdforge select`` config and runner.
"""

from kdforge.data.select.active import (
    ActiveSelector,
    TeacherConfidenceModel,
    active_scores,
    select_queries,
    student_uncertainty,
)
from kdforge.data.select.config import SelectConfig, run_select
from kdforge.data.select.kd3 import KD3Scores, kd3_scores, kd3_select
from kdforge.data.select.miniplm import (
    DocumentScore,
    MiniPLMResult,
    miniplm_select,
    read_scores,
    score_documents,
    select_indices,
)
from kdforge.data.select.scorer import CausalLMScorer, DocumentScorer

__all__ = [
    "ActiveSelector",
    "KD3Scores",
    "TeacherConfidenceModel",
    "active_scores",
    "kd3_scores",
    "kd3_select",
    "select_queries",
    "student_uncertainty",
    "CausalLMScorer",
    "DocumentScore",
    "DocumentScorer",
    "MiniPLMResult",
    "SelectConfig",
    "miniplm_select",
    "read_scores",
    "run_select",
    "score_documents",
    "select_indices",
]
