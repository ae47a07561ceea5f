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
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from ponder import ui
from ponder.chat import HISTORY_REASONING, Rendered, pad_id, render
from ponder.data import DataError, as_conversation, input_skips
from ponder.logprobs import cross_entropy, logits_at, shift_pairs
from ponder.trainers.base import (
    PonderTrainer,
    check_flex_trainable,
    cpu_processes,
    fit_context,
    model_and_tokenizer,
    no_examples_left,
    pack_collate,
    pad_collate,
    report_stats,
    resolve_conversations,
    source_name,
)


@dataclass
class SFTConfig(TrainingArguments):
    model: str = field(default="testbed", metadata={"help": "model spec for ponder.models.load (CLI runs)"})
    dataset: str | None = field(default=None, metadata={"help": "conversations: .jsonl, hf:<name>, directory"})
    max_length: int = field(default=2048, metadata={"help": "longer examples are skipped and counted"})
    loss_normalization: str = field(default="tokens", metadata={"help": "tokens | messages"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (fp32 on CPU)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run Python code a model folder ships (custom "
                                                                     "modelling); off unless you set it"})
    lora: dict | None = field(default=None, metadata={"help": "PEFT LoRA options, e.g. {r: 16, alpha: 32}"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "sdpa | eager | flex_attention (GPU: the one-pass BlockMask); default: ponder.models.load's"})
    history_reasoning: str = field(default="strip", metadata={
        "help": "strip (later turns do not see earlier reasoning, as at inference) | keep (they do); a record's "
                "meta.history_reasoning overrides it"})
    packing: bool = field(default=False, metadata={"help": "pack examples into rows (block-diagonal attention)"})
    packing_length: int = field(default=512, metadata={"help": "tokens per packed row"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep ponder's loss weights"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard | wandb | none"})

    def __post_init__(self):
        if self.loss_normalization not in ("tokens", "messages"):
            raise ValueError(f"loss_normalization must be 'tokens' or 'messages', got {self.loss_normalization!r}")
        if self.history_reasoning not in HISTORY_REASONING:
            raise ValueError(f"history_reasoning must be one of {', '.join(HISTORY_REASONING)}, got "
                             f"{self.history_reasoning!r}")
        if self.output_dir is None:
            self.output_dir = "runs/sft"
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; silence the per-run warning
        cpu_processes(self)
        check_flex_trainable(self)
        super().__post_init__()


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
        w = inputs["weights"]
        pairs = shift_pairs(w != 0)
        logits = logits_at(model, inputs["input_ids"], (pairs[0], pairs[1]), inputs.get("attention_mask"),
                           inputs.get("position_ids"))
        ce = cross_entropy(logits, inputs["input_ids"][pairs[0], pairs[2]])
        return (ce * w[pairs[0], pairs[2]].to(ce.dtype)).sum()
