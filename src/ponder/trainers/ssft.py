"""Set supervised fine-tuning (SSFT) with global forking tokens (arXiv 2510.05132, docs/methods.md §1.3).

Per question, per step: the N x M matching-cost matrix (`ponder.ssft.costs_from_ids`, no gradient, one forward
for the whole batch of questions), the Hungarian assignment σ̂ (`ponder.ssft.match`), then the NLL of the M
matched full traces — the only sequences that are back-propagated:

    L_Hungarian(θ) = - Σ_j Σ_t log π_θ( r^(j)_t | x, g^(σ̂(j)), r^(j)_{<t} )        (docs/methods.md §1.3)

normalised like SFT (`loss_normalization`: per trained token over the optimizer batch, or per trace).

`SSFTConfig.assignment` switches the baselines with everything else equal:
- ``hungarian``: the paper's SSFT;
- ``random``: the random-σ ablation (a fresh uniformly random injective map per question per step);
- ``mixed``: SFT-mixed, all M traces under the plain ``<think>`` opener (no forking tokens are added);
- ``fixed``: trace j always gets tag j (an oracle for data whose traces come in a fixed source order).

Forking tokens are added as special tokens (`ponder.models.add_special_tokens`). Their rows are initialised
from ``token_init``: ``auto`` copies the ``<think>`` row when the tokenizer has ``<think>`` as one token (the
tags start as the opener the model already knows, so SSFT starts from the model's own reasoning behaviour;
the symmetric start is broken by the matching, whose exact ties we break at random by shuffling the traces
before the solver) and falls back to ``mean+noise`` (mean of the existing rows plus N(0, 0.02·std) noise)
otherwise. ``tags_only: true`` trains only those rows (PEFT `TrainableTokensConfig`); with ``lora`` the tag
rows are trained alongside the adapters (PEFT ``trainable_token_indices``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from peft import TrainableTokensConfig, get_peft_model

from ponder import ui
from ponder.config import check_choice
from ponder.engine import dist, models
from ponder.engine.chat import THINK_OPEN, pad_id
from ponder.engine.data import DataError, TraceSet, input_skips, load_tracesets, traceset_from_record
from ponder.engine.logprobs import weighted_cross_entropy
from ponder.methods import ssft
from ponder.trainers import configs
from ponder.trainers.base import (
    PonderTrainer,
    fit_context,
    model_and_tokenizer,
    no_examples_left,
    pack_collate,
    pad_collate,
    report_stats,
    source_name,
)
from ponder.trainers.configs import SupervisedConfig, config, option

ASSIGNMENTS = ("hungarian", "random", "mixed", "fixed")


@config
class SSFTConfig(SupervisedConfig):
    """SSFT: the trace sets, the forking tokens and their matching, and the forking evaluation the recipe runs
    after training (`ponder.ssft.evaluate_forking`)."""
    method: ClassVar[str] = "ssft"
    # -- data
    dataset: str | None = option("testbed:traces", "TraceSets: testbed:traces, .jsonl, hf:")
    n_train: int = option(2000, "number of TraceSets to load / generate")
    # -- forking tokens and matching
    num_tags: int = configs.num_tags("N forking tokens <think1>..<thinkN> (N >= M)")
    token_init: str = configs.token_init()
    tags_only: bool = configs.tags_only()
    prefix_len: int = option(16, "L: matching cost over each trace's first L tokens (0: whole trace)")
    assignment: str = option("hungarian", "hungarian | random | mixed | fixed")
    cost_layout: str = option("shared", "shared (prompt once, custom mask) | packed")
    # -- loss
    train_tag: bool = option(False, "also train the tag token as a target (not in the paper's loss)")
    # -- evaluation after training
    n_eval: int = option(0, "held-out problems to evaluate after training")
    eval_dataset: str = option("testbed", "problems for the evaluation")
    eval_per_tag: int = configs.eval_per_tag()
    eval_temperature: float = option(1.0, "sampling temperature of the evaluation")
    eval_max_new_tokens: int = option(128, "completion budget of the evaluation")

    def __post_init__(self):
        check_choice("assignment", self.assignment, ASSIGNMENTS)
        check_choice("cost_layout", self.cost_layout, ("shared", "packed"))
        if self.num_tags < 1:
            raise ValueError("num_tags must be >= 1")
        if self.prefix_len < 0:
            raise ValueError("prefix_len must be >= 0 (0: the whole trace)")
        super().__post_init__()

    @property
    def tags(self) -> list[str]:
        return [THINK_OPEN] if self.assignment == "mixed" else ssft.forking_tags(self.num_tags)


def resolve_token_init(tokenizer, init: str) -> str:
    if init != "auto":
        return init
    ids = tokenizer(THINK_OPEN, add_special_tokens=False)["input_ids"]
    return THINK_OPEN if len(ids) == 1 else "mean+noise"


def setup_model(model, tokenizer, tags: list[str], forking: bool, token_init: str = "auto", lora=None,
                tags_only: bool = False, seed: int = 0):
    """Add the forking tokens (if `forking`; missing ones only), then wrap the model for LoRA (+ the tag rows,
    PEFT ``trainable_token_indices``) or tag-rows-only training (PEFT `TrainableTokensConfig`). Returns
    (model, the ids of each tag)."""
    if forking:
        models.add_special_tokens(model, tokenizer, tags, resolve_token_init(tokenizer, token_init), seed=seed)
    tag_ids = ssft.tag_token_ids(tokenizer, tags, single=forking)
    flat = sorted({t for ids in tag_ids for t in ids})
    # The tag's log-prob as a first token depends on the tags' OUTPUT rows; on a model whose input and output
    # embeddings are tied those are the input rows, otherwise both rows must be trainable (docs/methods.md §1.10).
    rows = embedding_modules(model)
    if lora is not None:
        opts = dict(lora)
        if forking:
            opts.setdefault("trainable_token_indices", {name: flat for name in rows} if len(rows) > 1 else flat)
        model = models.apply_lora(model, opts)
    elif tags_only:
        if not forking:
            raise ValueError("tags_only trains the forking-token rows; assignment=mixed has none")
        # tied: PEFT finds the embedding and ties the output layer itself; untied: name both rows
        model = get_peft_model(model, TrainableTokensConfig(token_indices=flat,
                                                            target_modules=rows if len(rows) > 1 else None))
    return model, tag_ids


def embedding_modules(model) -> list[str]:
    """The input embedding's module name and, when its weight is not tied to it, the output embedding's."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    rows = [names[id(inp)]]
    if out is not None and out.weight.data_ptr() != inp.weight.data_ptr():
        if id(out) not in names:
            raise ValueError("tags_only on a model with untied output embeddings that PEFT cannot reach")
        rows.append(names[id(out)])
    return rows


