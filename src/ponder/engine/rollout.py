"""Batched sampling with a KV cache: n samples per prompt, stop strings detected at token level, finish reasons,
stop index, seeded, with a progress bar. Four backends behind one `sample` (docs/methods.md §6): HF
`generate`, the lean CPU decode loop of `ponder.decode`, a colocated vLLM engine (`ponder.vllm_engine`) and a
vLLM server process reached over HTTP (`ponder.vllm_server`, started by `ponder vllm-serve`).

A completion ends at the first of: the end-of-turn / eos token (kept in `ids`, finish ``eos``), the start of a
stop string (the stop text and everything after it are excluded, finish ``stop``), or `max_new_tokens`
(finish ``length``). `stop_index` is the index in the generated tokens of the token where the stop string
begins; when a stop string starts inside a token, that token is dropped from `ids` and `text` is cut at the
exact character.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ponder import ui
from ponder.engine import decode, vllm_engine, vllm_server
from ponder.engine.chat import end_of_turn_id, generation_prompt, pad_id
from ponder.engine.models import check_context


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str          # stop | eos | length
    stop_index: int | None = None
    stop: str | None = None


Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """A user message string, a conversation (messages), or token ids -> the ids to generate from."""
    if isinstance(prompt, str):
        return generation_prompt(tokenizer, [{"role": "user", "content": prompt}])
    if len(prompt) and isinstance(prompt[0], dict):
        return generation_prompt(tokenizer, prompt)  # type: ignore[arg-type]
    return [int(t) for t in prompt]  # type: ignore[union-attr]


def stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


class _StopOnText:
    """Stop a row once a stop string appears in its *generated* text (HF's `stop_strings` also matches text
    that starts in the prompt, which would cut completions short)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, list(stops), prompt_width
        self.window = max(len(s) for s in self.stops)  # every token decodes to >= 1 character

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.width:].tolist():
            tail = self.tokenizer.decode(row[-self.window:], skip_special_tokens=False)
            done.append(any(s in tail for s in self.stops))
        return torch.tensor(done, device=input_ids.device)


def _cut(tokenizer, ids: list[int], eos: set[int], stop: Sequence[str]) -> tuple[list[int], str, str, int | None,
                                                                                   str | None]:
    """Truncate one raw completion: (ids, text, finish_reason, stop_index, stop)."""
    end = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if end is None else ids[:end]
    text = tokenizer.decode(body, skip_special_tokens=False)
    hits = [(text.find(s), s) for s in stop if s and text.find(s) >= 0]
    if hits:
        c, s = min(hits)
        lo, hi = 0, len(body)  # largest k with decode(body[:k]) a prefix of text[:c]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tokenizer.decode(body[:mid], skip_special_tokens=False)) <= c:
                lo = mid
            else:
                hi = mid - 1
        return body[:lo], text[:c], "stop", lo, s
    if end is not None:
        return ids[:end + 1], text, "eos", None, None
    return list(ids), text, "length", None, None


BACKENDS = ("auto", "generate", "lean", "vllm", "vllm-server")


