"""Classification metrics: accuracy, agreement with a teacher, calibration, per-class accuracy.

Everything works on logits ``[N, C]`` (or predictions ``[N]``) and labels ``int64 [N]``; rows
whose label is ``ignore_index`` (-100) are skipped. Inputs may live on any device and in any
float dtype (bf16 included): metrics are computed in float32 and returned as Python numbers.

Calibration follows Guo et al. 2017, "On Calibration of Modern Neural Networks": the top-1
confidence ``c_i = max_k softmax(z_i)_k`` is put into ``M`` equal-width bins over [0, 1]
(bin ``m`` holds ``c`` in ``((m-1)/M, m/M]``, the first bin also holds 0), and

    ECE = sum_m |B_m| / N * | acc(B_m) - conf(B_m) |

with ``acc`` the fraction of correct top-1 predictions in the bin and ``conf`` their mean
confidence. ``M = 15`` is the standard choice (and what FIRST and BD-KD report).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ShapeError


def _as_preds(logits_or_preds: torch.Tensor) -> torch.Tensor:
    if logits_or_preds.ndim == 2:
        return logits_or_preds.argmax(-1)
    if logits_or_preds.ndim == 1:
        return logits_or_preds.long()
    raise ShapeError(
        f"expected logits [N, C] or predictions [N], got {tuple(logits_or_preds.shape)}",
        "flatten sequence dimensions first, e.g. logits.reshape(-1, C)",
    )


def _keep(labels: torch.Tensor, n: int, ignore_index: int) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ShapeError(f"labels must be [N] with N={n}, got {tuple(labels.shape)}", "pass one label per row")
    return labels != ignore_index


def accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of rows whose top-1 prediction equals the label (``nan`` if no labelled row)."""
    preds = _as_preds(logits_or_preds)
    keep = _keep(labels, preds.shape[0], ignore_index)
    if not keep.any():
        return math.nan
    return (preds[keep] == labels[keep].to(preds.device)).float().mean().item()


def top1_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Fraction of rows where student and teacher predict the same class (logits or predictions)."""
    s, t = _as_preds(student), _as_preds(teacher)
    if s.shape != t.shape:
        raise ShapeError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} rows differ", "evaluate both on the same inputs")
    if s.numel() == 0:
        return math.nan
    return (s == t.to(s.device)).float().mean().item()


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean over rows of ``KL(p_teacher || p_student)`` at ``temperature`` (nats)."""
    if student_logits.shape != teacher_logits.shape:
        raise ShapeError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ",
            "evaluate both on the same inputs with the same classes",
        )
    log_q = torch.log_softmax(student_logits.float() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.float().to(log_q.device) / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram (equal-width bins over [0, 1]).

    ``confidence[m]`` / ``accuracy[m]`` are ``nan`` for an empty bin (``count[m] == 0``).
    """

    lower: list[float]
    upper: list[float]
    confidence: list[float]
    accuracy: list[float]
    count: list[int]

    @property
    def ece(self) -> float:
        total = sum(self.count)
        if total == 0:
            return math.nan
        return sum(n / total * abs(a - c) for a, c, n in zip(self.accuracy, self.confidence, self.count) if n)

    def to_dict(self) -> dict[str, list]:
        """JSON-friendly dict (``None`` for empty bins), keys as in ``docs/run-format.md``."""
        def clean(xs: list[float]) -> list[float | None]:
            return [None if math.isnan(x) else x for x in xs]

        d = asdict(self)
        return {
            "bin_lower": d["lower"],
            "bin_upper": d["upper"],
            "bin_confidence": clean(d["confidence"]),
            "bin_accuracy": clean(d["accuracy"]),
            "bin_count": d["count"],
        }


def reliability_bins(
    logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15, ignore_index: int = IGNORE_INDEX
) -> ReliabilityBins:
    """Bin the top-1 confidence of ``logits [N, C]`` into ``n_bins`` equal-width bins.

    A confidence ``c`` goes to bin ``ceil(c * n_bins) - 1`` (clamped to ``[0, n_bins-1]``), i.e.
    bins are right-closed ``(lo, hi]`` as in Guo et al. 2017.
    """
    if logits.ndim != 2:
        raise ShapeError(f"expected logits [N, C], got {tuple(logits.shape)}", "flatten extra dimensions first")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    keep = _keep(labels, logits.shape[0], ignore_index)
    probs = torch.softmax(logits[keep].float(), -1)
    conf, preds = probs.max(-1)
    correct = (preds == labels[keep].to(preds.device)).float()
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.bincount(idx, minlength=n_bins).float()
    conf_sum = torch.zeros(n_bins, device=conf.device).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, device=conf.device).index_add_(0, idx, correct)
    nan = torch.full_like(count, math.nan)
    nonempty = count > 0
    return ReliabilityBins(
        lower=[m / n_bins for m in range(n_bins)],
        upper=[(m + 1) / n_bins for m in range(n_bins)],
        confidence=torch.where(nonempty, conf_sum / count.clamp_min(1), nan).tolist(),
        accuracy=torch.where(nonempty, acc_sum / count.clamp_min(1), nan).tolist(),
        count=[int(c) for c in count.tolist()],
    )


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15, ignore_index: int = IGNORE_INDEX
) -> float:
    """ECE of the top-1 confidence with ``n_bins`` equal-width bins (see module docstring)."""
    return reliability_bins(logits, labels, n_bins=n_bins, ignore_index=ignore_index).ece


def per_class_accuracy(
    logits_or_preds: torch.Tensor, labels: torch.Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX
) -> list[float]:
    """Recall per class: ``acc[c] = #(pred == c and label == c) / #(label == c)``; ``nan`` if absent."""
    preds = _as_preds(logits_or_preds)
    keep = _keep(labels, preds.shape[0], ignore_index)
    y, p = labels[keep].to(preds.device), preds[keep]
    total = torch.bincount(y, minlength=num_classes).float()
    hit = torch.bincount(y[p == y], minlength=num_classes).float()
    return torch.where(total > 0, hit / total.clamp_min(1), torch.full_like(total, math.nan)).tolist()


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    n_bins: int = 15,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, object]:
    """All of the above in one dict.

    Returns keys ``accuracy``, ``ece``, ``nll`` (mean cross-entropy), ``per_class_accuracy``,
    ``reliability`` (see :meth:`ReliabilityBins.to_dict`) and, with ``teacher_logits``,
    ``agreement`` and ``kl_to_teacher``.
    """
    keep = _keep(labels, logits.shape[0], ignore_index)
    bins = reliability_bins(logits, labels, n_bins=n_bins, ignore_index=ignore_index)
    out: dict[str, object] = {
        "accuracy": accuracy(logits, labels, ignore_index=ignore_index),
        "ece": bins.ece,
        "nll": torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep].to(logits.device)).item()
        if keep.any()
        else math.nan,
        "per_class_accuracy": per_class_accuracy(logits, labels, logits.shape[-1], ignore_index=ignore_index),
        "reliability": bins.to_dict(),
    }
    if teacher_logits is not None:
        out["agreement"] = top1_agreement(logits, teacher_logits)
        out["kl_to_teacher"] = kl_to_teacher(logits, teacher_logits)
    return out


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run ``model`` in eval mode over ``inputs [N, ...]`` in batches; return float32 CPU logits ``[N, C]``.

    The model's training mode is restored afterwards. ``device`` defaults to the model's device.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        outs = [model(inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)