class MatchStats:
    """Which tag wins which source, and how stable that is (docs/methods.md §1.8 "matching statistics").

    Per logging window: the source x tag count matrix; `purity` (share of each source's matches that go to its
    most frequent tag, pooled over sources: 1 = every source always gets the same tag, ~1/N·(a bit more) for
    random assignment); `distinct_modal_tags` (how many different tags are some source's favourite);
    `agree_prev` (share of sources whose favourite tag is the same as in the previous window);
    `revisit_same` (share of re-visited questions whose whole assignment is unchanged)."""

    def __init__(self, num_tags: int):
        self.num_tags = num_tags
        self.window: dict[str, Counter] = {}
        self.total: dict[str, Counter] = {}
        self.last: dict[str, tuple[int, ...]] = {}
        self.prev_modal: dict[str, int] = {}
        self.revisits = self.revisit_same = 0
        self.cost_matched = self.cost_all = 0.0
        self.n_questions = 0
        self.history: list[dict[str, Any]] = []

    def update(self, qid: str, sources: Sequence[str], sigma: Sequence[int], cost: torch.Tensor | None = None):
        for s, t in zip(sources, sigma):
            self.window.setdefault(s, Counter())[t] += 1
            self.total.setdefault(s, Counter())[t] += 1
        key = tuple(sigma)
        if qid in self.last:
            self.revisits += 1
            self.revisit_same += self.last[qid] == key
        self.last[qid] = key
        if cost is not None:
            self.cost_matched += ssft.assignment_cost(cost, sigma) / len(sigma)
            self.cost_all += float(cost.mean())
        self.n_questions += 1

    @staticmethod
    def _purity(counts: dict[str, Counter]) -> float:
        n = sum(sum(c.values()) for c in counts.values())
        return sum(max(c.values()) for c in counts.values()) / n if n else 0.0

    def summary(self, step: int) -> dict[str, float]:
        """Scalars for the trainer log (and a history entry with the window's count matrix); resets the window."""
        if not self.n_questions:
            return {}
        modal = {s: c.most_common(1)[0][0] for s, c in self.window.items()}
        out = {"match/purity": self._purity(self.window), "match/distinct_modal_tags": len(set(modal.values()))}
        if self.prev_modal:
            common = [s for s in modal if s in self.prev_modal]
            out["match/agree_prev"] = sum(modal[s] == self.prev_modal[s] for s in common) / max(len(common), 1)
        if self.revisits:
            out["match/revisit_same"] = self.revisit_same / self.revisits
        if self.cost_all:
            out["match/cost_matched"] = self.cost_matched / self.n_questions
            out["match/cost_mean"] = self.cost_all / self.n_questions
        self.history.append({"step": step, **out,
                             "counts": {s: [c[t] for t in range(self.num_tags)] for s, c in self.window.items()}})
        self.prev_modal = modal
        self.window, self.revisits, self.revisit_same = {}, 0, 0
        self.cost_matched = self.cost_all = 0.0
        self.n_questions = 0
        return out

    def totals(self) -> dict[str, list[int]]:
        return {s: [c[t] for t in range(self.num_tags)] for s, c in sorted(self.total.items())}


