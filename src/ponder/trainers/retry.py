"""Multi-turn RL on retry episodes, each episode trained as one tree in one pass (docs/methods.md §7; the pieces
are `ponder.retry`; environment RISE's, arXiv 2407.18219 §3; turn-level credit after UFO, arXiv 2507.14295).

One optimizer update (`get_batch_samples` sees all its micro-batches):
1. per problem, G episodes of up to T attempts sampled on-policy (`ponder.retry.rollout_episodes`, seeded by
   (seed, step, slot) like LaTRO, so a resumed run samples what the uninterrupted one did); the feedback after a
   wrong attempt is RISE's retry prompt, a correct attempt ends the episode; the reward is `episodes.Env.score`
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

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ponder.config import check_choice
from ponder.engine import tree
from ponder.engine.chat import HISTORY_REASONING, pad_id
from ponder.engine.data import DataError, input_skips, resolve_problems
from ponder.methods import episodes, retry
from ponder.methods.advantages import finite_rewards
from ponder.trainers import configs
from ponder.trainers.base import PonderTrainer, model_and_tokenizer
from ponder.trainers.configs import SamplingConfig, check_unit_size, config, option
from ponder.trainers.rl import disable_dropout, reference_forward, reference_model, update_seed

LAYOUTS = ("tree", "turns")
NORMALIZATIONS = ("tokens", "attempts")


@config
class RetryConfig(SamplingConfig):
    """Retry RL (docs/methods.md §7): the episodes, the reward and its credit, the loss and its layout, and the
    evaluation the recipe runs before and after training (RISE's, docs/methods.md §3.7)."""
    method: ClassVar[str] = "retry"
    # -- episodes
    max_turns: int = option(2, "T: most attempts per episode")
    history_reasoning: str = configs.history_reasoning(
        "strip", "strip (earlier reasoning hidden, as at inference) | keep (earlier attempts in full)")
    context_window: int = option(0, "sliding window of attempts shown (episodes.window); 0: all")
    reward: str = option("verify", "verify | rise_official (GSM8K +1/0/-1)")
    demo: bool = option(False, "instruction + one-shot demo prefix (math chat models)")
    # -- advantage and loss
    advantage: str = option("rloo", "rloo | grpo, per turn over the problem's episodes")
    credit: str = option("turn", "turn (A from r_t) | return (A from Σ γ^(s-t) r_s)")
    gamma: float = option(1.0, "discount of credit: return")
    nan_rewards: str = option("raise", "raise | skip (a NaN or ±inf reward leaves its turn's group, advantage 0, "
                                       "counted)")
    beta: float = option(0.0, "KL coefficient (k3 to the starting model); 0: no ref")
    loss_normalization: str = configs.loss_normalization(
        "tokens", "tokens (mean over attempt tokens) | attempts (each attempt's token mean, averaged)")
    layout: str = option("tree", "tree (one tree per episode) | turns (each attempt its own sequence: the "
                                 "reference)")
    row_length: int = option(2048, "tokens per packed row (several episodes per row)")
    attention: str = configs.attention()
    per_device_train_batch_size: int = option(4, "problems per device per micro-step (each with G episodes)")
    # -- evaluation (the recipe's: before and after training)
    eval_dataset: str | None = option(None, "held-out problems (default: `dataset`)")
    n_eval: int = option(200, "number of held-out problems")
    eval_split: str = option("test", "split of `eval_dataset`")
    eval_turns: int = option(5, "sequential turns (feedback always 'incorrect')")
    eval_parallel: int = option(5, "parallel first-turn samples (m{k}@t1, p{k}@t1)")
    eval_temperature: float = option(1.0, "the official RISE evaluation samples at 1.0")
    eval_base: bool = option(True, "evaluate the starting model too (the guard)")
    unit_size: int | None = option(None, "problems per evaluation work unit (each seeded by its index): set it to "
                                         "get the same evaluation with any number of processes; unset: one unit "
                                         "per process")

    def __post_init__(self):
        check_choice("history_reasoning", self.history_reasoning, HISTORY_REASONING)
        check_choice("advantage", self.advantage, retry.ADVANTAGES)
        check_choice("credit", self.credit, retry.CREDITS)
        check_choice("reward", self.reward, episodes.REWARDS)
        check_choice("loss_normalization", self.loss_normalization, NORMALIZATIONS)
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("attention", self.attention, tree.ATTENTION_MODES)
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.row_length < 1 or self.context_window < 0:
            raise ValueError("row_length must be >= 1, context_window >= 0")
        if self.n_eval < 1 or self.eval_turns < 1 or self.eval_parallel < 0:
            raise ValueError("n_eval and eval_turns must be >= 1, eval_parallel >= 0")
        if self.eval_temperature < 0:
            raise ValueError(f"eval_temperature must be >= 0, got {self.eval_temperature}")
        check_unit_size(self.unit_size)
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
        self.ref_model = reference_model(model, args.beta, ref_model)
        self.problems = resolve_problems(train_dataset if train_dataset is not None else args.dataset, args.n_train,
                                         args.dataset_split, "train_dataset", args.problem_seed())
        if not self.problems:
            raise DataError("no training problems")
        self.env = episodes.Env(args.reward, args.demo, history_reasoning=args.history_reasoning)
        self.data_stats = {"train": {"problems": len(self.problems), **input_skips(self.problems)}}
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
        return update_seed(self.args.seed, self.state.global_step, slot)

    @torch.no_grad()
    def plan(self, index: list[int], seed: int) -> Plan:
        """Sample the episodes of these problems, reward them, compute per-turn advantages and pack the trees."""
        a = self.args
        policy = self.accelerator.unwrap_model(self.model)
        was_training = policy.training
        policy.eval()
        eps = retry.rollout_episodes(policy, self.processing_class, [self.problems[i] for i in index], self.env,
                                     a.num_generations, a.max_turns, a.temperature, a.max_new_tokens, seed,
                                     a.rollout_batch_size, a.rollout_backend, a.context_window or None,
                                     dtype=a.rollout_dtype)
        policy.train(was_training)
        trees, per = [], []   # per tree: the KL weight w_t of each of its episode's attempts
        flat = [(r, self.problems[index[e.problem]].id) for row in eps for e in row for r in e.rewards]
        _, skipped = finite_rewards(torch.tensor([r for r, _ in flat], dtype=torch.float64), a.nan_rewards, a.reward,
                                    [i for _, i in flat])
        self._metrics["nonfinite_rewards"].append(float(skipped))
        for row in eps:
            adv = retry.turn_advantages([e.rewards for e in row], a.advantage, a.credit, a.gamma,
                                        skip_nan=a.nan_rewards == "skip")
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

    def ref_logprobs(self, model, packed: tree.Packed) -> torch.Tensor:
        """log π_ref of every pair: the frozen copy, or the same model with its LoRA adapter disabled."""
        return reference_forward(self.ref_model, model, lambda m: tree.logprobs(m, packed, self.args.attention))

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
            at = [e.rewards[t] for e in flat if len(e.rewards) > t and math.isfinite(e.rewards[t])]
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
