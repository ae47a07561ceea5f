"""Batched sampling with a KV cache (HF `generate`): n samples per prompt, stop strings detected at token level,
finish reasons, stop index, seeded, with a progress bar.

A completion ends at the first of: the end-of-turn / eos token (kept in `ids`, finish ``eos``), the start of a
stop string (the stop text and everything after it are excluded, finish ``stop``), or `max_new_tokens`
(finish ``length``). `stop_index` is the index in the generated tokens of the token where the stop string
begins; when a stop string starts inside a token, that token is dropped from `ids` and `text` is cut at the
exact character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ponder import ui
from ponder.chat import end_of_turn_id, generation_prompt, pad_id
from ponder.models import check_context


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


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[Prompt], n: int = 1, max_new_tokens: int = 256,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] | None = None,
           seed: int = 0, batch_size: int = 64, progress: bool = True, description: str = "sampling",
           suppress_eos: bool = False) -> list[list[Sample]]:
    """Sample `n` completions for each prompt; returns ``samples[prompt][j]``.

    temperature 0 is greedy decoding. Sequences are generated in batches of `batch_size` (prompts sorted by
    length to limit padding). Deterministic for a given seed and batch size. suppress_eos: never end at the
    end-of-turn token (LaTRO generates full-length rationales and truncates afterwards).
    """
    stop = list(stop or [])
    pids = [prompt_ids(tokenizer, p) for p in prompts]
    check_context(model, pids, max_new_tokens)  # refuse, never generate past the context silently
    if temperature == 0 and n > 1:
        ui.warn(f"temperature 0 with {n} samples per prompt: greedy decoding gives {n} identical samples")
    jobs = sorted(((i, j) for i in range(len(pids)) for j in range(n)), key=lambda ij: (-len(pids[ij[0]]), ij))
    eos = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    out: list[list[Sample | None]] = [[None] * n for _ in pids]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    greedy = temperature == 0
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad,
                      eos_token_id=None if suppress_eos else eos)
    if not greedy:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    try:
        with torch.random.fork_rng(devices=[]), ui.progress_bar(description, len(jobs), "samples") as advance:
            torch.manual_seed(seed)
            for b in range(0, len(jobs), batch_size):
                chunk = jobs[b:b + batch_size]
                width = max(len(pids[i]) for i, _ in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                att = torch.zeros_like(ids)
                for r, (i, _) in enumerate(chunk):  # left padding: generation continues every row at the end
                    ids[r, width - len(pids[i]):] = torch.tensor(pids[i])
                    att[r, width - len(pids[i]):] = 1
                criteria = [_StopOnText(tokenizer, stop, width)] if stop else []
                gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                                     stopping_criteria=criteria, **gen_kwargs)
                for r, (i, j) in enumerate(chunk):
                    raw = gen[r, width:].tolist()
                    got, text, finish, sidx, s = _cut(tokenizer, raw, set() if suppress_eos else set(eos), stop)
                    out[i][j] = Sample(i, pids[i], got, text, finish, sidx, s)
                advance(len(chunk))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