def check_backend(backend: str) -> None:
    """Fail at start, in one line, on an unknown backend or one this machine cannot run (vllm without vLLM or
    without the CPU instructions / GPU its build needs; vllm-server with a malformed server address)."""
    if backend not in BACKENDS:
        raise ValueError(f"rollout_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm":
        vllm_engine.check_available()
    if backend == "vllm-server":
        vllm_server.settings()


DTYPES = ("auto", "float32", "bfloat16")


def check_dtype(dtype: str, backend: str = "auto") -> None:
    """Fail at start, in one line, on an unknown rollout dtype or a low-precision one the backend cannot take
    (vLLM samples in its engine's dtype, fp32 on a CPU: docs/methods.md §6.5)."""
    if dtype not in DTYPES:
        raise ValueError(f"rollout_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16" and backend in ("vllm", "vllm-server"):
        raise ValueError(f"rollout_dtype 'bfloat16' runs on the lean and generate backends, not {backend!r} (its "
                         "weight-push check needs fp32 on a CPU); use rollout_dtype float32 or rollout_backend lean")


def resolve_dtype(dtype: str, backend: str, trains_in_bf16: bool) -> str:
    """``auto``: bf16 rollouts when the run trains under bf16 autocast (``dtype: auto`` where it pays, or
    ``bf16: true``) and the backend can take them (lean, generate), else fp32 (docs/methods.md §6.5)."""
    check_dtype(dtype, backend)
    if dtype != "auto":
        return dtype
    return "bfloat16" if trains_in_bf16 and backend in ("auto", "lean", "generate") else "float32"


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sampling_copy(model, dtype: torch.dtype):
    """`model` with its parameters in `dtype`, for sampling only (docs/methods.md §6.5): one copy per model,
    kept and refreshed in place from the model's current weights on every call (an RL step changes them), so
    the cast costs one pass over the weights, not a new model. Buffers keep their dtype (the rotary
    frequencies stay fp32). `model` itself when its parameters already have `dtype`."""
    params = list(model.parameters())
    if all(p.dtype == dtype for p in params if p.is_floating_point()):
        return model
    names = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())  # a resized vocabulary: a new copy
    kept = _COPIES.get(model)
    if kept is None or kept[0] != names or kept[2] != dtype:
        shadow = copy.deepcopy(model)
        for p in shadow.parameters():
            p.grad = None
            p.requires_grad_(False)
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        kept = (names, shadow, dtype)
        _COPIES[model] = kept
    else:
        with torch.no_grad():
            for mine, theirs in zip(kept[1].parameters(), params):
                mine.copy_(theirs)
    return kept[1]


# Measured (bench/generation.py, bench/results.md, 2026-12-07): the lean loop is 1.26-1.77x `generate` on the
# testbed and 1.71-1.84x on SmolLM2 from batch 16 up, but level at batch 1 (1.02x, 0.97x).
LEAN_MIN_BATCH = 16


def resolve_backend(backend: str, model, batch: int | None = None) -> str:
    """The backend `sample` runs. ``auto``: the lean loop on CPU for the Llama-shaped models it supports when
    a generation batch holds at least `LEAN_MIN_BATCH` sequences (where it measured faster, docs/methods.md
    §6.1), else `generate`. ``vllm`` with an engine already set (`vllm_engine.set_engine`) runs on it."""
    if backend == "vllm" and vllm_engine.current() is not None:
        return backend
    if backend == "vllm-server" and vllm_server.current() is not None:
        return backend
    check_backend(backend)
    if backend == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        big = batch is None or batch >= LEAN_MIN_BATCH
        return "lean" if on_cpu and big and decode.unsupported_reason(model) is None else "generate"
    if backend == "lean":
        reason = decode.unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"rollout backend 'lean' cannot run this model: {reason}; use 'generate'")
    return backend


