"""Checkers shared by the recipes' pre-flight checks (:meth:`kdforge.recipes.Recipe.check`).

Each checker looks at one kind of thing a config names and records what is wrong in a
:class:`~kdforge.preflight.problems.Problems` collector, keyed by the config path; none of them
trains, loads weights or writes into the run folder:

* :func:`check_objective` — every term of a method's objective: the loss name and params through
  the loss registry, the schedules, and one call of each loss on a tiny synthetic batch with the
  teacher signal the method will get (dense logits, or a cached top-k with or without a sampled
  tail), so a bad parameter *value* or a loss that cannot read a top-k cache is found before the
  teacher is loaded;
* :func:`check_model_ref` / :func:`check_model_source` — an offline asset name, a local folder,
  or a Hub id (the local Hub cache first, then offline mode or an unreachable Hub detected in
  seconds, never minutes of retries), and the model's device, device_map and dtype;
* :func:`check_device` / :func:`check_dtype` — the device exists, the dtype works there;
* :func:`check_output_dir` — the output folder can be written (whether the disk holds what the
  run writes is :func:`kdforge.preflight.fits.check_free_disk`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from kdforge.errors import KdforgeError
from kdforge.preflight.problems import Problems

__all__ = ["ModelRef", "check_device", "check_dtype", "check_model_ref", "check_model_source", "check_objective",
           "check_output_dir", "check_trackers", "nearest_existing", "random_signal"]

TeacherSignal = Literal["dense", "sparse", "none"]

# ------------------------------------------------------------------------------------------
# losses


def check_objective(problems: Problems, key: str, terms: Sequence[Any], *, teacher: TeacherSignal = "dense",
                    k: int | None = None, tail_samples: int = 0, chunked: bool | str = False,
                    max_steps: int = 1, vocab_size: int = 16) -> None:
    """Check one method's objective (``terms`` are :class:`~kdforge.train.LossTerm`).

    Builds the :class:`~kdforge.train.Objective` (term keys, chunkability), resolves its
    schedules at step 0, validates every registered loss's params through the loss registry (its
    spec's param model where the registry has one), and calls each loss once on a batch of
    ``[2, 3, vocab_size]`` random logits with the signal the trainer will pass: dense teacher
    logits, a top-``k`` :class:`~kdforge.losses.signal.SparseTeacher` (``teacher="sparse"``; with
    ``tail_samples`` sampled tail entries), or nothing (labels only).
    """
    import torch

    from kdforge.train.objective import Objective

    try:
        objective = Objective(list(terms), chunked=chunked)
    except KdforgeError as exc:
        problems.add(key, exc.problem, exc.fix)
        return
    values: Mapping[str, float] = {}
    with problems.catch(key):
        values = objective.schedules(max(1, max_steps)).current(0)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, vocab_size, generator=gen)
    labels = torch.randint(0, vocab_size, (2, 3), generator=gen)
    mask = torch.ones(2, 3, dtype=torch.bool)
    signal = random_signal(teacher, torch.randn(2, 3, vocab_size, generator=gen), k, tail_samples)
    from kdforge.losses import LOSSES
    from kdforge.losses.dac_clip import with_stand_in_net

    on = ((f" on the top-{k} teacher cache" if k else " on the teacher cache")
          + (f" with {tail_samples} sampled tail entries" if tail_samples else "") if teacher == "sparse" else "")
    for i, term in enumerate(objective.terms):
        if term.source != "loss":
            continue
        where = f"{key}.{i}"
        if not _params_valid(problems, where, term.name, term.params):
            continue
        try:
            weight, params = term.current(values)
            if teacher == "none" and LOSSES.get(term.name).needs_teacher:
                problems.add(where, f"loss {term.name!r} needs a teacher signal, but this method has none",
                             "use cross_entropy only, or give the method a teacher")
                continue
            params = with_stand_in_net(term.name, params)  # dac_kl learned: true (the recipes attach the net)
            value = LOSSES.get(term.name)(student, signal, mask=mask, labels=labels, reduction="sum", **params)
            if not torch.isfinite(value).all():
                problems.add(where, f"loss {term.name!r} with params {params} is not finite on a random batch",
                             "check the params (temperature > 0, coefficients in range)")
        except KdforgeError as exc:
            problems.add(where, f"loss {term.name!r}{on}: {exc.problem}", exc.fix)
        except (ValueError, TypeError, RuntimeError) as exc:
            problems.add(where, f"loss {term.name!r} with params {dict(term.params)} fails: {exc}",
                         "fix the params (`kdforge losses` lists each loss and its parameters)")


def _params_valid(problems: Problems, key: str, name: str, params: Mapping[str, Any]) -> bool:
    """Params through the loss spec's model, where the registry has specs (kdforge.losses.spec)."""
    try:
        from kdforge.losses.spec import loss_spec  # type: ignore[import-not-found]
    except ImportError:
        return True
    try:
        loss_spec(name).validate_params(dict(params))
    except KdforgeError as exc:
        problems.add(key, f"loss {name!r}: {exc.problem}", exc.fix)
        return False
    except ValueError as exc:
        problems.add(key, f"loss {name!r} params: {exc}", "`kdforge losses` lists each loss and its parameters")
        return False
    return True


