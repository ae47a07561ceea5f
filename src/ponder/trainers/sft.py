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

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ponder.chat import Rendered, render
from ponder.data import DataError, as_conversation
from ponder.logprobs import cross_entropy, logits_at, shift_pairs


@dataclass
class SFTConfig(TrainingArguments):
    model: str = field(default="testbed", metadata={"help": "model spec for ponder.models.load (CLI runs)"})
    dataset: str | None = field(default=None, metadata={"help": "conversations: .jsonl, hf:<name>, directory"})
    max_length: int = field(default=2048, metadata={"help": "longer examples are skipped and counted"})
    loss_normalization: str = field(default="tokens", metadata={"help": "tokens | messages"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (fp32 on CPU)"})
    lora: dict | None = field(default=None, metadata={"help": "PEFT LoRA options, e.g. {r: 16, alpha: 32}"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "sdpa | eager | flex_attention (GPU: the one-pass BlockMask); default: ponder.models.load's"})
    packing: bool = field(default=False, metadata={"help": "pack examples into rows (block-diagonal attention)"})
    packing_length: int = field(default=512, metadata={"help": "tokens per packed row"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep ponder's loss weights"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard | wandb | none"})

    def __post_init__(self):
        if self.loss_normalization not in ("tokens", "messages"):
            raise ValueError(f"loss_normalization must be 'tokens' or 'messages', got {self.loss_normalization!r}")
        if self.output_dir is None:
            self.output_dir = "runs/sft"
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; silence the per-run warning
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


def encode(tokenizer, messages: list[dict[str, Any]], normalization: str = "tokens") -> dict[str, Any]:
    """One SFT example: ids, per-token weights, the number of loss units, and untrainable history turns."""
    segs = render(tokenizer, messages)
    weights = message_weights(messages)
    last = len(messages) - 1
    hidden = [i for i in weights if i != last and messages[i].get("reasoning") and weights[i]]
    for i in hidden:
        weights[i] = 0.0
    weights = {i: w for i, w in weights.items() if w}
    tw = token_weights(segs, weights, normalization)
    units = len(weights) if normalization == "messages" else sum(1 for w in tw if w)
    return {"input_ids": segs.ids, "weights": tw, "units": units, "hidden_reasoning_turns": len(hidden)}


def prepare(tokenizer, items, max_length: int, normalization: str, where: str = "dataset"):
    """Encode a dataset; over-length and weightless examples are skipped and counted."""
    from ponder import ui
    examples, stats = [], Counter()
    for i, item in enumerate(ui.progress(items, "tokenizing")):
        conv = as_conversation(item, f"{where}[{i}]")
        try:
            ex = encode(tokenizer, conv.messages, normalization)
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


def pad_collate(pad_id: int):
    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        w = torch.zeros((len(batch), n), dtype=torch.float64)
        for r, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[r, :k] = torch.tensor(b["input_ids"])
            att[r, :k] = 1
            w[r, :k] = torch.tensor(b["weights"], dtype=torch.float64)
        return {"input_ids": ids, "attention_mask": att, "weights": w,
                "units": torch.tensor([b["units"] for b in batch])}
    return collate


def pack_collate(pad_id: int, row_length: int):
    """Pack a batch into rows of at most `row_length` tokens (first-fit, longest first) with position ids
    restarting at each example and no attention mask: transformers then builds a block-diagonal causal mask,
    so packed examples never see each other and the loss equals the padded batch's, with little padding."""
    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cap = max(row_length, max(len(b["input_ids"]) for b in batch))
        rows: list[list[dict[str, Any]]] = []
        fill: list[int] = []
        for b in sorted(batch, key=lambda b: -len(b["input_ids"])):
            n = len(b["input_ids"])
            r = next((i for i, f in enumerate(fill) if f + n <= cap), None)
            if r is None:
                rows.append([])
                fill.append(0)
                r = len(rows) - 1
            rows[r].append(b)
            fill[r] += n
        width = max(fill)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        w = torch.zeros((len(rows), width), dtype=torch.float64)
        for r, row in enumerate(rows):
            at = 0
            for b in row:
                k = len(b["input_ids"])
                ids[r, at:at + k] = torch.tensor(b["input_ids"])
                pos[r, at:at + k] = torch.arange(k)
                w[r, at:at + k] = torch.tensor(b["weights"], dtype=torch.float64)
                at += k
            pos[r, at:] = torch.arange(width - at)  # padding: a separate "sequence", never trained
        return {"input_ids": ids, "position_ids": pos, "weights": w,
                "units": torch.tensor([b["units"] for b in batch])}
    return collate


class PonderTrainer(Trainer):
    """HF Trainer with atomic checkpoints and a loss whose denominator spans the whole optimizer batch
    (`units` per example). Subclasses implement `example_loss_terms` -> (sum of weighted per-token losses)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True  # our loss is already divided by the optimizer-batch units

    def _get_num_items_in_batch(self, batch_samples, device):
        units = sum(int(b["units"].sum()) for b in batch_samples)
        units = torch.tensor(units, device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            units = self.accelerator.gather(units).sum()
        return units

    def weighted_loss_sum(self, model, inputs) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total = self.weighted_loss_sum(model, inputs)
        if num_items_in_batch is None:  # evaluation: normalise within the batch
            return total / inputs["units"].sum().clamp(min=1)
        loss = total / num_items_in_batch.clamp(min=1)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging folder, then rename it into place: a crash never leaves a
        half-written checkpoint-N that resume would pick up."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, ".staging")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._get_output_dir = lambda trial=None: staging  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            from transformers.trainer_utils import rotate_checkpoints
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


def model_and_tokenizer(trainer: str, model, processing_class, args, lora: bool = True):
    """The (model, tokenizer) a trainer works on. `model` None or a spec string: loaded by `ponder.models.load`
    with the config's dtype, attention and (if `lora`) LoRA; a model object: the config's LoRA applied (if
    `lora`), and its tokenizer must be given."""
    if isinstance(model, str) or model is None:
        from ponder.models import load
        return load(model or args.model, dtype=args.dtype, lora=args.lora if lora else None,
                    attn_implementation=getattr(args, "attn_implementation", None))
    if lora and args.lora is not None:
        from ponder.models import apply_lora
        model = apply_lora(model, args.lora)
    if processing_class is None:
        raise ValueError(f"{trainer} needs the tokenizer (processing_class) when given a model object")
    return model, processing_class


class SFTTrainer(PonderTrainer):
    """`Trainer` for conversations. train_dataset: conversations (lists of messages, records with
    ``messages``, `Conversation`s) or a data spec string; model: a model or a spec for `ponder.models.load`."""

    def __init__(self, model=None, args: SFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = args or SFTConfig()
        model, processing_class = model_and_tokenizer("SFTTrainer", model, processing_class, args)
        tok = processing_class
        train_dataset = _resolve(train_dataset if train_dataset is not None else args.dataset, "train")
        self.data_stats: dict[str, Counter] = {}
        train, self.data_stats["train"] = prepare(tok, train_dataset, args.max_length, args.loss_normalization,
                                                  where=_name(args.dataset, "train_dataset"))
        if not train:
            raise DataError("no trainable examples left after skipping (see the counts above)")
        evald = None
        if eval_dataset is not None:
            evald, self.data_stats["eval"] = prepare(tok, _resolve(eval_dataset, "test"), args.max_length,
                                                     args.loss_normalization, where="eval_dataset")
        _report_stats(self.data_stats)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
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


def _name(spec, default):
    return spec if isinstance(spec, str) else default


def _resolve(ds, split: str):
    if ds is None:
        raise ValueError("no training data: pass train_dataset or set `dataset` in the config")
    if isinstance(ds, str):
        from ponder.data import load_conversations
        return load_conversations(ds, split=split)
    return ds


def _report_stats(stats: dict[str, Counter]) -> None:
    from ponder import ui
    for split, c in stats.items():
        msg = f"{split}: {c['examples']} examples"
        if c["skipped_too_long"]:
            msg += f", skipped {c['skipped_too_long']} longer than max_length"
        if c["skipped_no_trained_tokens"]:
            msg += f", skipped {c['skipped_no_trained_tokens']} with nothing to train"
        if c["hidden_reasoning_turns"]:
            msg += (f", {c['hidden_reasoning_turns']} history turns with reasoning not trained "
                    "(use `ponder onepass` to train them)")
        ui.info(msg)
