"""Multi-turn RL on retry episodes, each episode trained as one tree in one pass (docs/methods.md §7; the pieces
are `ponder.retry`; environment RISE's, arXiv 2407.18219 §3; turn-level credit after UFO, arXiv 2507.14295).

One optimizer update (`get_batch_samples` sees all its micro-batches):
1. per problem, G episodes of up to T attempts sampled on-policy (`ponder.retry.rollout_episodes`, seeded by
   (seed, step, slot) like LaTRO, so a resumed run samples what the uninterrupted one did); the feedback after a
   wrong attempt is RISE's retry prompt, a correct attempt ends the episode; the reward is `rise.Env.score`
   (`ponder.verify`);
2. per-turn advantages A_{i,t} over the episodes of the same problem that reached turn t
   (`ponder.retry.turn_advantages`: rloo | grpo, credit turn | return with γ);
3. per micro-batch, every episode as ONE tree (`ponder.retry.prefix_tree` of its [prompt_t attempt_t]) packed
   several per row (`ponder.tree.pack`, `row_length`), one forward (`ponder.tree.logprobs`); the loss

       L = (1/N) Σ_{i,t,j} w_{t,j} · ( -A_{i,t} · log π(a_{i,t,j} | ·) + β · k3_{i,t,j} ),
       k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1   (TRL GRPO's KL estimator)

   with w = 1 and N = attempt tokens of the update (``loss_normalization: tokens``), or w = 1/|a_{i,t}| and N =
   attempts (``attempts``); π_ref is the starting model (LoRA: the adapter disabled; else a frozen copy), its
   log-probs from the same packed trees. ``layout: turns`` forwards each attempt as its own sequence instead
   (the reference: same loss, more tokens).
One optimizer step per batch of episodes (on-policy): no importance ratio, no clipping.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import TrainingArguments

from ponder import retry, rise, rollout, tree
from ponder.chat import HISTORY_REASONING, pad_id
from ponder.data import DataError, resolve_problems
from ponder.trainers.base import PonderTrainer, cpu_processes, model_and_tokenizer, save_merged
from ponder.trainers.latro import disable_dropout

LAYOUTS = ("tree", "turns")
NORMALIZATIONS = ("tokens", "attempts")


@dataclass
class RetryConfig(TrainingArguments):
    model: str = field(default="testbed", metadata={"help": "model spec for ponder.models.load (CLI runs)"})
    dataset: str | None = field(default="testbed", metadata={"help": "problems: testbed | rg:<task> | .jsonl | hf:"})
    dataset_split: str = field(default="train", metadata={"help": "split of `dataset` to train on"})
    n_train: int | None = field(default=512, metadata={"help": "number of training problems (None: all)"})
    dataset_seed: int = field(default=0, metadata={"help": "seed of generated problems (testbed, rg:<task>)"})
    num_generations: int = field(default=8, metadata={"help": "G: episodes per problem (the advantage group)"})
    max_turns: int = field(default=2, metadata={"help": "T: most attempts per episode"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature"})
    max_new_tokens: int = field(default=128, metadata={"help": "per attempt"})
    history_reasoning: str = field(default="strip", metadata={
        "help": "strip (earlier reasoning hidden, as at inference) | keep (earlier attempts in full)"})
    context_window: int = field(default=0, metadata={"help": "sliding window of attempts shown (rise.window); 0: all"})
    reward: str = field(default="verify", metadata={"help": "verify | rise_official (GSM8K +1/0/-1)"})
    demo: bool = field(default=False, metadata={"help": "instruction + one-shot demo prefix (math chat models)"})
    advantage: str = field(default="rloo", metadata={"help": "rloo | grpo, per turn over the problem's episodes"})
    credit: str = field(default="turn", metadata={"help": "turn (A from r_t) | return (A from Σ γ^(s-t) r_s)"})
    gamma: float = field(default=1.0, metadata={"help": "discount of credit: return"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (k3 to the starting model); 0: no ref"})
    loss_normalization: str = field(default="tokens", metadata={
        "help": "tokens (mean over attempt tokens) | attempts (each attempt's token mean, averaged)"})
    layout: str = field(default="tree", metadata={"help": "tree (one tree per episode) | turns (each attempt its "
                                                           "own sequence: the reference)"})
    row_length: int = field(default=2048, metadata={"help": "tokens per packed row (several episodes per row)"})
    attention: str = field(default="auto", metadata={"help": "auto | sparse | dense | flex (no CPU backward)"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences per generation batch"})
    rollout_backend: str = field(default="auto", metadata={"help": "sampler: auto | generate | lean | vllm | vllm-server "
                                                                     "(docs/methods.md §6)"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (fp32 on CPU)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run Python code a model folder ships"})
    lora: dict | None = field(default=None, metadata={"help": "PEFT LoRA options, e.g. {r: 16, alpha: 32}"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "problems per device per micro-step "
                                                                         "(each with G episodes)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the problem indices"})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "batches are index lists"})

    def __post_init__(self):
        retry.one_of("history_reasoning", self.history_reasoning, HISTORY_REASONING)
        retry.one_of("advantage", self.advantage, retry.ADVANTAGES)
        retry.one_of("credit", self.credit, retry.CREDITS)
        retry.one_of("reward", self.reward, rise.REWARDS)
        retry.one_of("loss_normalization", self.loss_normalization, NORMALIZATIONS)
        retry.one_of("layout", self.layout, LAYOUTS)
        retry.one_of("attention", self.attention, tree.ATTENTION_MODES)
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (the advantage is relative to the group), got "
                             f"{self.num_generations}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (retry samples its episodes), got {self.temperature}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.max_new_tokens < 1 or self.row_length < 1 or self.context_window < 0:
            raise ValueError("max_new_tokens and row_length must be >= 1, context_window >= 0")
        rollout.check_backend(self.rollout_backend)
        if self.output_dir is None:
            self.output_dir = "runs/retry"
        cpu_processes(self)
        super().__post_init__()


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {"index": torch.tensor([b["index"] for b in batch]), "units": torch.ones(len(batch), dtype=torch.long)}


@dataclass
class Plan:
    """One micro-batch's episodes as packed trees: per pair its weight (A·w) and KL weight (w)."""
    packed: tree.Packed
    kl_weight: torch.Tensor
    units: int
    ref: torch.Tensor | None = None


