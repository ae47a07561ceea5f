"""One-pass multi-turn reasoning SFT (arXiv 2504.18246): every turn of a conversation trained in one forward,
earlier turns' reasoning hidden from later turns exactly as at inference, losses identical to N passes.

Modes (`OnePassConfig.mode`), all trained on the same tokens with the same loss:
- ``onepass``: the layout of `ponder.masks` (answers duplicated, block-sparse mask, explicit positions);
- ``npass``: the reference — one sample per assistant turn (history reasoning stripped, that turn trained);
- ``kpass``: turns split into `kpass_chunks` chunks, one-pass inside a chunk, earlier chunks as context
  (between the two in memory and time).

Batches are made of conversations in every mode, so a run's loss curve does not depend on the mode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ponder import masks
from ponder.chat import render
from ponder.data import DataError, as_conversation
from ponder.logprobs import cross_entropy, logits_at, logprobs_of, token_logprobs
from ponder.trainers.sft import (
    PonderTrainer,
    SFTConfig,
    _report_stats,
    _resolve,
    encode,
    model_and_tokenizer,
    pad_collate,
)

CUSTOM_MASK_BACKENDS = ("eager", "sdpa", "flex_attention")


@dataclass
class OnePassConfig(SFTConfig):
    mode: str = field(default="onepass", metadata={"help": "onepass | npass | kpass"})
    kpass_chunks: int = field(default=2, metadata={"help": "kpass: number of chunks of turns"})
    attention: str = field(default="auto", metadata={"help": "auto | sparse | dense | flex (no CPU backward)"})

    def __post_init__(self):
        if self.mode not in ("onepass", "npass", "kpass"):
            raise ValueError(f"mode must be onepass, npass or kpass, got {self.mode!r}")
        if self.attention not in ("auto", "sparse", "dense", "flex"):
            raise ValueError(f"attention must be auto, sparse, dense or flex, got {self.attention!r}")
        if self.kpass_chunks < 1:
            raise ValueError("kpass_chunks must be >= 1")
        if self.output_dir is None:
            self.output_dir = "runs/onepass"
        super().__post_init__()


def check_backend(model) -> str:
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in CUSTOM_MASK_BACKENDS:
        raise ValueError(f"attention backend {impl!r} cannot take the one-pass block-sparse mask; load the model "
                         "with attn_implementation='sdpa' or 'eager' (CPU, dense mask) or 'flex_attention' (GPU)")
    return impl


def attention_for(model, batch: masks.Batch, prefer: str = "auto"):
    """A mask for `batch`: a BlockMask under flex_attention (or prefer="flex"), else a dense additive mask."""
    impl = check_backend(model)
    flex = prefer == "flex" or (prefer == "auto" and impl == "flex_attention")
    if flex and impl != "flex_attention":
        raise ValueError("attention='flex' needs a model loaded with attn_implementation='flex_attention'")
    if flex:
        return batch.block_mask()
    dtype = next(model.parameters()).dtype
    return batch.dense_mask(dtype if dtype.is_floating_point else torch.float32).to(batch.input_ids.device)


def onepass_logits(model, batch: masks.Batch, attention: str = "auto") -> torch.Tensor:
    """Logits at the batch's predictor positions, (P, vocab).

    attention: ``flex`` (BlockMask; GPU — no CPU backward in torch 2.13), ``dense`` (additive float mask, O(T^2)
    per query), ``sparse`` (blocks of queries against the keys they may see; exact, cost ~ visible keys),
    ``auto`` (flex under flex_attention, else sparse)."""
    impl = check_backend(model)
    mode = ("flex" if impl == "flex_attention" else "sparse") if attention == "auto" else attention
    p = batch.pairs
    if mode == "sparse":
        dtype = next(model.parameters()).dtype
        plan = masks.sparse_plan(batch, dtype if dtype.is_floating_point else torch.float32)
        with masks.sparse_attention(model):
            return logits_at(model, batch.input_ids, (p[0], p[1]), None, batch.position_ids, ponder_plan=plan)
    return logits_at(model, batch.input_ids, (p[0], p[1]), attention_for(model, batch, mode), batch.position_ids)


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


def _by_message(values: torch.Tensor, messages: torch.Tensor) -> list[torch.Tensor]:
    """Split per-pair values into one tensor per assistant message, in message order."""
    return [values[messages == m] for m in sorted(set(messages.tolist()))]


def onepass_logprobs(model, tokenizer, messages: Sequence[dict[str, Any]], attention: str = "auto"
                     ) -> list[torch.Tensor]:
    """Per assistant turn, the log-probs of its trained tokens (reasoning block + answer + end-of-turn token)
    from ONE forward pass over the one-pass layout."""
    msgs = [{k: v for k, v in m.items() if k != "weight"} for m in messages]  # every turn, weight 1
    lay = masks.onepass_layout(tokenizer, msgs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = masks.collate([lay], pad)
    logits = onepass_logits(model, batch, attention)
    lp = logprobs_of(logits, batch.input_ids[batch.pairs[0], batch.pairs[2]])
    return _by_message(lp, batch.pair_message)


def npass_logprobs(model, tokenizer, messages: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    """The N-pass reference: per assistant turn, one forward over the conversation up to that turn (history
    reasoning stripped) and the log-probs of that turn's trained tokens."""
    return [token_logprobs(model, ids, target_mask=target) for ids, target in npass_samples(tokenizer, messages)]