def as_traceset(item: Any, where: str, index: int = 0) -> TraceSet:
    if isinstance(item, TraceSet):
        return item
    if isinstance(item, dict):
        return traceset_from_record(item, where, index)
    raise DataError(f"{where}: expected a TraceSet or an object with question, answer, traces; "
                    f"got {type(item).__name__}")


def prepare(tokenizer, items, num_tags: int, max_length: int, normalization: str, train_tag: bool,
            tag_len: int, where: str = "dataset"):
    """Encode TraceSets once (`ponder.ssft.encode`): any tag can then be put in front of any trace. Questions
    with more traces than tags or over-length traces are skipped and counted."""
    out, stats = [], Counter()
    for i, item in enumerate(ui.progress(items, "encoding trace sets")):
        loc = f"{where}[{i}]"
        ts = as_traceset(item, loc, i)
        if len(ts.traces) > num_tags:
            stats["skipped_more_traces_than_tags"] += 1
            continue
        try:
            enc = ssft.encode(tokenizer, ts.question, ts.traces)
        except ValueError as e:
            raise DataError(f"{loc}: {e}") from None
        if max(len(enc.prompt) + tag_len + len(t) for t in enc.traces) > max_length:
            stats["skipped_too_long"] += 1
            continue
        tokens = sum(len(t) for t in enc.traces) + (tag_len * len(enc.traces) if train_tag else 0)
        units = len(enc.traces) if normalization == "messages" else tokens
        out.append({"id": ts.id or str(i), "prompt": enc.prompt, "traces": enc.traces, "sources": enc.sources,
                    "units": units})
        stats["traces"] += len(enc.traces)
    stats["examples"] = len(out)
    return out, stats


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {"items": batch, "units": torch.tensor([b["units"] for b in batch])}


def matched_examples(item: dict[str, Any], sigma: list[int], tag_ids: list[tuple[int, ...]], train_tag: bool,
                     normalization: str) -> list[dict[str, Any]]:
    """The M training sequences prompt + tag_{σ(j)} + r_j with their per-token loss weights (trace tokens;
    the tag too if train_tag)."""
    out = []
    for j, trace in enumerate(item["traces"]):
        tag = list(tag_ids[sigma[j]])
        n = len(trace) + (len(tag) if train_tag else 0)
        w = 1.0 / n if normalization == "messages" else 1.0
        weights = [0.0] * len(item["prompt"]) + [w if train_tag else 0.0] * len(tag) + [w] * len(trace)
        out.append({"input_ids": item["prompt"] + tag + trace, "weights": weights, "units": 0})
    return out


