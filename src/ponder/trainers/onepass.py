"""One-pass multi-turn reasoning SFT (arXiv 2504.18246): every turn of a conversation trained in one forward,
earlier turns' reasoning hidden from later turns exactly as at inference, losses identical to N passes.

Modes (`OnePassConfig.mode`), all trained on the same tokens with the same loss:
- ``onepass``: the layout of `ponder.masks` on the tree engine `ponder.tree` (answers duplicated, block-sparse
  mask, explicit positions);
- ``npass``: the reference — one sample per assistant turn (history reasoning stripped, that turn trained);
- ``kpass``: turns split into `kpass_chunks` chunks, one-pass inside a chunk, earlier chunks as context
  (between the two in memory and time).

Batches are made of conversations in every mode, so a run's loss curve does not depend on the mode.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import torch

from ponder import ui
from ponder.config import check_choice
from ponder.engine import masks
from ponder.engine.chat import pad_id
from ponder.engine.data import DataError, as_conversation, input_skips
from ponder.engine.logprobs import cross_entropy, weighted_cross_entropy
from ponder.engine.tree import ATTENTION_MODES, check_attention_backend
from ponder.methods.onepass import chunks, onepass_logits
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
from ponder.trainers.configs import SupervisedConfig, check_supervised, config, option
from ponder.trainers.sft import encode

MODES = ("onepass", "npass", "kpass")


@config
class OnePassConfig(SupervisedConfig):
    """One-pass multi-turn SFT: the history, the mode and the attention backend."""
    method: ClassVar[str] = "onepass"
    dataset: str | None = option(None, "multi-turn conversations: .jsonl, hf:<name>, directory")
    history_reasoning: str = configs.history_reasoning()
    mode: str = option("onepass", "onepass | npass | kpass")
    kpass_chunks: int = option(2, "kpass: number of chunks of turns")
    attention: str = configs.attention()

    def __post_init__(self):
        check_onepass(self)
        super().__post_init__()


def check_onepass(cfg) -> None:
    """The checks of the supervised and one-pass fields (OnePassConfig's, RISEConfig's)."""
    check_supervised(cfg)
    check_choice("mode", cfg.mode, MODES)
    check_choice("attention", cfg.attention, ATTENTION_MODES)
    if cfg.kpass_chunks < 1:
        raise ValueError("kpass_chunks must be >= 1")


def prepare(tokenizer, items, mode: str, max_length: int, normalization: str, kpass_chunks: int = 2,
            where: str = "dataset", history_reasoning: str = "strip"):
    """Per conversation, the units the collator packs: one Layout (onepass), one Layout per chunk (kpass),
    or one SFT example per assistant turn (npass). Over-length conversations are skipped and counted.

    history_reasoning ``keep``: later turns see earlier reasoning, so the conversation is an ordinary causal
    sequence — onepass / kpass train it as one SFT example (every turn where it stands), npass as one example
    per turn; no duplicated answers are needed."""
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
                    parts.append(encode(tokenizer, sub, normalization, history_reasoning))
                    parts[-1].pop("hidden_reasoning_turns")
                lengths = [len(p["input_ids"]) for p in parts]
            elif history_reasoning == "keep":
                parts = [encode(tokenizer, msgs, normalization, "keep")] if asst else []
                for p in parts:
                    p.pop("hidden_reasoning_turns")
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
        stats["dataset_tokens"] += sum(lengths)  # one epoch's; `tokens_forwarded` is what training forwarded
    stats["examples"] = len(out)
    return out, stats


def make_collate(plain: bool, pad_id: int, packing_length: int | None):
    """plain: the parts are ordinary causal SFT examples (npass, or history_reasoning keep); else Layouts."""
    sft_collate = pack_collate(pad_id, packing_length) if packing_length else pad_collate(pad_id)

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        parts = [p for b in batch for p in b["parts"]]
        units = torch.tensor([b["units"] for b in batch])
        out = sft_collate(parts) if plain else masks.collate(parts, pad_id, packing_length).inputs()
        out["units"] = units
        out["tokens"] = torch.tensor([b["tokens"] for b in batch])  # counted as forwarded (padding not)
        return out
    return collate


class OnePassTrainer(PonderTrainer):
    """`Trainer` for multi-turn reasoning conversations (TRL-shaped: OnePassTrainer + OnePassConfig)."""

    def __init__(self, model=None, args: OnePassConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = args or OnePassConfig()
        model, processing_class = model_and_tokenizer("OnePassTrainer", model, processing_class, args)
        args.max_length = fit_context(model, args.max_length)
        plain = args.mode == "npass" or args.history_reasoning == "keep"
        if not plain:
            check_attention_backend(model)
        tok = processing_class
        self.data_stats: dict[str, Counter] = {}
        opts = dict(mode=args.mode, max_length=args.max_length, normalization=args.loss_normalization,
                    kpass_chunks=args.kpass_chunks, history_reasoning=args.history_reasoning)
        source = train_dataset if train_dataset is not None else args.dataset
        convs = resolve_conversations(source, "train")
        train, self.data_stats["train"] = prepare(tok, convs, where=source_name(args.dataset), **opts)
        self.data_stats["train"].update(input_skips(convs))
        if not train:
            raise no_examples_left("conversations", source_name(args.dataset), self.data_stats["train"],
                                   args.max_length)
        evald = None
        if eval_dataset is not None:
            evald, self.data_stats["eval"] = prepare(tok, resolve_conversations(eval_dataset, "test"),
                                                     where="eval_dataset", **opts)
        report_stats(self.data_stats)
        super().__init__(model=model, args=args, train_dataset=train, eval_dataset=evald, processing_class=tok,
                         data_collator=make_collate(plain, pad_id(tok), args.packing_length if args.packing else None),
                         **kwargs)

    def train(self, *args, **kwargs):
        """Train, then record ``tokens_forwarded``: the tokens of the examples the training steps forwarded
        (padding not counted), every process's; ``dataset_tokens`` is one epoch's worth."""
        self._forwarded = 0
        out = super().train(*args, **kwargs)
        n = torch.tensor(self._forwarded, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            n = self.accelerator.reduce(n, "sum")
        self.data_stats["train"]["tokens_forwarded"] = int(n)
        return out

    def weighted_loss_sum(self, model, inputs):
        if model.training:
            self._forwarded = getattr(self, "_forwarded", 0) + int(inputs["tokens"].sum())
        if "pairs" not in inputs:  # plain causal samples (npass, or history kept)
            return weighted_cross_entropy(model, inputs)
        batch = masks.Batch(**{k: inputs[k] for k in masks.Batch.__dataclass_fields__})
        pairs, w = batch.pairs, batch.pair_weight
        logits = onepass_logits(model, batch, self.args.attention)
        ce = cross_entropy(logits, inputs["input_ids"][pairs[0], pairs[2]])
        return (ce * w.to(ce.dtype)).sum()

