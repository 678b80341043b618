"""DDK domain reweighting (Liu et al., 2024, "DDK: Distilling Domain Knowledge for Efficient LLMs").

A multi-domain corpus is sampled with domain weights ``w`` that follow the student's deficit:
every ``update_every`` optimizer steps the student's and the teacher's cross-entropy are
measured per domain on held-out data (``l_S[i]``, ``l_T[i]``) and the weights move toward the
domains where the student lags the teacher most, smoothly:

    d[i]   = l_S[i] / l_T[i]                      (discrepancy; "difference": l_S[i] - l_T[i])
    psi[i] = w[i] * exp(d[i])                     (the paper's domain discrepancy factor,
                                                    applied to the current mixture)
    w'[i]  = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N     (factor smooth updating)

``alpha`` (the paper's smoothing factor, 0.5 by default) bounds how far one update moves the
mixture: the reweighting by ``exp(d)`` moves at most ``tanh(Δ/2)`` of the probability mass
(``Δ = max d - min d``), of which ``alpha`` is applied, and the ``(1 - alpha)/N`` floor keeps
every domain sampled. Equal discrepancies leave a uniform mixture uniform (and pull any
other mixture geometrically toward uniform).

Pieces:

- :func:`ddk_update`: the update above (pure; property-tested);
- :class:`DDKSampler`: the trainer's sampler (``Distiller(sampler=...)``): draw ``p`` of epoch
  ``e`` picks a domain with the current weights and an example of it uniformly, from a
  generator seeded by ``(seed, epoch, rank, p)``, so a run resumes mid-epoch exactly; its
  ``state_dict`` (weights, the teacher's per-domain losses, the history) is checkpointed by
  the trainer;
- :class:`DDKCallback` (``sampler.callback``, pass it in ``callbacks=``): measures the gaps on
  the held-out sets every ``update_every`` steps, updates the sampler, adds
  ``ddk/weight/<domain>`` to the train logs (``metrics.jsonl``) and writes
  ``RUN_DIR/ddk_weights.json`` + ``ddk_weights.png`` at the end.

The weights are read when a batch is drawn, so use ``num_workers=0`` (the default) for updates
to take effect on the next batch and for an exact resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from kdforge.config import StrictModel
from kdforge.errors import CheckpointError, ConfigError, DataError
from kdforge.io import write_json_atomic
from kdforge.train.callbacks import Callback, TrainerState

log = logging.getLogger(__name__)

__all__ = ["DDKCallback", "DDKConfig", "DDKSampler", "ddk_update", "domain_losses", "plot_ddk_weights"]


def ddk_update(weights: Sequence[float], student_loss: Sequence[float], teacher_loss: Sequence[float], *,
               alpha: float = 0.5, discrepancy: Literal["ratio", "difference"] = "ratio") -> list[float]:
    """One DDK update of the domain weights (formula in the module docstring).

    Args:
        weights: the current mixture ``[N]`` (sums to 1).
        student_loss, teacher_loss: per-domain held-out cross-entropy ``[N]`` (nats/position).
        alpha: smoothing factor in ``[0, 1]``: 0 = uniform always, 1 = no floor.
        discrepancy: ``ratio`` (the paper's ``l_S / l_T``) or ``difference`` (``l_S - l_T``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"DDK alpha must be in [0, 1], got {alpha}", "the paper uses 0.5")
    w = np.asarray(weights, dtype=np.float64)
    s, t = np.asarray(student_loss, dtype=np.float64), np.asarray(teacher_loss, dtype=np.float64)
    if not (w.shape == s.shape == t.shape) or w.ndim != 1 or w.size == 0:
        raise ConfigError(f"DDK needs one weight and two losses per domain, got shapes {w.shape}, {s.shape}, "
                          f"{t.shape}", "measure every domain")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        raise DataError(f"non-finite domain loss (student {s.tolist()}, teacher {t.tolist()})",
                        "check that every held-out domain set has real (non-ignored) positions")
    if discrepancy == "ratio":
        if np.any(t <= 0):
            raise DataError(f"teacher domain loss {t.tolist()} must be > 0 for the ratio discrepancy",
                            "use discrepancy='difference'")
        d = s / t
    elif discrepancy == "difference":
        d = s - t
    else:
        raise ConfigError(f"unknown DDK discrepancy {discrepancy!r}", "use 'ratio' or 'difference'")
    logpsi = np.log(np.maximum(w, 1e-300)) + (d - d.max())  # shifted: exp never overflows
    psi = np.exp(logpsi)
    new = alpha * psi / psi.sum() + (1.0 - alpha) / w.size
    return (new / new.sum()).tolist()


class DDKConfig(StrictModel):
    """The YAML block of a DDK sampler (e.g. a recipe's ``sampler: {ddk: {...}}``); build the
    sampler with :meth:`DDKSampler.from_config`."""

    update_every: int = Field(100, ge=1, description="optimizer steps between weight updates (the paper's K)")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="smoothing factor: weight of the new factor vs uniform")
    discrepancy: Literal["ratio", "difference"] = Field("ratio", description="l_S/l_T (paper) or l_S-l_T")
    eval_batches: int | None = Field(None, ge=1, description="held-out batches per domain per measurement")
    epoch_size: int | None = Field(None, ge=1, description="draws per epoch (default: the dataset length)")
    initial_weights: dict[str, float] | None = Field(None, description="starting mixture (default uniform)")