def onepass_step(model, batch: masks.Batch, attention: str = "auto") -> list[torch.Tensor]:
    """One training step's compute on a collated one-pass batch: forward (mask or sparse plan built here, as in
    the trainer), backward of the summed target log-probs. Returns the detached log-probs per assistant turn."""
    lp = logprobs_of(onepass_logits(model, batch, attention), batch.input_ids[batch.pairs[0], batch.pairs[2]])
    lp.sum().backward()
    return _by_message(lp.detach(), batch.pair_message)


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


def compare(model, tokenizer, messages: Sequence[dict[str, Any]], repeats: int = 3, attention: str = "auto",
            on_step=None, warmup: bool = True) -> dict[str, float]:
    """One-pass vs N-pass on one conversation, side by side: tokens forwarded, the ideal ratio (N-pass tokens /
    one-pass tokens), median forward+backward seconds of each (repeats interleaved, so both see the same
    machine load; preparation not timed, as a trainer prepares once) and the largest log-prob difference.
    `on_step(mode)` is called around each timed step (e.g. to sample memory); `warmup` runs each once untimed
    first (the first call of a shape pays for allocator growth)."""
    import contextlib
    import statistics
    import time
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = masks.collate([masks.onepass_layout(tokenizer, messages)], pad)
    samples = npass_samples(tokenizer, messages)
    runs = {"onepass": lambda: onepass_step(model, batch, attention), "npass": lambda: npass_step(model, samples)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values() if warmup else ():
        fn()
    diff = 0.0
    for _ in range(repeats):
        out = {}
        for mode, fn in runs.items():
            model.zero_grad(set_to_none=True)
            with (on_step(mode) if on_step else contextlib.nullcontext()):
                t = time.perf_counter()
                out[mode] = fn()
                times[mode].append(time.perf_counter() - t)
        diff = max(diff, max((a - b).abs().max().item() for a, b in zip(out["onepass"], out["npass"])))
    model.zero_grad(set_to_none=True)
    n_one, n_n = batch.input_ids.numel(), sum(ids.numel() for ids, _ in samples)
    one_s, n_s = statistics.median(times["onepass"]), statistics.median(times["npass"])
    return {"depth": len(samples), "onepass_tokens": n_one, "npass_tokens": n_n, "ideal": n_n / n_one,
            "onepass_s": one_s, "npass_s": n_s, "speedup": n_s / one_s, "maxdiff": diff}


# ----------------------------------------------------------------------------------------------------------


def prepare(tokenizer, items, mode: str, max_length: int, normalization: str, kpass_chunks: int = 2,
            where: str = "dataset"):
    """Per conversation, the units the collator packs: one Layout (onepass), one Layout per chunk (kpass),
    or one SFT example per assistant turn (npass). Over-length conversations are skipped and counted."""
    from ponder import ui
    out, stats = [], Counter()
    for i, item in enumerate(ui.progress(items, "laying out")):
        conv = as_conversation(item, f"{where}[{i}]")
        msgs = conv.messages
        asst = [k for k, m in enumerate(msgs) if m["role"] == "assistant" and m.get("weight", 1.0)]
        try:
            if mode == "npass":
                parts = []
                for k in asst:
                    sub = [dict(m, weight=(m.get("weight", 1.0) if j == k else 0.0)) if m["role"] == "assistant"
                           else m for j, m in enumerate(msgs[:k + 1])]
                    parts.append(encode(tokenizer, sub, normalization))
                    parts[-1].pop("hidden_reasoning_turns")
                lengths = [len(p["input_ids"]) for p in parts]
            else:
                groups = [asst] if mode == "onepass" else chunks(asst, kpass_chunks)
                parts = [masks.onepass_layout(tokenizer, msgs, turns=g, normalization=normalization)
                         for g in groups if g]
                lengths = [len(p) for p in parts]
        except ValueError as e:
            raise DataError(f"{where}[{i}]: {e}") from None
        if not parts:
            stats["skipped_no_trained_tokens"] += 1
            continue
        if max(lengths) > max_length:
            stats["skipped_too_long"] += 1
            continue
        units = len(asst) if normalization == "messages" else sum(
            sum(1 for w in (p["weights"] if isinstance(p, dict) else p.weights) if w) for p in parts)
        out.append({"parts": parts, "units": units, "tokens": sum(lengths)})
        stats["turns"] += len(asst)
        stats["tokens_forwarded"] += sum(lengths)
    stats["examples"] = len(out)
    return out, stats


def make_collate(mode: str, pad_id: int, packing_length: int | None):
    sft_collate = pad_collate(pad_id)

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        parts = [p for b in batch for p in b["parts"]]
        units = torch.tensor([b["units"] for b in batch])
        if mode == "npass":
            out = sft_collate(parts)
            out["units"] = units
            return out
        mb = masks.collate(parts, pad_id, packing_length)
        return {"input_ids": mb.input_ids, "position_ids": mb.position_ids, "roles": mb.roles, "turns": mb.turns,
                "samples": mb.samples, "weights": mb.weights, "pairs": mb.pairs, "units": units}
    return collate


class OnePassTrainer(PonderTrainer):
    """`Trainer` for multi-turn reasoning conversations (TRL-shaped: OnePassTrainer + OnePassConfig)."""

    def __init__(self, model=None, args: OnePassConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = args or OnePassConfig()
        model, processing_class = model_and_tokenizer("OnePassTrainer", model, processing_class, args)
        if args.mode != "npass":
            check_backend(model)
        tok = processing_class
        self.data_stats: dict[str, Counter] = {}
        train, self.data_stats["train"] = prepare(
            tok, _resolve(train_dataset if train_dataset is not None else args.dataset, "train"), args.mode,
            args.max_length, args.loss_normalization, args.kpass_chunks, where=_name(args.dataset))
        if not train:
            raise DataError("no trainable conversations left after skipping (see the counts above)")
        evald = None
        if eval_dataset is not None:
            evald, self.data_stats["eval"] = prepare(tok, _resolve(eval_dataset, "test"), args.mode, args.max_length,
                                                     args.loss_normalization, args.kpass_chunks, "eval_dataset")
        _report_stats(self.data_stats)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        super().__init__(model=model, args=args, train_dataset=train, eval_dataset=evald, processing_class=tok,
                         data_collator=make_collate(args.mode, pad, args.packing_length if args.packing else None),
                         **kwargs)

    def weighted_loss_sum(self, model, inputs):
        w = inputs["weights"]
        if "pairs" not in inputs:  # npass: plain causal samples
            from ponder.logprobs import shift_pairs
            pairs = shift_pairs(w != 0)
            logits = logits_at(model, inputs["input_ids"], (pairs[0], pairs[1]), inputs.get("attention_mask"))
        else:
            pairs = inputs["pairs"]
            batch = masks.Batch(inputs["input_ids"], inputs["position_ids"], inputs["roles"], inputs["turns"],
                                inputs["samples"], w, pairs, None, None)  # type: ignore[arg-type]
            logits = onepass_logits(model, batch, self.args.attention)
        ce = cross_entropy(logits, inputs["input_ids"][pairs[0], pairs[2]])
        return (ce * w[pairs[0], pairs[2]].to(ce.dtype)).sum()


def _name(spec) -> str:
    return spec if isinstance(spec, str) else "train_dataset"