def job_seed(seed: int, prompt: int, j: int) -> int:
    """The per-sample seed of the vllm backend (independent of batching)."""
    return (seed * 1_000_003 + prompt * 1_009 + j) % (2 ** 63)


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[Prompt], n: int = 1, max_new_tokens: int = 256,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] | None = None,
           seed: int = 0, batch_size: int = 64, progress: bool = True, description: str = "sampling",
           suppress_eos: bool = False, backend: str = "auto", dtype: str = "auto") -> list[list[Sample]]:
    """Sample `n` completions for each prompt; returns ``samples[prompt][j]``.

    temperature 0 is greedy decoding. Sequences are generated in batches of `batch_size` (prompts sorted by
    length to limit padding; the vllm engine takes all at once and batches itself). Deterministic for a given
    seed and batch size (vllm: a seed per sample, whatever the batching). suppress_eos: never end at the
    end-of-turn token (LaTRO generates full-length rationales and truncates afterwards).
    backend: ``generate`` (HF), ``lean`` (`ponder.decode`), ``vllm`` (`ponder.vllm_engine`, colocated, weights
    pushed when they changed), ``vllm-server`` (`ponder.vllm_server`, the same over HTTP) or ``auto``
    (`resolve_backend`). Every backend cuts completions by the same rule
    (`_cut`); greedy ids agree across backends, sampled ids agree in distribution (docs/methods.md §6).
    dtype: ``bfloat16`` samples from a bf16 copy of an fp32 model (`sampling_copy`; lean and generate only:
    on the lean loop 2.5-2.75x fp32 `generate` on SmolLM2 on a Zen 4 CPU, the same greedy token at ~98% of
    positions, docs/methods.md §6.5),
    ``float32`` from an fp32 one; ``auto`` from the model as it is.
    """
    stop = [s for s in stop or [] if s]
    pids = [prompt_ids(tokenizer, p) for p in prompts]
    backend = resolve_backend(backend, model, min(batch_size, len(pids) * n))
    check_dtype(dtype, backend)
    if dtype != "auto" and backend not in ("vllm", "vllm-server"):
        model = sampling_copy(model, getattr(torch, dtype))
    check_context(model, pids, max_new_tokens)  # refuse, never generate past the context silently
    if temperature == 0 and n > 1:
        ui.warn(f"temperature 0 with {n} samples per prompt: greedy decoding gives {n} identical samples")
    jobs = sorted(((i, j) for i in range(len(pids)) for j in range(n)), key=lambda ij: (-len(pids[ij[0]]), ij))
    eos = stop_ids(model, tokenizer)
    end = set() if suppress_eos else set(eos)
    out: list[list[Sample | None]] = [[None] * n for _ in pids]

    def finish(chunk, raws):
        for (i, j), raw in zip(chunk, raws):
            got, text, reason, sidx, s = _cut(tokenizer, raw, end, stop)
            out[i][j] = Sample(i, pids[i], got, text, reason, sidx, s)

    if backend in ("vllm", "vllm-server"):
        engine = vllm_engine.engine_for(model, tokenizer) if backend == "vllm" else vllm_server.engine_for(model)
        engine.ensure_synced(model)
        spec = vllm_engine.Sampling(max_new_tokens, temperature, top_p, top_k, stop, sorted(end), suppress_eos)
        with ui.progress_bar(description, len(jobs), "samples") as advance:
            done = engine.generate([pids[i] for i, _ in jobs], spec, [job_seed(seed, i, j) for i, j in jobs])
            finish(jobs, [c.token_ids for c in done])
            advance(len(jobs))
        return out  # type: ignore[return-value]

    pad = pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), ui.progress_bar(description, len(jobs), "samples") as advance:
            torch.manual_seed(seed)
            run = _lean_batch(model, tokenizer, max_new_tokens, temperature, top_p, top_k, stop, seed, end, pad) \
                if backend == "lean" else _generate_batch(model, tokenizer, max_new_tokens, temperature, top_p,
                                                           top_k, stop, eos, suppress_eos, pad)
            for b in range(0, len(jobs), batch_size):
                chunk = jobs[b:b + batch_size]
                finish(chunk, run([pids[i] for i, _ in chunk]))
                advance(len(chunk))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _generate_batch(model, tokenizer, max_new_tokens, temperature, top_p, top_k, stop, eos, suppress_eos, pad):
    device = next(model.parameters()).device
    greedy = temperature == 0
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad,
                      eos_token_id=None if suppress_eos else eos)
    if not greedy:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)

    def run(prompts: list[list[int]]) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding: generation continues every row at the end
            ids[r, width - len(p):] = torch.tensor(p)
            att[r, width - len(p):] = 1
        criteria = [_StopOnText(tokenizer, stop, width)] if stop else []
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                             stopping_criteria=criteria, **gen_kwargs)
        return [row[width:] for row in gen.tolist()]
    return run


def _lean_batch(model, tokenizer, max_new_tokens, temperature, top_p, top_k, stop, seed, end, pad):
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)

    def next_token(logits: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return logits.float().argmax(-1)  # the same ids; a bf16 argmax over the vocabulary is ~4x slower on CPU
        probs = decode.filtered_logits(logits, temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    window = max((len(s) for s in stop), default=0)  # every token decodes to >= 1 character

    def stopped(rows: list[list[int]]) -> list[bool]:
        tails = tokenizer.batch_decode([r[-window:] for r in rows], skip_special_tokens=False)
        return [any(s in t for s in stop) for t in tails]

    def run(prompts: list[list[int]]) -> list[list[int]]:
        return decode.decode(model, prompts, max_new_tokens, pad, end, next_token, stopped if stop else None)
    return run
