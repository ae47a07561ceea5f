"""One-pass multi-turn reasoning SFT (Goru, Mehta, Jain; arXiv 2504.18246): per-token log-probs of every turn
of a conversation from ONE forward over the one-pass layout (`ponder.masks`, computed by the tree engine
`ponder.tree`), and the N-pass reference.

At inference a chat template drops earlier turns' reasoning, so turn k is generated from a context holding
earlier answers but not earlier reasoning. The N-pass reference renders one sample per assistant turn (history
reasoning stripped, that turn trained); the one-pass layout duplicates each answer and masks attention so that
every trained token sees exactly the keys and positions of its own N-pass sample (paper §3; the proof that the
losses are identical is the paper's Theorem 1, our test is tests/test_onepass.py). docs/methods.md has the
layout, the mask rule and our deviations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ponder.engine import masks, tree
from ponder.engine.chat import pad_id, render
from ponder.engine.data import as_conversation
from ponder.engine.logprobs import logprobs_of, token_logprobs
from ponder.engine.tree import Packed, check_attention_backend


def attention_for(model, batch: Packed, prefer: str = "auto"):
    """A mask for `batch`: a BlockMask under flex_attention (or prefer="flex"), else a dense additive mask."""
    impl = check_attention_backend(model)
    flex = prefer == "flex" or (prefer == "auto" and impl == "flex_attention")
    if flex and impl != "flex_attention":
        raise ValueError("attention='flex' needs a model loaded with attn_implementation='flex_attention'")
    if flex:
        return batch.block_mask()
    dtype = next(model.parameters()).dtype
    return batch.dense_mask(dtype if dtype.is_floating_point else torch.float32).to(batch.input_ids.device)


def onepass_logits(model, batch: Packed, attention: str = "auto") -> torch.Tensor:
    """Logits at the batch's predictor positions, (P, vocab) (`ponder.tree.logits`).

    attention: ``flex`` (BlockMask; GPU — no CPU backward in torch 2.13), ``dense`` (additive float mask, O(T^2)
    per query), ``sparse`` (blocks of queries against the keys they may see; exact, cost ~ visible keys),
    ``auto`` (flex under flex_attention, else the cheaper of sparse and dense)."""
    return tree.logits(model, batch, attention)


def chunks(turns: Sequence[int], k: int) -> list[list[int]]:
    """Split assistant turns into k contiguous chunks of near-equal size."""
    k = min(k, len(turns))
    size, extra = divmod(len(turns), k)
    out, at = [], 0
    for i in range(k):
        n = size + (i < extra)
        out.append(list(turns[at:at + n]))
        at += n
    return out


def by_message(values: torch.Tensor, messages: torch.Tensor) -> list[torch.Tensor]:
    """Split per-pair values into one tensor per assistant message, in message order."""
    return [values[messages == m] for m in sorted(set(messages.tolist()))]


def onepass_logprobs(model, tokenizer, messages: Sequence[dict[str, Any]], attention: str = "auto"
                     ) -> list[torch.Tensor]:
    """Per assistant turn, the log-probs of its trained tokens (reasoning block + answer + end-of-turn token)
    from ONE forward pass over the one-pass layout."""
    msgs = [{k: v for k, v in m.items() if k != "weight"} for m in messages]  # every turn, weight 1
    lay = masks.onepass_layout(tokenizer, msgs)
    batch = masks.collate([lay], pad_id(tokenizer))
    logits = onepass_logits(model, batch, attention)
    lp = logprobs_of(logits, batch.input_ids[batch.pairs[0], batch.pairs[2]])
    return by_message(lp, batch.pair_message)


def npass_logprobs(model, tokenizer, messages: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    """The N-pass reference: per assistant turn, one forward over the conversation up to that turn (history
    reasoning stripped) and the log-probs of that turn's trained tokens."""
    return [token_logprobs(model, ids, target_mask=target) for ids, target in npass_samples(tokenizer, messages)]


def onepass_step(model, batch: Packed, attention: str = "auto") -> list[torch.Tensor]:
    """One training step's compute on a collated one-pass batch: forward (mask or sparse plan built here, as in
    the trainer), backward of the summed target log-probs. Returns the detached log-probs per assistant turn."""
    lp = logprobs_of(onepass_logits(model, batch, attention), batch.input_ids[batch.pairs[0], batch.pairs[2]])
    lp.sum().backward()
    return by_message(lp.detach(), batch.pair_message)


def npass_samples(tokenizer, messages: Sequence[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The N-pass samples of a conversation: (ids, trained-token mask) per assistant turn, history reasoning
    stripped."""
    msgs = as_conversation(list(messages), "messages").messages
    out = []
    for k, m in enumerate(msgs):
        if m["role"] == "assistant":
            segs = render(tokenizer, msgs[:k + 1])
            out.append((torch.tensor([segs.ids]), torch.tensor([segs.trained_mask([k])])))
    return out


def npass_step(model, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """N-pass: each sample's forward+backward on its own (no padding; activations freed before the next, as a
    trainer with batch size 1 would). Returns the detached log-probs per assistant turn."""
    out = []
    for ids, target in samples:
        lp = token_logprobs(model, ids, target_mask=target)
        lp.sum().backward()
        out.append(lp.detach())
    return out