def random_signal(kind: TeacherSignal, logits: Any, k: int | None, tail_samples: int = 0) -> Any:
    """The teacher signal a loss receives, made from ``logits``: the logits (``dense``), their
    top-``k`` :class:`~kdforge.losses.signal.SparseTeacher` with ``tail_samples`` tail entries
    weighted ``r / m`` (``sparse``), or None (``none``)."""
    if kind == "none":
        return None
    if kind == "dense":
        return logits
    import torch

    from kdforge.losses.signal import SparseTeacher

    vocab = logits.shape[-1]
    k = max(1, min(k or 1, vocab - 1))
    logp = torch.log_softmax(logits, -1)
    order = logp.argsort(-1, descending=True)
    ids = order[..., :k]
    lp = logp.gather(-1, ids)
    if not tail_samples:
        return SparseTeacher(ids, lp, vocab)
    m = max(1, min(tail_samples, vocab - k))  # one draw of each of the next m ids: weights r / m
    tail_ids = order[..., k:k + m]
    rest = torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    tail_lp = (rest - torch.log(torch.tensor(float(m)))).expand_as(tail_ids.float())
    return SparseTeacher(torch.cat([ids, tail_ids], -1), torch.cat([lp, tail_lp], -1), vocab, num_exact=k)


# ------------------------------------------------------------------------------------------
# models

ModelRef = Literal["asset", "folder", "hub", "missing"]


def check_model_ref(problems: Problems, key: str, spec: str, *, revision: str | None = None,
                    needs: Sequence[str] = ("config.json",)) -> ModelRef:
    """Is ``spec`` an offline asset name, a local model folder, or a Hub id this machine can get?

    Names are classified by :func:`kdforge.models.classify_model_name`. A Hub id is looked up in
    the local Hub cache first; when it is not there, the Hub must be reachable: offline mode
    (``HF_HUB_OFFLINE=1``) or an endpoint that does not answer within seconds
    (:func:`kdforge.data.sources.hub_offline_reason`) is reported at once, with the fix, instead
    of minutes of retries at load time.
    """
    from kdforge.models import classify_model_name

    if Path(spec).expanduser().is_file():
        problems.add(key, f"{spec!r} is a file, not a model folder",
                     "point it at the folder that holds config.json and the weights")
        return "missing"
    try:
        kind = classify_model_name(spec)
    except KdforgeError as exc:
        problems.add(key, exc.problem, exc.fix)
        return "missing"
    if kind == "asset":
        return "asset"
    if kind == "local":
        missing = [n for n in needs if not (Path(spec).expanduser() / n).is_file()]
        if missing:
            problems.add(key, f"folder {spec!r} has no {', '.join(missing)}: not a Hugging Face model folder",
                         "point it at a folder written by save_pretrained (config.json, weights, tokenizer)")
            return "missing"
        return "folder"
    if _hub_cached(spec, revision):
        return "hub"
    from kdforge.data.sources import hub_offline_reason

    reason = hub_offline_reason()
    if reason is not None:
        problems.add(key, f"{spec!r} is a Hub id that is not in the local Hub cache, and the Hub cannot be "
                          f"reached: {reason}",
                     "download it where there is a network (`hf download ID`) and point at that folder, use "
                     "an offline asset (`kdforge assets list`), or run with network access")
        return "missing"
    return "hub"


