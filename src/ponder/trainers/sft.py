"""Supervised fine-tuning on conversations: assistant-only loss from the rendering segments, real-valued
per-message weights, LoRA, atomic checkpoints, TensorBoard, exact resume.

The trained tokens of an assistant message are its reasoning block, answer and end-of-turn token as rendered
by `ponder.chat`. History turns render without reasoning, so a history turn that *has* reasoning is not
trained here (its reasoning would be invisible and the model would learn to skip it); use
``ponder onepass`` to train every turn of such conversations. Such turns are counted and reported.

Loss normalisation (`SFTConfig.loss_normalization`):
- ``tokens``: sum_t w_t * CE_t / (number of trained tokens) — the usual SFT loss;
- ``messages``: sum_m w_m * mean_{t in m} CE_t / (number of trained messages) — RISE's per-example mean
  cross-entropy times the example's weight, averaged.
Both are exact over gradient accumulation and processes (the denominator counts the whole optimizer batch).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

from ponder import ui
from ponder.engine.chat import Rendered, pad_id, render
from ponder.engine.data import DataError, as_conversation, input_skips
from ponder.engine.logprobs import weighted_cross_entropy
from ponder.trainers import configs
from ponder.trainers.base import (
    PonderTrainer,
    fit_context,
    model_and_tokenizer,
    no_examples_left,
    pack_collate,
    pad_collate,
    report_stats,
    resolve_conversations,
    source_name,
)
from ponder.trainers.configs import SupervisedConfig, config, option


@config
class SFTConfig(SupervisedConfig):
    """SFT on conversations."""
    method: ClassVar[str] = "sft"
    dataset: str | None = option(None, "conversations: .jsonl, hf:<name>, directory")
    history_reasoning: str = configs.history_reasoning()


def message_weights(msgs: list[dict[str, Any]]) -> dict[int, float]:
    """Training weight per assistant message (default 1.0; 0 = context only)."""
    return {i: m.get("weight", 1.0) for i, m in enumerate(msgs) if m["role"] == "assistant"}


def token_weights(segments: Rendered, weights: dict[int, float], normalization: str) -> list[float]:
    """Per-token loss weight: w_m on message m's trained tokens (divided by their count for ``messages``)."""
    counts = Counter(s.message for s in segments if s.trained for _ in s.ids)
    out = []
    for s in segments:
        w = weights.get(s.message, 0.0) if s.trained else 0.0
        if w and normalization == "messages":
            w = w / counts[s.message]
        out.extend([w] * len(s.ids))
    return out


def encode(tokenizer, messages: list[dict[str, Any]], normalization: str = "tokens",
           history_reasoning: str = "strip") -> dict[str, Any]:
    """One SFT example: ids, per-token weights, the number of loss units, and untrainable history turns.

    history_reasoning ``strip``: history turns render without reasoning (as at inference), so a weighted
    history turn that has reasoning cannot be trained here and is counted; ``keep``: every turn renders with
    its reasoning and every weighted turn is trained where it stands (the sequence is an ordinary causal one)."""
    keep = history_reasoning == "keep"
    segs = render(tokenizer, messages, reasoning="all" if keep else "last")
    weights = message_weights(messages)
    last = len(messages) - 1
    hidden = [] if keep else [i for i in weights if i != last and messages[i].get("reasoning") and weights[i]]
    for i in hidden:
        weights[i] = 0.0
    weights = {i: w for i, w in weights.items() if w}
    tw = token_weights(segs, weights, normalization)
    units = len(weights) if normalization == "messages" else sum(1 for w in tw if w)
    return {"input_ids": segs.ids, "weights": tw, "units": units, "hidden_reasoning_turns": len(hidden)}


def prepare(tokenizer, items, max_length: int, normalization: str, where: str = "dataset",
            history_reasoning: str = "strip"):
    """Encode a dataset; over-length and weightless examples are skipped and counted."""
    examples, stats = [], Counter()
    for i, item in enumerate(ui.progress(items, "tokenizing")):
        conv = as_conversation(item, f"{where}[{i}]")
        try:
            ex = encode(tokenizer, conv.messages, normalization, conv.meta.get("history_reasoning", history_reasoning))
        except ValueError as e:
            raise DataError(f"{where}[{i}]: {e}") from None
        stats["hidden_reasoning_turns"] += ex.pop("hidden_reasoning_turns")
        if len(ex["input_ids"]) > max_length:
            stats["skipped_too_long"] += 1
            continue
        if ex["units"] == 0:
            stats["skipped_no_trained_tokens"] += 1
            continue
        examples.append(ex)
    stats["examples"] = len(examples)
    return examples, stats


class SFTTrainer(PonderTrainer):
    """`Trainer` for conversations. train_dataset: conversations (lists of messages, records with
    ``messages``, `Conversation`s) or a data spec string; model: a model or a spec for `ponder.models.load`."""

    def __init__(self, model=None, args: SFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = args or SFTConfig()
        model, processing_class = model_and_tokenizer("SFTTrainer", model, processing_class, args)
        args.max_length = fit_context(model, args.max_length)
        tok = processing_class
        train_dataset = resolve_conversations(train_dataset if train_dataset is not None else args.dataset, "train")
        self.data_stats: dict[str, Counter] = {}
        train, self.data_stats["train"] = prepare(tok, train_dataset, args.max_length, args.loss_normalization,
                                                  where=source_name(args.dataset),
                                                  history_reasoning=args.history_reasoning)
        self.data_stats["train"].update(input_skips(train_dataset))
        if not train:
            raise no_examples_left("examples", source_name(args.dataset), self.data_stats["train"], args.max_length)
        evald = None
        if eval_dataset is not None:
            evald, self.data_stats["eval"] = prepare(tok, resolve_conversations(eval_dataset, "test"), args.max_length,
                                                     args.loss_normalization, where="eval_dataset",
                                                     history_reasoning=args.history_reasoning)
        report_stats(self.data_stats)
        pad = pad_id(tok)
        collate = pack_collate(pad, args.packing_length) if args.packing else pad_collate(pad)
        super().__init__(model=model, args=args, train_dataset=train, eval_dataset=evald,
                         processing_class=tok, data_collator=collate, **kwargs)

    def weighted_loss_sum(self, model, inputs):
        return weighted_cross_entropy(model, inputs)