def token_weights(ep: retry.Episode, normalization: str) -> list[float]:
    """w_t per attempt: 1 (``tokens``) or 1/|a_t| (``attempts``)."""
    return [1.0 / max(len(a), 1) if normalization == "attempts" else 1.0 for a in ep.attempts]


def episode_forest(ep: retry.Episode, advantages: list[float], normalization: str, layout: str) -> list[tree.Tree]:
    """An episode's trees — one, or one per attempt under ``layout: turns`` — attempt t scored with A_t·w_t per
    token, group label t."""
    w = [a * p for a, p in zip(advantages, token_weights(ep, normalization))]
    if layout == "tree":
        return [retry.prefix_tree(ep.sequences, w)]
    return [retry.prefix_tree([s], [x], [t]) for t, (s, x) in enumerate(zip(ep.sequences, w))]


class RetryTrainer(PonderTrainer):
    """`Trainer` for multi-turn retry RL (TRL-shaped: RetryTrainer + RetryConfig). train_dataset: problems (or a
    spec string, default `args.dataset`); model: a model or a spec for `ponder.models.load`."""

    def __init__(self, model=None, args: RetryConfig | None = None, train_dataset=None, processing_class=None,
                 ref_model=None, **kwargs):
        args = args or RetryConfig()
        model, processing_class = model_and_tokenizer("RetryTrainer", model, processing_class, args)
        disable_dropout(model)  # exact log-probs: the loss is a sum over sampled tokens
        self.ref_model = None
        if args.beta > 0 and not isinstance(model, PeftModel):
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.eval().requires_grad_(False)
        self.problems = resolve_problems(train_dataset if train_dataset is not None else args.dataset, args.n_train,
                                         args.dataset_split, "train_dataset", args.dataset_seed)
        if not self.problems:
            raise DataError("no training problems")
        self.env = rise.Env(args.reward, args.demo, history_reasoning=args.history_reasoning)
        self.data_stats = {"train": {"problems": len(self.problems)}}
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._plans: list[Plan] = []
        self.sampled = {"attempts": 0, "tokens": 0}  # this process's rollout budget (compared with RISE's)
        items = [{"index": i} for i in range(len(self.problems))]
        super().__init__(model=model, args=args, train_dataset=items, processing_class=processing_class,
                         data_collator=collate, **kwargs)
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device)

    # -- one update: every micro-batch's episodes first, then the micro-batch losses ----------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = list(itertools.islice(epoch_iterator, num_batches))  # fewer at the end of the data
        self._plans = []
        for m, b in enumerate(batches):
            self._plans.append(self.plan(b["index"].tolist(), self._seed(m)))
            b["plan"] = m
            b["units"] = torch.tensor([self._plans[-1].units])
        return batches, self._get_num_items_in_batch(batches, device)

    def _seed(self, micro: int = 0) -> int:
        slot = micro * self.accelerator.num_processes + self.accelerator.process_index
        return (self.args.seed * 1_000_003 + self.state.global_step) * 64 + slot

    @torch.no_grad()
    def plan(self, index: list[int], seed: int) -> Plan:
        """Sample the episodes of these problems, reward them, compute per-turn advantages and pack the trees."""
        a = self.args
        policy = self.accelerator.unwrap_model(self.model)
        was_training = policy.training
        policy.eval()
        eps = retry.rollout_episodes(policy, self.processing_class, [self.problems[i] for i in index], self.env,
                                     a.num_generations, a.max_turns, a.temperature, a.max_new_tokens, seed,
                                     a.generation_batch_size, a.rollout_backend, a.context_window or None)
        policy.train(was_training)
        trees, per = [], []   # per tree: the KL weight w_t of each of its episode's attempts
        for row in eps:
            adv = retry.turn_advantages([e.rewards for e in row], a.advantage, a.credit, a.gamma)
            self._metrics["advantage_abs"] += [abs(x) for ad in adv for x in ad]
            for e, ad in zip(row, adv):
                ts = episode_forest(e, ad, a.loss_normalization, a.layout)
                trees += ts
                per += [token_weights(e, a.loss_normalization)] * len(ts)
        packed = tree.pack([tree.flatten(t) for t in trees], pad_id(self.processing_class), a.row_length)
        kl = torch.tensor([per[i][g] for i, g in zip(packed.pair_tree.tolist(), packed.pair_group.tolist())],
                          dtype=torch.float64)
        n_att = sum(len(e.attempts) for row in eps for e in row)
        units = n_att if a.loss_normalization == "attempts" else int(packed.pairs.shape[1])
        plan = Plan(packed, kl, units)
        if a.beta > 0:
            plan.ref = self.ref_logprobs(policy, packed.to(self.accelerator.device))
        self._record(eps, packed)
        return plan

    @torch.no_grad()
    def ref_logprobs(self, model, packed: tree.Packed) -> torch.Tensor:
        """log π_ref of every pair: the frozen copy, or the same model with its LoRA adapter disabled."""
        if self.ref_model is not None:
            return tree.logprobs(self.ref_model, packed, self.args.attention)
        with model.disable_adapter():
            return tree.logprobs(model, packed, self.args.attention)

    def weighted_loss_sum(self, model, inputs):
        if "plan" not in inputs:  # a batch that did not come through get_batch_samples
            self._plans = [self.plan(inputs["index"].tolist(), self._seed())]
            inputs["plan"] = 0
        p = self._plans[inputs["plan"]]
        packed = p.packed.to(self.accelerator.device)
        lp = tree.logprobs(model, packed, self.args.attention)
        w = packed.pair_weight.to(lp.dtype)
        loss = -(w * lp).sum()
        if p.ref is not None:
            d = p.ref.to(lp.dtype) - lp
            k3 = torch.exp(d) - d - 1
            kw = p.kl_weight.to(lp.device, lp.dtype)
            loss = loss + self.args.beta * (kw * k3).sum()
            if model.training:
                self._metrics["kl"].append(float((kw * k3.detach()).sum() / kw.sum().clamp(min=1e-12)))
        return loss

    # -- logging ------------------------------------------------------------------------------------------

    def _record(self, eps: list[list[retry.Episode]], packed: tree.Packed) -> None:
        flat = [e for row in eps for e in row]
        T = self.args.max_turns
        m = self._metrics
        for t in range(T):
            at = [e.rewards[t] for e in flat if len(e.rewards) > t]
            if at:
                m[f"reward/turn{t + 1}"].append(sum(at) / len(at))
                m[f"accuracy/turn{t + 1}"].append(sum(r >= 1.0 for r in at) / len(at))
            m[f"solved_by_turn{t + 1}"].append(sum(any(r >= 1.0 for r in e.rewards[:t + 1]) for e in flat) / len(flat))
        m["attempts_per_episode"].append(sum(len(e.attempts) for e in flat) / len(flat))
        self.sampled["attempts"] += sum(len(e.attempts) for e in flat)
        self.sampled["tokens"] += sum(len(a) for e in flat for a in e.attempts)
        per_turn = sum(len(p) + len(a) for e in flat for p, a in e.sequences)
        m["tokens_forwarded"].append(float(packed.tokens))
        m["tokens_per_turn_samples"].append(float(per_turn))
        m["tokens_ratio"].append(per_turn / max(packed.tokens, 1))
        m["attempt_tokens"].append(sum(len(a) for e in flat for a in e.attempts) / max(sum(len(e.attempts)
                                                                                            for e in flat), 1))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            for key, vals in self._metrics.items():
                logs[key] = sum(vals) / len(vals)
            self._metrics.clear()
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        save_merged(self, output_dir, _internal_call)
