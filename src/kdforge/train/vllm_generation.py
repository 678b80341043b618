"""Student sampling for on-policy distillation with a colocated vLLM engine and weight sync.

:class:`VLLMGenerator` is a :class:`~kdforge.train.generation.GenerateFn`: GKD's student samples
come from a ``vllm.LLM`` that lives in the training process (colocated, tensor-parallel size 1,
one engine per process and per model) instead of Hugging Face ``generate``. Because the student
trains between generations, the engine's copy of the weights goes stale; the generator pushes
the student's current weights into the engine before generating when they changed:

* **When.** :class:`~kdforge.train.onpolicy.OnPolicyBatcher` tells the generator the optimizer
  step before each generation (:meth:`VLLMGenerator.set_step`). Weights change exactly once per
  optimizer step, so the engine is re-synced on the first generation of a step at least
  ``sync_every`` steps after the last sync (``sync_every: 1`` = always on-policy; larger values
  trade staleness for throughput). Micro-batches of the same step never re-sync. Used on its own
  (no ``set_step`` calls), every generation syncs.
* **What.** Only the trainable tensors (``requires_grad``): frozen parts (the copied embeddings
  and head of a layer-subset student) are already in the engine, which is built from a snapshot
  of the student taken at the first generation. Tied weights are sent once, under the name
  ``named_parameters()`` keeps (the embedding), which is what vLLM's loaders expect for tied
  models; ``lm_head.weight`` is never sent for a tied model.
* **How.** Wrappers are removed first (``DistributedDataParallel``'s ``module``, FSDP1's
  ``_fsdp_wrapped_module`` / activation checkpointing / ``torch.compile`` name prefixes); FSDP1
  parameters are gathered with ``summon_full_params`` and FSDP2 / DTensor ones with
  ``full_tensor()`` (collectives: every process syncs at the same step, which the step rule
  guarantees). Tensors are cast to the engine dtype (``bfloat16`` by default) before the push.
  The push itself calls the model's ``load_weights`` (Hugging Face names; vLLM maps them onto
  its fused ``qkv_proj`` / ``gate_up_proj``) directly when the engine runs in this process
  (``llm.llm_engine.model_executor.driver_worker.model_runner.model``, what TRL's colocate mode
  does), else through ``llm.collective_rpc`` (vLLM >= 0.8 / V1 engines in a worker process; the
  tensors then travel on CPU). The prefix cache is reset after a sync (its KV entries were
  computed with the old weights).

Generation requests carry the :class:`~kdforge.train.onpolicy.OnPolicyConfig` sampling settings
(temperature, top_p, top_k, max_new_tokens, EOS as a stop token) as ``vllm.SamplingParams`` and
token-id prompts (the engine is started with ``skip_tokenizer_init``); completions come back as
1-D int64 CPU tensors cut after the first EOS, like :class:`~kdforge.train.generation.HFGenerator`.
The engine settings are :class:`VLLMSettings` (``on_policy.vllm``).

References: Agarwal et al. 2024 (GKD); Kwon et al. 2023 (vLLM / PagedAttention). TRL's GKD/GRPO
colocate mode and OpenRLHF push weights the same way (per-tensor ``load_weights``); here only the
trainable tensors are pushed and the step rule makes "changed" exact.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from kdforge.errors import ConfigError, DeviceError, GenerationError
from kdforge.train.config import FriendlyModel
from kdforge.train.generation import SamplingSettings, cut_after_eos, special_token_ids

log = logging.getLogger(__name__)

__all__ = ["VLLMGenerator", "VLLMSettings", "iter_sync_tensors", "unwrap_model"]


class VLLMSettings(FriendlyModel):
    """The colocated vLLM engine of ``on_policy.backend: vllm`` (:class:`VLLMGenerator`).

    Attributes:
        sync_every: push the student's trainable weights into the engine every this many
            optimizer steps (1 = every step: strictly on-policy samples).
        gpu_memory_utilization: share of the GPU memory vLLM may take (weights + KV cache); the
            rest stays for training. vLLM's own default (0.9) would starve the trainer.
        dtype: engine dtype; pushed tensors are cast to it.
        max_model_len: longest prompt + completion (default: the model's).
        enforce_eager: skip CUDA-graph capture (faster start, fine for short completions).
        sleep: put the engine to sleep (level 1: weights to CPU, KV cache freed) between
            generations, so training gets the memory back.
        seed: engine sampling seed.
        model: start the engine from this checkpoint instead of a snapshot of the model (must hold
            the same weights, e.g. the student's initial checkpoint).
        tmp_dir: where the snapshot is written (default: the system temp folder).
        engine_kwargs: extra ``vllm.LLM`` keyword arguments (override the above).
    """

    sync_every: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int | None = Field(None, ge=1)
    enforce_eager: bool = True
    sleep: bool = False
    seed: int = 0
    model: str | None = None
    tmp_dir: str | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)

#: name components added by wrappers (FSDP1, activation checkpointing, torch.compile); DDP's
#: ``module`` is dropped only at the front (a model may have its own submodule called "module")
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers (FSDP stays:
    its parameters are gathered by :func:`iter_sync_tensors`)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside an FSDP1 root wrapper (which has no ``save_pretrained``)."""
    while not hasattr(model, "save_pretrained") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _clean_name(name: str) -> str:
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    while parts and parts[0] == "module":
        parts = [p for p in parts[1:] if p not in _WRAPPER_PARTS]
    return ".".join(parts)


def _is_fsdp1(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)  # FSDP2 / DTensor shard -> whole tensor
    return full_tensor() if callable(full_tensor) else tensor


@contextlib.contextmanager
def _gathered(model: torch.nn.Module) -> Iterator[None]:
    if _is_fsdp1(model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield
    else:
        yield


def iter_sync_tensors(model: torch.nn.Module, *, trainable_only: bool, dtype: torch.dtype | None,
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for the weights to push into the engine.

    ``named_parameters()`` already yields a tied parameter once (first name: the embedding);
    wrapper prefixes are removed, sharded parameters gathered, tensors detached and cast to
    ``dtype``. With ``trainable_only`` frozen parameters are skipped.
    """
    model = unwrap_model(model)
    gathered = _is_fsdp1(model)  # the full parameters are freed again when the context exits: copy
    seen: set[int] = set()
    with _gathered(model), torch.no_grad():
        for name, param in model.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            key = id(param)
            if key in seen:
                continue
            seen.add(key)
            tensor = _full(param.detach())
            if tensor.is_floating_point() and (dtype is not None or gathered):
                tensor = tensor.to(dtype or tensor.dtype, copy=gathered)
            elif gathered:
                tensor = tensor.clone()
            yield _clean_name(name), tensor


def _load_weights_into(model: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs next to the vLLM model (in this process or in a vLLM worker)."""
    device = next(model.parameters()).device
    model.load_weights((name, t.to(device)) for name, t in weights)
    return len(weights)


def _worker_load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    return _load_weights_into(worker.model_runner.model, weights)


@dataclass
class _Engine:
    llm: Any
    model: torch.nn.Module  # held so that id(model) cannot be reused by another model
    path: Path | None
    trainable: bool
    synced_step: int | None
    syncs: int = 0


class VLLMGenerator:
    """A colocated ``vllm.LLM`` per model, re-synced with the training weights (see module docs).

    Args:
        settings: :class:`VLLMSettings` (engine options, ``sync_every``).
        require_cuda: refuse to start without a CUDA device (vLLM's GPU engine). Tests with a
            fake ``vllm`` module turn it off.

    Raises:
        ConfigError: ``vllm`` is not installed. DeviceError: no CUDA device.
    """

    def __init__(self, settings: VLLMSettings | None = None, *, require_cuda: bool = True) -> None:
        self.settings = settings or VLLMSettings()
        try:
            self._vllm = importlib.import_module("vllm")
        except ImportError:
            raise ConfigError(
                "on_policy.backend 'vllm' needs the vllm package, which is not installed",
                "pip install 'kdforge[vllm]' on a CUDA machine, or set on_policy.backend: transformers",
            ) from None
        if require_cuda and not torch.cuda.is_available():
            raise DeviceError(
                "on_policy.backend 'vllm' needs a CUDA GPU and none is visible",
                "run on a GPU machine, or set on_policy.backend: transformers (Hugging Face generate)",
            )
        self._engines: dict[int, _Engine] = {}
        self._step: int | None = None

    # -- step bookkeeping (called by OnPolicyBatcher) ------------------------------------------
    def set_step(self, step: int) -> None:
        """The optimizer step the next generations belong to (weights change once per step)."""
        self._step = int(step)

    @property
    def engines(self) -> dict[int, Any]:
        """``{id(model): vllm.LLM}`` of the engines started so far."""
        return {k: e.llm for k, e in self._engines.items()}

    def sync_count(self, model: torch.nn.Module) -> int:
        """Weight pushes into ``model``'s engine so far (the initial snapshot not counted)."""
        engine = self._engines.get(id(unwrap_model(model)))
        return engine.syncs if engine else 0

    # -- engine ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.settings.dtype)

    def _start(self, model: torch.nn.Module) -> _Engine:
        s = self.settings
        trainable = any(p.requires_grad for p in model.parameters())
        path: Path | None = None
        source = s.model
        if source is None:  # snapshot the current model, so the engine starts in sync
            if not hasattr(_hf_model(model), "save_pretrained"):
                raise ConfigError(
                    f"vLLM generation needs a Hugging Face model to snapshot, got {type(model).__name__}",
                    "use a transformers causal LM, or set on_policy.vllm.model to a checkpoint of the same weights",
                )
            path = Path(tempfile.mkdtemp(prefix="kdforge-vllm-", dir=s.tmp_dir))
            state = dict(iter_sync_tensors(model, trainable_only=False, dtype=None))
            _hf_model(model).save_pretrained(path, state_dict=state, safe_serialization=True)
            source = str(path)
        kwargs: dict[str, Any] = {
            "model": source, "dtype": s.dtype, "gpu_memory_utilization": s.gpu_memory_utilization,
            "enforce_eager": s.enforce_eager, "seed": s.seed, "skip_tokenizer_init": True,
            "tensor_parallel_size": 1, "enable_sleep_mode": s.sleep,
        }
        if s.max_model_len is not None:
            kwargs["max_model_len"] = s.max_model_len
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank
            kwargs["seed"] = s.seed + torch.distributed.get_rank()        # ranks sample independently
        kwargs.update(s.engine_kwargs)
        try:
            llm = self._vllm.LLM(**kwargs)
        except Exception as exc:
            raise GenerationError(f"could not start the vLLM engine for {source}: {exc}",
                                  "lower on_policy.vllm.gpu_memory_utilization, set max_model_len, or check "
                                  "that vLLM supports this architecture") from exc
        log.info("vLLM engine started for %s (%s, %s)", type(model).__name__, source, s.dtype)
        return _Engine(llm=llm, model=model, path=path, trainable=trainable, synced_step=self._step)

    def _push(self, engine: _Engine, model: torch.nn.Module) -> int:
        weights = list(iter_sync_tensors(model, trainable_only=True, dtype=self.dtype))
        if not weights:
            return 0
        llm = engine.llm
        local = _local_model(llm)
        if local is not None:
            n = _load_weights_into(local, weights)
        elif hasattr(llm, "collective_rpc"):
            cpu = [(name, t.cpu()) for name, t in weights]
            n = llm.collective_rpc(functools.partial(_worker_load_weights, weights=cpu))[0]
        else:
            raise GenerationError("this vLLM version exposes neither an in-process model nor collective_rpc",
                                  "use vLLM >= 0.8, or set on_policy.backend: transformers")
        reset = getattr(llm, "reset_prefix_cache", None)
        if callable(reset):
            reset()
        engine.syncs += 1
        engine.synced_step = self._step
        return n

    def _needs_sync(self, engine: _Engine) -> bool:
        if not engine.trainable:
            return False
        if self._step is None:  # no step information: assume the weights moved
            return True
        if engine.synced_step is None:
            return True
        return self._step - engine.synced_step >= self.settings.sync_every

    # -- GenerateFn -------------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module, prompts: list[torch.Tensor], config: SamplingSettings,
                 ) -> list[torch.Tensor]:
        base = unwrap_model(model)
        _, eos = special_token_ids(base, config)
        engine = self._engines.get(id(base))
        if engine is None:
            engine = self._engines[id(base)] = self._start(base)
        elif self._needs_sync(engine):
            if self.settings.sleep:
                engine.llm.wake_up()
            n = self._push(engine, base)
            log.debug("pushed %d tensors into the vLLM engine at step %s", n, self._step)
        elif self.settings.sleep:
            engine.llm.wake_up()
        params = self._vllm.SamplingParams(
            n=1, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k if config.top_k is not None else -1, max_tokens=config.max_new_tokens,
            stop_token_ids=[eos] if eos is not None else None, detokenize=False,
        )
        requests = [{"prompt_token_ids": [int(t) for t in p.tolist()]} for p in prompts]
        try:
            outputs = engine.llm.generate(requests, sampling_params=params, use_tqdm=False)
        except Exception as exc:
            raise GenerationError(f"vLLM generation failed: {exc}",
                                  "check the sampling settings and max_model_len (prompt + max_new_tokens)") from exc
        finally:
            if self.settings.sleep:
                engine.llm.sleep(level=1)
        if len(outputs) != len(prompts):
            raise GenerationError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts",
                                  "report this with your vLLM version")
        return [cut_after_eos(torch.tensor(list(out.outputs[0].token_ids), dtype=torch.long), eos)
                for out in outputs]

    def close(self) -> None:
        """Shut the engines down and delete the snapshots."""
        for engine in self._engines.values():
            shutdown = getattr(engine.llm, "shutdown", None)
            if callable(shutdown):
                with contextlib.suppress(Exception):
                    shutdown()
            if engine.path is not None:
                shutil.rmtree(engine.path, ignore_errors=True)
        self._engines.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _local_model(llm: Any) -> Any:
    """The engine's ``nn.Module`` when the classic in-process path exists (V0 engines, some V1
    in-process set-ups), else None (then :meth:`VLLMGenerator._push` uses ``collective_rpc``)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError:
        return None
