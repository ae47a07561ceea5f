"""Colocated vLLM rollouts: the ``vllm`` backend of `ponder.rollout.sample` (docs/methods.md §6.2).

As TRL's ``vllm_mode="colocate"``: one in-process vLLM engine per training process, on the same GPU, started
from the model's directory (or hub id) with ``distributed_executor_backend="external_launcher"``; the trainer's
weights are pushed into it, one tensor at a time through the engine model's ``load_weights``, whenever they
changed since the last push (an optimizer step, a RISE iteration), then its prefix cache is reset. PEFT
models are pushed merged (``merge_adapter`` … ``unmerge_adapter``) under the base model's names
(``base_model.model.`` and ``.base_layer`` removed, adapter tensors skipped, ``modules_to_save.default.``
stripped, as TRL does; also ``.token_adapter``, PEFT's wrapper of trainable token rows).

Sampling maps onto vLLM's `SamplingParams` one request per sample (n=1, a seed per sample), with our stopping
rules: the end-of-turn / eos ids as ``stop_token_ids`` (none and ``ignore_eos`` under ``suppress_eos``), stop
strings as ``stop``. vLLM's ``token_ids`` end with the token that finished the request, so `rollout._cut`
turns them into the same ``ids`` / ``text`` / ``finish_reason`` / ``stop_index`` as the other backends.

Engine options come from the environment (the configs only name the backend): ``PONDER_VLLM_GPU_MEMORY``
(fraction of GPU memory for vLLM, default 0.3, TRL's colocate default), ``PONDER_VLLM_MAX_MODEL_LEN``,
``PONDER_VLLM_ENFORCE_EAGER=1`` (skip CUDA-graph capture: faster start, slower decoding).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig

VLLM_PIN = "vllm==0.30.0"  # the newest vLLM whose wheel allows torch==2.13.0 and transformers 5.23 (pyproject `gpu`)


class BackendUnavailable(ValueError):
    """The vllm backend was selected on a machine that cannot run it."""


def check_available() -> None:
    """Raise a one-line `BackendUnavailable` unless vLLM is installed and a CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailable(f"rollout backend 'vllm' needs vLLM and a CUDA GPU: install the gpu extra "
                                 f"(pip install -e '.[gpu]', {VLLM_PIN}) on a GPU machine, or use "
                                 "rollout_backend=auto")
    if not torch.cuda.is_available():
        raise BackendUnavailable("rollout backend 'vllm' needs a CUDA GPU and this machine has none; use "
                                 "rollout_backend=auto (the lean CPU decode loop)")


@dataclass
class Sampling:
    """What `sample` asks of the engine (per request; n=1)."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False


@dataclass
class Completion:
    """One request's result: the generated ids (ending with the token that finished it), vLLM's finish reason
    (``stop`` | ``length`` | …) and stop reason (the stop string or token id; None for plain eos)."""
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def sampling_params(spec: Sampling, seed: int, cls: Callable[..., Any]):
    """vLLM `SamplingParams` (`cls`) for one sample. Greedy (temperature 0) leaves top-p/top-k at their
    defaults (vLLM rejects them otherwise); top_k 0 means all tokens (-1 in vLLM). Text is detokenized with
    special tokens kept (as `rollout._cut` decodes) so stop strings match the same text."""
    kw: dict[str, Any] = dict(n=1, max_tokens=spec.max_new_tokens, temperature=float(spec.temperature), seed=seed,
                              stop=list(spec.stop) or None, stop_token_ids=list(spec.stop_token_ids),
                              ignore_eos=spec.ignore_eos, skip_special_tokens=False,
                              spaces_between_special_tokens=False, include_stop_str_in_output=True)
    if spec.temperature > 0:
        kw.update(top_p=float(spec.top_p), top_k=int(spec.top_k) if spec.top_k > 0 else -1)
    return cls(**kw)


def named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in the checkpoint's naming, as vLLM's ``load_weights`` expects; PEFT adapters merged for
    the duration of the iteration (TRL's `_iter_named_params`)."""
    if not isinstance(model, PeftModel):
        for name, p in model.named_parameters():
            yield name.replace("_checkpoint_wrapped_module.", ""), p.data
        return
    model.merge_adapter()
    try:
        for name, p in model.named_parameters():
            name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".token_adapter", "")
            if "lora_" in name or "original_module" in name or "trainable_tokens_" in name:
                continue
            yield name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", ""), p.data
    finally:
        model.unmerge_adapter()


def fingerprint(model) -> tuple:
    """Changes whenever a parameter is modified in place (optimizer steps bump tensor version counters) or
    the model object is replaced: the trigger for a weight push."""
    return (id(model), tuple(p._version for p in model.parameters()))