def check_model_source(problems: Problems, key: str, source: Any) -> ModelRef:
    """A :class:`kdforge.models.ModelSource` (teacher, pretrained student): the name
    (:func:`check_model_ref`), ``revision`` only for a Hub id, ``device``, ``device_map`` and
    ``dtype`` on this machine."""
    kind = check_model_ref(problems, f"{key}.model", source.model, revision=getattr(source, "revision", None))
    if kind != "missing" and getattr(source, "revision", None) is not None and kind != "hub":
        problems.add(f"{key}.revision", f"revision {source.revision!r} is set, but {source.model!r} is a local "
                                        f"{'asset' if kind == 'asset' else 'folder'}, which has no revisions",
                     "remove revision, or give a Hub id")
    device = getattr(source, "device", None)
    check_device(problems, f"{key}.device", device)
    if getattr(source, "device_map", None) is not None:
        from kdforge.models import check_device_map

        with problems.catch(f"{key}.device_map"):
            check_device_map(source)
    check_dtype(problems, f"{key}.dtype", getattr(source, "dtype", None), device)
    return kind


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False
    return isinstance(found, str)


# ------------------------------------------------------------------------------------------
# devices and dtypes


def check_device(problems: Problems, key: str, device: str | None) -> None:
    """``auto``/None, ``cpu``, ``cuda[:N]``, ``mps``: the device must exist on this machine
    (:func:`kdforge.models.resolve_device`)."""
    if device in (None, "auto", "cpu"):
        return
    from kdforge.models import resolve_device

    with problems.catch(key):
        resolve_device(str(device))


def check_dtype(problems: Problems, key: str, dtype: str | None, device: str | None = None) -> None:
    """The dtype works on the device: bf16 needs a CPU or a GPU that supports it; fp16 a GPU."""
    import torch

    if dtype in (None, "auto", "float32"):
        return
    on_cuda = (device or "auto") in ("auto",) and torch.cuda.is_available() or str(device).startswith("cuda")
    if dtype == "bfloat16" and on_cuda and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        problems.add(key, "dtype bfloat16, but this GPU does not support bf16", "use float16 or float32")
    if dtype == "float16" and not on_cuda:
        problems.add(key, "dtype float16 on the CPU (slow, and many CPU kernels lack fp16)",
                     "use bfloat16 or float32 on the CPU")


# ------------------------------------------------------------------------------------------
# output folder and disk


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(problems: Problems, key: str, path: Path) -> None:
    """The output folder (or the closest existing folder above it) can be written by this user."""
    existing = nearest_existing(path)
    if existing != Path(os.path.abspath(path)) and not existing.is_dir():
        problems.add(key, f"{existing} is a file, so the output folder {path} cannot be created under it",
                     "choose another output folder (-o NEW_DIR)")
        return
    if existing == Path(os.path.abspath(path)) and not existing.is_dir():
        problems.add(key, f"output path {path} exists and is not a folder", "choose another folder with -o")
        return
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the output folder" if existing == Path(os.path.abspath(path)) else f"{existing}, where it would be created,"
        problems.add(key, f"{what} is not writable ({path})",
                     "make it writable (chmod/chown), or write somewhere else with -o NEW_DIR")


# ------------------------------------------------------------------------------------------
# trackers


def check_trackers(problems: Problems, key: str, log_with: str | Sequence[str] | None) -> None:
    """Every tracker of ``train.log_with`` is one accelerate knows and is installed."""
    from kdforge.train.tracking import tracker_problems

    for problem, fix in tracker_problems(log_with):
        problems.add(key, problem, fix)
