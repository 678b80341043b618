"""kdforge.eval: how good is the student, how close to its teacher, at what cost.

* :mod:`kdforge.eval.classification` — accuracy, agreement, KL to teacher, ECE + reliability
  bins, per-class accuracy.
* :mod:`kdforge.eval.exposure` — canary exposure (Carlini et al., "The Secret Sharer").
* :mod:`kdforge.eval.cost` — parameters, size on disk, latency p50/p95, throughput.
* :mod:`kdforge.eval.fidelity` — top-1 agreement, KL both ways and JS to the teacher, chunked,
  dense or sparse top-k teacher.
* :mod:`kdforge.eval.lm` — perplexity, next-token ECE, exact match, ROUGE-L, answer-level
  calibration, and the one-pass evaluator behind ``kdforge eval``.
* :mod:`kdforge.eval.monitor` — the teacher-hacking detector and its trainer callback.
* :mod:`kdforge.eval.report` — ``kdforge report``: self-contained HTML + Markdown reports.
"""

from kdforge.eval.classification import (
    ReliabilityBins,
    accuracy,
    classification_metrics,
    expected_calibration_error,
    kl_to_teacher,
    per_class_accuracy,
    predict_logits,
    reliability_bins,
    top1_agreement,
)
from kdforge.eval.cost import (
    LatencyStats,
    cost_report,
    count_parameters,
    disk_size_bytes,
    measure_latency,
    state_dict_bytes,
)
from kdforge.eval.exposure import canary_exposure, exposure, rank_of, sequence_log_perplexity
from kdforge.eval.fidelity import (
    FIDELITY_KEYS,
    FidelityAccumulator,
    fidelity,
    fidelity_on_real_positions,
    fidelity_per_position,
)
from kdforge.eval.lm import (
    AnswerCalibration,
    LMAccumulator,
    StreamingReliability,
    answer_calibration,
    evaluate_language_models,
    evaluate_lm_suite,
    exact_match,
    perplexity_from_loglik,
    rouge_l,
)
from kdforge.eval.monitor import (
    HackingCheck,
    TeacherHackingCallback,
    TeacherHackingMonitor,
    detect_teacher_hacking,
)
from kdforge.eval.onpolicy import onpolicy_fidelity, sample_continuations, score_continuations
from kdforge.eval.report import ReportPaths, build_report

__all__ = [
    "FIDELITY_KEYS",
    "AnswerCalibration",
    "FidelityAccumulator",
    "HackingCheck",
    "LMAccumulator",
    "LatencyStats",
    "ReliabilityBins",
    "ReportPaths",
    "StreamingReliability",
    "TeacherHackingCallback",
    "TeacherHackingMonitor",
    "accuracy",
    "answer_calibration",
    "build_report",
    "canary_exposure",
    "classification_metrics",
    "cost_report",
    "count_parameters",
    "detect_teacher_hacking",
    "disk_size_bytes",
    "evaluate_language_models",
    "evaluate_lm_suite",
    "exact_match",
    "expected_calibration_error",
    "exposure",
    "fidelity",
    "fidelity_on_real_positions",
    "fidelity_per_position",
    "kl_to_teacher",
    "measure_latency",
    "onpolicy_fidelity",
    "per_class_accuracy",
    "perplexity_from_loglik",
    "predict_logits",
    "rank_of",
    "reliability_bins",
    "rouge_l",
    "sample_continuations",
    "score_continuations",
    "sequence_log_perplexity",
    "state_dict_bytes",
    "top1_agreement",
]
