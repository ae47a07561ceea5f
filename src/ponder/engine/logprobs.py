"""Per-token log-probs with explicit (predictor -> target) pairs, and their reductions.

Explicit pairs are what make layouts other than "previous index predicts next index" correct: in the one-pass
layout the first answer token of a turn is predicted from the last reasoning token, which is not the token
before it in the sequence (docs/methods.md §2.7). Reductions are explicit because the papers differ: LaTRO sums,
RISE averages per sample, SSFT length-normalises its matching cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def shift_pairs(target_mask: torch.Tensor) -> torch.Tensor:
    """(3, P) pairs (row, predictor, target) predicting each masked target from the token before it."""
    rows, tgt = target_mask[:, 1:].nonzero(as_tuple=True)
    tgt = tgt + 1
    return torch.stack([rows, tgt - 1, tgt])


def logits_at(model, input_ids: torch.Tensor, predictors: tuple[torch.Tensor, torch.Tensor],
              attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
              **model_kwargs) -> torch.Tensor:
    """Logits at the (row, position) predictors, shape (P, vocab), in float32 or wider.

    Calls the model as a whole (so DDP/FSDP wrappers see the forward) and only then selects positions."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                **model_kwargs)
    logits = out.logits[predictors[0], predictors[1]]
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def token_logprobs(model, input_ids: torch.Tensor, pairs: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   target_mask: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
    """log p(input_ids[row, target] | state at [row, predictor]) for each pair, a 1-D tensor.

    pairs: (3, P) long tensor of (row, predictor, target); default: `shift_pairs(target_mask)` (every
    position where `target_mask` is true is predicted from the position before it).
    attention_mask: 2-D padding mask, or a 4-D additive float mask / BlockMask for custom layouts.
    """
    if pairs is None:
        if target_mask is None:
            target_mask = torch.ones_like(input_ids, dtype=torch.bool)
        pairs = shift_pairs(target_mask)
    logits = logits_at(model, input_ids, (pairs[0], pairs[1]), attention_mask, position_ids, **model_kwargs)
    targets = input_ids[pairs[0], pairs[2]]
    return logprobs_of(logits, targets)


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def reduce(values: torch.Tensor, groups: torch.Tensor, num_groups: int, how: str = "sum") -> torch.Tensor:
    """Reduce per-token values into per-group values: ``sum`` or ``mean`` (mean over each group's tokens)."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)
    if how == "sum":
        return out
    if how == "mean":
        count = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(
            0, groups, torch.ones_like(values))
        return out / count.clamp(min=1)
    raise ValueError(f"unknown reduction {how!r} (expected 'sum' or 'mean')")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (fused kernel; equals -logprobs_of)."""
    return F.cross_entropy(logits, targets, reduction="none")


def weighted_cross_entropy(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_t w_t · CE_t of a padded or packed batch with per-token loss weights ``weights`` (0: not trained), each
    target predicted from the token before it: the supervised loss of SFT, SSFT and one-pass's plain samples."""
    w = batch["weights"]
    pairs = shift_pairs(w != 0)
    logits = logits_at(model, batch["input_ids"], (pairs[0], pairs[1]), batch.get("attention_mask"),
                       batch.get("position_ids"))
    ce = cross_entropy(logits, batch["input_ids"][pairs[0], pairs[2]])
    return (ce * w[pairs[0], pairs[2]].to(ce.dtype)).sum()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (0 at each prompt's first real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p))
        att[r, width - len(p):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return ids, att, pos