class SSFTTrainer(PonderTrainer):
    """`Trainer` for SSFT (TRL-shaped: SSFTTrainer + SSFTConfig). train_dataset: TraceSets (or records with
    question / answer / traces) or a data spec string; model: a model or a spec for `ponder.models.load`."""

    def __init__(self, model=None, args: SSFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = args or SSFTConfig()
        model, processing_class = model_and_tokenizer("SSFTTrainer", model, processing_class, args, lora=False)
        args.max_length = fit_context(model, args.max_length)
        tok = processing_class
        model, self.tag_ids = setup_model(model, tok, args.tags, args.assignment != "mixed", args.token_init,
                                          args.lora, args.tags_only, args.seed)
        self.tags = args.tags
        data = train_dataset if train_dataset is not None else args.dataset
        if data is None:
            raise ValueError("no training data: pass train_dataset or set `dataset` in the config")
        if isinstance(data, str):
            data = load_tracesets(data, n=args.n_train, seed=args.data_seed or args.seed)
        skips = input_skips(data)
        data = list(data)
        if data and args.assignment != "mixed":
            first = as_traceset(data[0], "train_dataset[0]")
            ssft.check_substitution(tok, first.question, first.traces[0], self.tags)
        self.data_stats: dict[str, Counter] = {}
        tag_len = max(len(t) for t in self.tag_ids)
        n_tags = 10**9 if args.assignment == "mixed" else args.num_tags  # mixed: one tag for any number of traces
        train, self.data_stats["train"] = prepare(tok, data, n_tags, args.max_length, args.loss_normalization,
                                                  args.train_tag, tag_len, where=source_name(args.dataset))
        self.data_stats["train"].update(skips)
        if not train:
            raise no_examples_left("trace sets", source_name(args.dataset), self.data_stats["train"], args.max_length)
        report_stats(self.data_stats)
        self.pad_id = pad_id(tok)
        self.match_stats = MatchStats(len(self.tags))
        self._matches: list = []  # assignments not yet counted: ((step, slot), [(id, sources, sigma, cost)])
        super().__init__(model=model, args=args, train_dataset=train, processing_class=tok, data_collator=collate,
                         **kwargs)

    # ---- assignment ------------------------------------------------------------------------------------

    def _rng(self, item) -> random.Random:
        # seeded by (seed, step, question): the same on resume and independent of batch composition
        return random.Random(f"{self.args.seed}-{self.state.global_step}-{item['id']}")

    def assign(self, model, items: list[dict[str, Any]]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """σ for each question (the tag index of each of its traces) and its cost matrix (hungarian only)."""
        mode = self.args.assignment
        none = [None] * len(items)
        if mode == "mixed":
            return [[0] * len(it["traces"]) for it in items], none
        if mode == "fixed":
            return [list(range(len(it["traces"]))) for it in items], none
        if mode == "random":
            return [ssft.random_match(len(self.tags), len(it["traces"]), self._rng(it)) for it in items], none
        perms = []
        for it in items:  # shuffle the traces so that exact cost ties are broken at random, not by source order
            p = list(range(len(it["traces"])))
            self._rng(it).shuffle(p)
            perms.append(p)
        was_training = model.training
        model.eval()
        try:
            costs = ssft.costs_from_ids(model, [(it["prompt"], self.tag_ids, [it["traces"][j] for j in p])
                                                for it, p in zip(items, perms)],
                                        self.args.prefix_len or None, self.args.cost_layout, self.pad_id)
        finally:
            model.train(was_training)
        sigmas, ordered = [], []
        for p, c in zip(perms, costs):
            sp = ssft.match(c)
            sigma = [0] * len(p)
            for k, j in enumerate(p):
                sigma[j] = sp[k]
            sigmas.append(sigma)
            ordered.append(c[:, [p.index(j) for j in range(len(p))]])  # back in the item's trace order
        return sigmas, ordered

    # ---- loss ------------------------------------------------------------------------------------------

    def weighted_loss_sum(self, model, inputs):
        items = inputs["items"]
        sigmas, costs = self.assign(model, items)
        if model.training:  # counted at the next log, in the global batch's order (`flush_matches`)
            self._matches.append(((self.state.global_step, self.slot), [
                (it["id"], it["sources"], s, None if c is None else c.cpu()) for it, s, c in zip(items, sigmas, costs)]))
        exs = [e for it, s in zip(items, sigmas)
               for e in matched_examples(it, s, self.tag_ids, self.args.train_tag, self.args.loss_normalization)]
        batch = (pack_collate(self.pad_id, self.args.packing_length) if self.args.packing
                 else pad_collate(self.pad_id))(exs)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        return weighted_cross_entropy(model, batch)

    # ---- logging and saving ----------------------------------------------------------------------------

    def flush_matches(self) -> None:
        """Count the assignments made since the last call into `match_stats`: every process's, in the order one
        process would have made them (step, then slot), so the statistics do not depend on the number of
        processes. Every process must call it (a gather)."""
        parts = dist.gather(self._matches) if self.accelerator.num_processes > 1 else [self._matches]
        self._matches = []
        for _, updates in sorted((m for p in parts for m in p), key=lambda m: m[0]):
            for qid, sources, sigma, cost in updates:
                self.match_stats.update(qid, sources, sigma, cost)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.args.assignment != "mixed":
            self.flush_matches()
            logs = {**logs, **self.match_stats.summary(self.state.global_step)}
        super().log(logs, start_time)
