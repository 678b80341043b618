""":class:`MutualTeacher`: online / mutual distillation — the teacher is one or more peers that
train together with the student, each learning from the others.

Deep mutual learning (Zhang et al., CVPR 2018) and online KD such as BD-KD (Amara et al., 2022):
no pre-trained teacher; in every optimizer step

* the **student** learns with the trainer's objective from the peers' current predictions (this
  source's signal: one peer's logits, or for a cohort of ``K`` peers the log of their mean
  probability ``log (1/K) sum_k p_k``);
* each **peer** ``i`` learns with its own ``terms`` from the student and the other peers
  (detached): a term that uses no teacher (``cross_entropy``) once, every other term averaged over
  the others, ``L_i = sum_terms w * mean_{j != i} loss(z_i, sg(z_j))``, summed over the step's
  positions and divided by their number (so gradient accumulation gives one big batch).

Both updates belong to the *same* optimizer step and see the same, pre-update predictions: the
peers' losses are backpropagated in :meth:`signal` (right after the student's forward on that
micro-batch, whose logits a forward hook on the student keeps), and the peers' optimizers step in
:meth:`on_step_end`, which the trainer calls after the student's step. The peers' LR follows
``lr_schedule(step)`` (the multiplier of the student's schedule, :func:`kdforge.train.optim.lr_lambda`).

Evaluation forwards (``no_grad`` or the student in eval mode) train nothing: the peers are then run
in eval mode. :meth:`state_dict` carries the peers' weights, their AdamW moments and step counts,
so a resumed run continues bit for bit. Limits: one process (the peers are not synchronised across
ranks); the peers are not listed in :meth:`modules` (the trainer freezes those).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import CheckpointError, ConfigError
from kdforge.teachers.forward import extract_logits
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

__all__ = ["MutualTeacher"]

_PEER, _OPT = "peer.", "opt."


class MutualTeacher(TeacherSource):
    """Peers trained together with the student (see the module docstring).

    Args:
        student: the (unwrapped) student; a forward hook keeps its training logits for the peers.
        peers: one or more models of the same task (any architecture), trained from their current weights.
        terms: each peer's objective (:class:`~kdforge.train.LossTerm` or mappings), e.g.
            ``[{"name": "cross_entropy", "weight": 1.0}, {"name": "forward_kl", "weight": 1.0}]``
            (deep mutual learning) or ``reverse_kl`` as BD-KD's teacher regulariser.
        lr, weight_decay, betas: the peers' AdamW.
        lr_schedule: ``f(step) -> multiplier`` of ``lr`` (default constant 1).

    Example::

        peer = build_vision_model("convnet", channels=[16, 32])
        teacher = MutualTeacher(student, [peer], terms=[{"name": "cross_entropy", "weight": 1.0},
                                                       {"name": "reverse_kl", "weight": 1.0}], lr=3e-3)
        Distiller(student, teacher, task=ClassificationTask(),
                  objective=[{"name": "bdkd", "weight": 1.0}, {"name": "cross_entropy", "weight": 1.0}], ...)
    """

    provides = frozenset({"dense"})
    scores_new_samples = True

    def __init__(self, student: nn.Module, peers: Sequence[nn.Module], *, terms: Sequence[Any],
                 lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 lr_schedule: Callable[[int], float] | None = None) -> None:
        from kdforge.losses import LOSSES
        from kdforge.train.objective import LossTerm

        if not isinstance(student, nn.Module):
            raise ConfigError(f"MutualTeacher needs the student nn.Module, got {type(student).__name__}",
                              "pass the (unwrapped) student model")
        peers = list(peers)
        if not peers or not all(isinstance(p, nn.Module) for p in peers):
            raise ConfigError("MutualTeacher needs at least one peer nn.Module",
                              "pass e.g. peers=[build_vision_model('small_cnn')]")
        self.terms = [t if isinstance(t, LossTerm) else LossTerm(**dict(t)) for t in terms]
        if not self.terms:
            raise ConfigError("the peers' objective has no terms", "pass terms=[{name: cross_entropy, weight: 1.0}, ...]")
        bad = [t.key for t in self.terms if t.source != "loss" or t.scheduled]
        if bad:
            raise ConfigError(f"peer terms {bad} are not plain registered losses with fixed weights",
                              "use registered logit losses (cross_entropy, forward_kl, reverse_kl, ...) with numbers")
        self._fns = [LOSSES.get(t.name) for t in self.terms]
        self.peers = peers
        self.base_lr, self.lr_schedule = float(lr), lr_schedule
        self.optimizers = [torch.optim.AdamW(p.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
                           for p in peers]
        self._set_lr(0)
        self._captured: torch.Tensor | None = None
        self._count = 0  # positions accumulated for the peers' step
        self.steps = 0  # peer optimizer steps taken
        self.last_peer_loss: float | None = None
        self._hook = student.register_forward_hook(self._capture)

    def __repr__(self) -> str:
        return f"MutualTeacher(peers={len(self.peers)}, terms={[t.key for t in self.terms]}, steps={self.steps})"

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._captured = extract_logits(output).detach()

    def _set_lr(self, step: int) -> None:
        factor = self.lr_schedule(step) if self.lr_schedule is not None else 1.0
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.base_lr * factor

    # -- TeacherSource -----------------------------------------------------------------------------
    def place(self, device: torch.device | str) -> None:
        for p in self.peers:
            p.to(device)

    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        """The peers' current predictions; in a training step, also backpropagate the peers' losses."""
        if features is not None:
            raise ConfigError("feature terms are not supported with a MutualTeacher",
                              "remove the feature terms (peers give logits only)")
        args, kwargs = task.model_inputs(batch)
        captured, self._captured = self._captured, None
        if captured is None or not torch.is_grad_enabled():  # evaluation: the peers predict, nothing trains
            with torch.no_grad():
                logits = []
                for p in self.peers:
                    was = p.training
                    p.eval()
                    logits.append(task.to_loss_positions(extract_logits(p(*args, **kwargs)), batch))
                    p.train(was)
            return TeacherSignal(logits=_mixture(logits))
        student = task.to_loss_positions(captured, batch, what="student logits")
        labels, mask = _labels_and_mask(task, batch, student)
        outs = []
        for p in self.peers:
            p.train()
            outs.append(task.to_loss_positions(extract_logits(p(*args, **kwargs)), batch, what="peer logits"))
        total = None
        for i, z in enumerate(outs):
            others = [student] + [o.detach() for j, o in enumerate(outs) if j != i]
            loss_i = None
            for term, fn in zip(self.terms, self._fns):
                if term.weight == 0:
                    continue
                refs = others[:1] if term.name == "cross_entropy" else others
                value = sum(fn(z, ref, labels=labels, mask=mask, reduction="sum", **term.params) for ref in refs)
                value = term.weight * value / len(refs)
                loss_i = value if loss_i is None else loss_i + value
            if loss_i is not None:
                total = loss_i if total is None else total + loss_i
        if total is not None:
            total.backward()
            self.last_peer_loss = float(total.detach()) / max(int(mask.sum()), 1)
        self._count += int(mask.sum())
        return TeacherSignal(logits=_mixture([o.detach() for o in outs]))

    def on_step_end(self, student: nn.Module, step: int) -> None:
        """The peers' optimizer step (gradients divided by the step's position count), then the LR."""
        if self._count == 0:
            return
        for peer, opt in zip(self.peers, self.optimizers):
            for p in peer.parameters():
                if p.grad is not None:
                    p.grad.div_(self._count)
            opt.step()
            opt.zero_grad(set_to_none=True)
        self._count = 0
        self.steps += 1
        self._set_lr(self.steps)

    def remove(self) -> None:
        """Remove the forward hook from the student."""
        self._hook.remove()

    def state_dict(self) -> dict[str, Any]:
        """Flat: peers' tensors (``peer.<i>.<name>``), AdamW state tensors (``opt.<i>.<param>.<key>``),
        and the counters (JSON)."""
        state: dict[str, Any] = {"peers": len(self.peers), "steps": self.steps}
        for i, (peer, opt) in enumerate(zip(self.peers, self.optimizers)):
            for k, v in peer.state_dict().items():
                state[f"{_PEER}{i}.{k}"] = v.detach().to("cpu", copy=True)
            for pid, st in opt.state_dict()["state"].items():
                for k, v in st.items():
                    state[f"{_OPT}{i}.{pid}.{k}"] = (v.detach().to("cpu", copy=True) if torch.is_tensor(v)
                                                     else torch.tensor(v))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("peers") != len(self.peers):
            raise CheckpointError(f"the checkpoint holds {state.get('peers')} mutual peers, this run {len(self.peers)}",
                                  "resume with the same peers the run was started with")
        for i, (peer, opt) in enumerate(zip(self.peers, self.optimizers)):
            prefix = f"{_PEER}{i}."
            try:
                peer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            except RuntimeError as exc:
                raise CheckpointError(f"the checkpoint's peer {i} does not fit: {str(exc).splitlines()[0]}",
                                      "resume with the same peer architectures") from None
            saved = opt.state_dict()
            prefix = f"{_OPT}{i}."
            per_param: dict[int, dict[str, Any]] = {}
            for k, v in state.items():
                if k.startswith(prefix):
                    pid, name = k[len(prefix):].split(".", 1)
                    device = next(peer.parameters()).device
                    per_param.setdefault(int(pid), {})[name] = v.to(device) if name != "step" else v.clone()
            saved["state"] = per_param
            opt.load_state_dict(saved)
        self.steps = int(state["steps"])
        self._count = 0
        self._set_lr(self.steps)


def _labels_and_mask(task: Any, batch: Mapping[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor | None,
                                                                                          torch.Tensor]:
    """The task's labels at the loss positions and its real-position mask (a classifier: every sample)."""
    shifted = getattr(task, "shifted_labels", None)
    if callable(shifted):
        labels = shifted(batch).to(logits.device)
        return labels, labels != IGNORE_INDEX
    labels = batch.get(getattr(task, "label_key", "labels"))
    if torch.is_tensor(labels):
        labels = labels.to(logits.device).long()
    return labels, torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)


def _mixture(logits: list[torch.Tensor]) -> torch.Tensor:
    """One peer's logits as they are; several peers' mean probability, as log-probabilities."""
    if len(logits) == 1:
        return logits[0]
    stacked = torch.stack([torch.log_softmax(z.float(), -1) for z in logits])
    return torch.logsumexp(stacked, 0) - torch.log(torch.tensor(float(len(logits))))