def _model_path(model) -> str:
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    return str(getattr(lm, "name_or_path", "") or "")


class VLLMEngine:
    """A vLLM `LLM` (or any object with its ``generate``/``reset_prefix_cache`` and the in-process model runner)
    plus the weight push. `sampling_params_cls` defaults to vLLM's `SamplingParams`."""

    def __init__(self, llm, sampling_params_cls: Callable[..., Any] | None = None, path: str = ""):
        self.llm, self.path = llm, path
        if sampling_params_cls is None:
            from vllm import SamplingParams  # the optional gpu extra: imported only when an engine is real
            sampling_params_cls = SamplingParams
        self.sampling_params_cls = sampling_params_cls
        self.pushed: tuple | None = None
        self.pushes = 0

    @classmethod
    def from_model(cls, model) -> VLLMEngine:
        """Start an engine on this process's GPU from the model's directory or hub id (TRL's colocate setup)."""
        check_available()
        path = _model_path(model)
        if not path:
            raise ValueError("rollout backend 'vllm' starts its engine from the model's directory or hub id; this "
                             "model has none (save_pretrained it and load it from there)")
        from vllm import LLM
        lm = model.get_base_model() if isinstance(model, PeftModel) else model
        on_disk = AutoConfig.from_pretrained(path).vocab_size
        if on_disk != lm.config.vocab_size:
            raise ValueError(f"rollout backend 'vllm': {path} has a vocabulary of {on_disk} but the model in memory "
                             f"has {lm.config.vocab_size} (tokens were added); save the model and load it from there")
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
            os.environ.setdefault(k, v)
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        env = os.environ.get
        llm = LLM(model=path, dtype=str(lm.dtype).removeprefix("torch."),
                  gpu_memory_utilization=float(env("PONDER_VLLM_GPU_MEMORY", "0.3")),
                  max_model_len=int(env("PONDER_VLLM_MAX_MODEL_LEN")) if env("PONDER_VLLM_MAX_MODEL_LEN") else None,
                  enforce_eager=env("PONDER_VLLM_ENFORCE_EAGER", "0") == "1",
                  distributed_executor_backend="external_launcher", seed=int(env("RANK", "0")),
                  max_num_batched_tokens=4096)
        return cls(llm, path=path)

    def generate(self, prompts_ids: Sequence[Sequence[int]], params: Sampling, seeds: Sequence[int]
                 ) -> list[Completion]:
        """One request per prompt (n=1, its own seed), all submitted at once (vLLM batches them); results in
        prompt order."""
        if len(seeds) != len(prompts_ids):
            raise ValueError("one seed per prompt")
        sps = [sampling_params(params, int(s), self.sampling_params_cls) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts_ids], sampling_params=sps,
                                 use_tqdm=False)
        return [Completion(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, o.outputs[0].stop_reason)
                for o in outs]

    def _load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        try:  # TRL's path: the in-process worker's model (external_launcher)
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:  # vLLM's public hook, should the internal path move
            self.llm.apply_model(lambda m: m.load_weights(weights))
            return
        model.load_weights(weights)

    def sync_weights(self, model) -> int:
        """Push every weight of `model` into the engine (one tensor at a time), then reset its prefix cache.
        Returns the number of tensors pushed."""
        n = 0
        with torch.no_grad():
            for name, tensor in named_weights(model):
                self._load_weights([(name, tensor)])
                n += 1
        self.llm.reset_prefix_cache()
        self.pushed = fingerprint(model)
        self.pushes += 1
        return n

    def ensure_synced(self, model) -> bool:
        """Push the weights if they changed since the last push (at most once per optimizer step, as TRL)."""
        if self.pushed == fingerprint(model):
            return False
        self.sync_weights(model)
        return True

    def close(self) -> None:
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_ENGINE: list[VLLMEngine] = []   # at most one engine per process


def set_engine(engine: VLLMEngine | None) -> None:
    """Use `engine` for the vllm backend (tests, scripts that build their own); None forgets the current one."""
    for e in _ENGINE:
        if e is not engine:
            e.close()
    _ENGINE[:] = [engine] if engine is not None else []


def current() -> VLLMEngine | None:
    return _ENGINE[0] if _ENGINE else None


def engine_for(model) -> VLLMEngine:
    """The process's engine, started from `model` on first use (or when a model from another path arrives)."""
    if _ENGINE and (not _ENGINE[0].path or _ENGINE[0].path == _model_path(model)
                    or Path(_ENGINE[0].path) == Path(_model_path(model))):
        return _ENGINE[0]
    set_engine(VLLMEngine.from_model(model))
    return _ENGINE[0]
