"""What the RL trainers (LaTRO, retry, GFPO) share: the seed of an update's sampling, the frozen reference
policy and its forward, and dropout off (their losses are exact sums of log-probs of sampled tokens)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
from peft import PeftModel

T = TypeVar("T")


def update_seed(seed: int, step: int, slot: int) -> int:
    """The seed of one micro-batch's sampling in an update (LaTRO's rationales, retry's episodes): a function of
    (seed, optimizer step, slot = micro-step × processes + rank), never of a consumed RNG stream, so the same
    rollouts come for any split of the batch between processes and micro-steps, and after a resume (distinct
    for up to 64 slots per update). GFPO keeps its own two formulas (tags and traces): changing them would
    change its sampled rollouts and so its trained weights."""
    return (seed * 1_000_003 + step) * 64 + slot


def disable_dropout(model) -> None:
    """Dropout off: log-probs of sampled tokens are exact, so reward and loss are not noisy (the official LaTRO
    code and TRL disable it in the policy and the reference)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def reference_model(model, beta: float, ref_model=None):
    """The frozen reference π_ref = the initial policy, for a KL term (`beta` > 0): `ref_model` or a copy of
    `model`. None when there is no KL term, or when `model` has a LoRA adapter: its base weights are π_ref
    (`reference_forward` disables the adapter) and no second copy is held."""
    if beta <= 0 or isinstance(model, PeftModel):
        return None
    ref = ref_model if ref_model is not None else copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    disable_dropout(ref)
    return ref


@torch.no_grad()
def reference_forward(ref_model, model, forward: Callable[..., T]) -> T:
    """`forward(π_ref)`: the frozen copy, or `model` with its LoRA adapter disabled."""
    if ref_model is not None:
        return forward(ref_model)
    with model.disable_adapter():
        return forward(model)