class DDKSampler:
    """Domain-weighted sampler over a multi-domain dataset; weights follow :func:`ddk_update`.

    Args:
        domains: the domain of each training example (``len(domains) == len(train_data)``).
        eval_data: ``{domain: held-out dataset}`` (same item format as the training data); every
            domain of ``domains`` needs one.
        update_every: optimizer steps between updates (the paper's K).
        alpha: smoothing factor (:func:`ddk_update`); ``discrepancy``: ``ratio`` or ``difference``.
        initial_weights: ``{domain: weight}`` (default uniform).
        epoch_size: draws per epoch over all ranks (default: the dataset length).
        eval_batches: batches of each held-out set per measurement (default all).
        teacher_loss: ``{domain: teacher's held-out cross-entropy}`` measured elsewhere (a served
            or cached teacher, or once offline); default: measured with the trainer's live teacher
            at the first update.
        seed, num_replicas, rank: as :class:`~kdforge.train.sampler.EpochSampler`.
    """

    def __init__(self, domains: Sequence[Any], eval_data: Mapping[Any, Any], *, update_every: int = 100,
                 alpha: float = 0.5, discrepancy: Literal["ratio", "difference"] = "ratio",
                 initial_weights: Mapping[Any, float] | None = None, epoch_size: int | None = None,
                 eval_batches: int | None = None, teacher_loss: Mapping[Any, float] | None = None,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if update_every < 1:
            raise ConfigError(f"DDK update_every must be >= 1, got {update_every}", "e.g. 100 steps")
        if discrepancy not in ("ratio", "difference"):
            raise ConfigError(f"unknown DDK discrepancy {discrepancy!r}", "use 'ratio' or 'difference'")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"DDK alpha must be in [0, 1], got {alpha}", "the paper uses 0.5")
        labels = [str(d) for d in domains]
        self.names: list[str] = sorted(set(labels))
        if not self.names:
            raise DataError("DDKSampler got no examples", "pass the domain of every training example")
        by_name = {str(k): v for k, v in eval_data.items()}
        missing = [n for n in self.names if n not in by_name]
        if missing:
            raise ConfigError(f"DDK has no held-out data for domains {missing}",
                              "pass eval_data={domain: dataset} for every domain of the training data")
        self.eval_data = {n: by_name[n] for n in self.names}
        pos = {n: i for i, n in enumerate(self.names)}
        self.members = [np.array([i for i, lab in enumerate(labels) if lab == n], dtype=np.int64) for n in self.names]
        self.domain_of = np.array([pos[lab] for lab in labels], dtype=np.int64)
        if initial_weights is None:
            w = np.full(len(self.names), 1.0 / len(self.names))
        else:
            start = {str(k): float(v) for k, v in initial_weights.items()}
            unknown = sorted(set(start) - set(self.names))
            if unknown:
                raise ConfigError(f"initial_weights name unknown domains {unknown}", f"use {self.names}")
            w = np.array([start.get(n, 0.0) for n in self.names])
            if np.any(w < 0) or w.sum() <= 0:
                raise ConfigError(f"initial_weights must be >= 0 with a positive sum, got {w.tolist()}",
                                  "give each domain a non-negative weight")
            w = w / w.sum()
        self.weights: list[float] = w.tolist()
        self.update_every, self.alpha, self.discrepancy = int(update_every), float(alpha), discrepancy
        self.eval_batches = eval_batches
        self.num_examples = len(labels)
        self.epoch_size = int(epoch_size) if epoch_size is not None else self.num_examples
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.epoch, self.start = 0, 0
        self.teacher_loss: list[float] | None = None
        if teacher_loss is not None:
            given = {str(k): float(v) for k, v in teacher_loss.items()}
            if sorted(given) != self.names:
                raise ConfigError(f"teacher_loss names domains {sorted(given)}, the data has {self.names}",
                                  "give the teacher's loss for every domain")
            self.teacher_loss = [given[n] for n in self.names]
        self.history: list[dict[str, Any]] = [{"step": 0, "weights": list(self.weights)}]
        self.callback = DDKCallback(self)

    @classmethod
    def from_config(cls, config: DDKConfig | Mapping[str, Any], domains: Sequence[Any], eval_data: Mapping[Any, Any],
                    **kwargs: Any) -> DDKSampler:
        """A sampler from a :class:`DDKConfig` (or its YAML mapping); ``kwargs``: ``seed``,
        ``num_replicas``, ``rank``, ``teacher_loss``."""
        from kdforge.config import validate

        cfg = config if isinstance(config, DDKConfig) else validate(DDKConfig, dict(config), source="ddk sampler")
        return cls(domains, eval_data, **cfg.model_dump(), **kwargs)

    # -- the sampler protocol (kdforge.train.stream) -----------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    @property
    def per_rank(self) -> int:
        return math.ceil(self.epoch_size / self.num_replicas) if self.epoch_size else 0

    def draw(self, epoch: int, position: int) -> int:
        """The example index of draw ``position`` of ``epoch`` on this rank, with the current weights."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, position])
        w = np.asarray(self.weights, dtype=np.float64)
        domain = int(np.searchsorted(np.cumsum(w / w.sum()), rng.random(), side="right"))
        domain = min(domain, len(w) - 1)
        members = self.members[domain]
        return int(members[rng.integers(len(members))])

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        for p in range(self.start, self.per_rank):
            yield self.draw(epoch, p)  # weights are read now: an update applies to the next batch

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    # -- updates -------------------------------------------------------------------------------------
    def update(self, student_loss: Sequence[float], teacher_loss: Sequence[float], step: int) -> list[float]:
        """Apply :func:`ddk_update` and record it in :attr:`history`."""
        self.weights = ddk_update(self.weights, student_loss, teacher_loss, alpha=self.alpha,
                                  discrepancy=self.discrepancy)
        self.history.append({"step": int(step), "weights": list(self.weights),
                             "student_loss": [float(x) for x in student_loss],
                             "teacher_loss": [float(x) for x in teacher_loss]})
        log.info("DDK step %d: weights %s", step, " ".join(f"{n}={w:.3f}" for n, w in zip(self.names, self.weights)))
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"domains": list(self.names), "weights": list(self.weights), "teacher_loss": self.teacher_loss,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("domains", [])) != self.names:
            raise CheckpointError(f"the checkpoint's DDK domains {state.get('domains')} differ from this run's "
                                  f"{self.names}", "resume with the same multi-domain training data")
        self.weights = [float(x) for x in state["weights"]]
        self.teacher_loss = None if state.get("teacher_loss") is None else [float(x) for x in state["teacher_loss"]]
        self.history = [dict(h) for h in state.get("history", [])]


def domain_losses(trainer: Any, datasets: Mapping[str, Any], *, teacher: bool, max_batches: int | None = None
                  ) -> dict[str, tuple[float, float | None]]:
    """Mean held-out cross-entropy (nats per real position) of the student and, with ``teacher``,
    of the trainer's teacher, per domain: ``{domain: (student, teacher or None)}``.

    Uses the trainer's task, collate function, batch size and vocabulary policy; the student runs
    in eval mode without gradient. Every process measures the full sets (same result everywhere).
    """
    from accelerate.utils import send_to_device

    from kdforge.losses import cross_entropy
    from kdforge.train.sampler import EpochSampler
    from kdforge.train.stream import dataset_of
    from kdforge.train.tasks import attach_teacher

    source = trainer.teacher_source if teacher else None
    if teacher and source is None:
        raise ConfigError("DDK measures the teacher's loss per domain, but the trainer has no teacher",
                          "pass a live teacher (a model or OnlineTeacher) to the Distiller")
    student = trainer.accelerator.unwrap_model(trainer.student)
    training = student.training
    student.eval()
    out: dict[str, tuple[float, float | None]] = {}
    try:
        with torch.no_grad():
            for name, data in datasets.items():
                dataset, collate = dataset_of(data, trainer.collate_fn, f"DDK held-out data of {name!r}")
                loader = trainer.stream.loader(dataset, EpochSampler(len(dataset), shuffle=False), collate)
                s_sum = t_sum = count = 0.0
                for b, batch in enumerate(loader):
                    if max_batches is not None and b >= max_batches:
                        break
                    batch = send_to_device(batch, trainer.accelerator.device)
                    res = attach_teacher(trainer.task, student, source, batch, chunked=False,
                                         vocab_policy=trainer.vocab_policy)
                    if res.labels is None:
                        raise ConfigError("DDK needs labels (next tokens or classes) to measure losses",
                                          "use a task whose batches carry labels")
                    s_sum += float(cross_entropy(res.student_logits, None, labels=res.labels, mask=res.mask,
                                                 reduction="sum"))
                    if teacher:
                        if not torch.is_tensor(res.teacher):
                            raise ConfigError("DDK needs the teacher's full logits to measure its loss; the "
                                              "teacher signal is a sparse top-k cache",
                                              "use a live teacher for DDK")
                        t_sum += float(cross_entropy(res.teacher.float(), None, labels=res.labels, mask=res.mask,
                                                     reduction="sum"))
                    count += float((res.mask & (res.labels != -100)).sum())
                if count == 0:
                    raise DataError(f"the DDK held-out data of domain {name!r} has no labelled positions",
                                    "give every domain held-out examples with real targets")
                out[name] = (s_sum / count, t_sum / count if teacher else None)
    finally:
        student.train(training)
    return out


class DDKCallback(Callback):
    """Measures the per-domain gaps every ``update_every`` steps and updates its :class:`DDKSampler`
    (built by the sampler: ``sampler.callback``). Stateless: the sampler holds the state."""

    def __init__(self, sampler: DDKSampler) -> None:
        self.sampler = sampler

    def on_train_begin(self, state: TrainerState) -> None:
        trainer = self.context.trainer if self.context is not None else None
        if trainer is not None and trainer.sampler is not self.sampler:
            raise ConfigError("the DDK callback is attached, but the trainer samples with another sampler",
                              "pass the same DDKSampler as Distiller(sampler=ddk, callbacks=[ddk.callback])")

    def on_step_end(self, state: TrainerState, logs: dict[str, Any] | None) -> None:
        s = self.sampler
        if state.step % s.update_every == 0 and self.context is not None:
            trainer = self.context.trainer
            need_teacher = s.teacher_loss is None  # a frozen teacher is measured once
            losses = domain_losses(trainer, s.eval_data, teacher=need_teacher, max_batches=s.eval_batches)
            if need_teacher:
                s.teacher_loss = [float(losses[n][1]) for n in s.names]  # type: ignore[arg-type]
            s.update([losses[n][0] for n in s.names], s.teacher_loss, state.step)  # type: ignore[arg-type]
        if logs is not None:
            logs.update({f"ddk/weight/{n}": w for n, w in zip(s.names, s.weights)})

    def on_train_end(self, state: TrainerState) -> None:
        if state.run_dir is None or not state.is_main_process:
            return
        write_json_atomic(Path(state.run_dir) / "ddk_weights.json",
                          {"domains": self.sampler.names, "history": self.sampler.history})
        try:
            plot_ddk_weights(self.sampler.names, self.sampler.history, Path(state.run_dir) / "ddk_weights.png")
        except Exception as exc:  # a plot never fails a run
            log.warning("could not plot the DDK weights: %s", exc)


def plot_ddk_weights(names: Sequence[str], history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A step plot of the domain weights over training (one line per domain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, name in enumerate(names):
        ax.step(steps, [h["weights"][i] for h in history], where="post", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sampling weight")
    ax.set_title("DDK domain weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
