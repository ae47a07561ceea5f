"""Global Forking Policy Optimization (GFPO; arXiv 2510.05132 v3, docs/methods.md §1.5): a few RL steps after SSFT
that teach the model to *choose* its forking token.

Per question x and step: the model samples G tags g_1..G from π(g | x) and then a full trace after each tag;
an outcome reward r_k (`ponder.verify.score`) gives a group-relative advantage
A_k = (r_k - mean(r)) / (std(r) + eps) (`ponder.advantages.group_normalized`), and the loss is

    L(θ) = - (1 / (B·G)) Σ_x Σ_k A_k · log π_θ(g_k | x)

The rollouts are not back-propagated: the gradient flows only through the tag token's log-prob (docs/methods.md §1.5:
"the policy gradient is applied only to the output distribution of the global forking token").

Choices of ours (the paper's RL code is unreleased):
- The tag policy (``tag_policy``, docs/methods.md §1.10): ``full`` (default, the paper) samples the first
  assistant token from the model's full next-token distribution at the sampling temperature — usually a forking
  tag, possibly another token (the trace then continues after it and is scored like any other); ``tags`` restricts
  that distribution to the N tags and renormalises. Either way we sample from exactly the distribution whose
  log-prob is differentiated, so the update is the exact REINFORCE gradient of what was sampled.
- Because the model is causal, log π(g | x) depends only on the prompt: the loss forward covers the prompts
  alone (one left-padded forward per batch), which equals the GRPO-style loss on the full rollouts with the
  token loss mask zero everywhere but the tag position (tested) at a fraction of the cost.
- One optimizer step per batch of rollouts (on-policy), so there is no importance ratio or clipping, and no
  KL term (the paper's setting for these details is unknown; with ~10 steps, drift is small).
- Which parameters move: the tag log-prob depends on *every* parameter (the whole network computes the hidden
  state at the tag position), so "only through the tag position" still updates the trace policy. On the 1.8M
  testbed, full-parameter GFPO at lr 1e-3 drove the reward from 0.09 to 0 within 8 steps (the traces broke);
  the testbed config therefore trains the forking-token rows only (``tags_only``: PEFT TrainableTokens on the
  input rows and, for a model with untied embeddings, the output rows the tag log-prob depends on). At the
  paper's scale (32B, ~10 steps, small lr) full-parameter updates are what the paper did.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import ClassVar

import torch

from ponder import ui
from ponder.config import check_choice
from ponder.engine import dist, rollout
from ponder.engine.chat import generation_prompt, pad_id
from ponder.engine.data import DataError, as_problem, input_skips, load_problems
from ponder.methods import ssft, verify
from ponder.methods.advantages import finite_rewards, group_normalized
from ponder.trainers import configs
from ponder.trainers.base import PonderTrainer, model_and_tokenizer
from ponder.trainers.configs import SamplingConfig, config, option
from ponder.trainers.ssft import collate, setup_model


@config
class GFPOConfig(SamplingConfig):
    """GFPO: the forking tokens, the tag policy and its advantage, and the forking evaluation the recipe runs
    after training."""
    method: ClassVar[str] = "gfpo"
    model: str = option("runs/ssft-testbed/final", "an SSFT model (with <think1..N>)")
    num_tags: int = configs.num_tags()
    token_init: str = configs.token_init()
    tags_only: bool = configs.tags_only()
    tag_policy: str = option("full", "full (the first token from the whole vocabulary, the paper) | tags "
                                     "(restricted to the N tags)")
    scale_rewards: bool = option(True, "divide advantages by the group std (GRPO)")
    # -- evaluation after training
    n_eval: int = option(0, "held-out problems to evaluate after training")
    eval_dataset: str = option("testbed", "problems for the evaluation")
    eval_per_tag: int = configs.eval_per_tag()
    eval_temperature: float = option(1.0, "sampling temperature of the evaluation")
    eval_max_new_tokens: int = option(128, "completion budget of the evaluation")

    def __post_init__(self):
        check_choice("tag_policy", self.tag_policy, ssft.TAG_POLICIES)
        super().__post_init__()


def gfpo_loss_sum(logp: torch.Tensor, chosen: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-Σ_{x,k} A_k · log π(g_k | x).  logp: (B, C) log-probs over the candidate first tokens (the N tags, or
    the whole vocabulary); chosen: (B, G) sampled columns; advantages: (B, G). The caller divides by B·G
    (PonderTrainer's units)."""
    picked = logp.gather(1, chosen.to(logp.device))
    return -(advantages.to(picked.dtype).to(picked.device) * picked).sum()


class GFPOTrainer(PonderTrainer):
    """`Trainer` for GFPO (TRL-shaped). train_dataset: problems (or a spec string); reward_fn(problem, text) ->
    float, default `ponder.verify.score`."""

    def __init__(self, model=None, args: GFPOConfig | None = None, train_dataset=None, processing_class=None,
                 reward_fn=None, **kwargs):
        args = args or GFPOConfig()
        model, processing_class = model_and_tokenizer("GFPOTrainer", model, processing_class, args, lora=False)
        tok = processing_class
        self.tags = ssft.forking_tags(args.num_tags)
        missing = [t for t in self.tags if t not in tok.get_vocab()]
        if missing:
            ui.info(f"[yellow]warning:[/] the model has no {', '.join(missing)}; adding them (GFPO normally "
                    "starts from an SSFT model)")
        model, tag_ids = setup_model(model, tok, self.tags, True, args.token_init, args.lora, args.tags_only,
                                     args.seed)
        self.tag_ids = [t[0] for t in tag_ids]
        self.reward_fn = reward_fn or verify.score
        self.reward_name = "verify" if reward_fn is None else getattr(reward_fn, "__name__", "reward_fn")
        data = train_dataset if train_dataset is not None else args.dataset
        if data is None:
            raise ValueError("no training problems: pass train_dataset or set `dataset` in the config")
        if isinstance(data, str):
            data = load_problems(data, n=args.n_train, split=args.dataset_split, seed=args.data_seed or args.seed)
        problems = [as_problem(p, f"train_dataset[{i}]", i) for i, p in enumerate(data)]
        items = [{"id": p.id, "prompt": generation_prompt(tok, [{"role": "user", "content": p.question}]),
                  "problem": p, "units": args.num_generations} for p in problems]
        if not items:
            raise DataError("no training problems")
        self.data_stats = {"train": Counter(examples=len(items), **input_skips(data))}
        self.pad_id = pad_id(tok)
        self._stats: Counter = Counter()
        super().__init__(model=model, args=args, train_dataset=items, processing_class=tok,
                         data_collator=collate, **kwargs)

    def rollouts(self, model, items, first: torch.Tensor) -> torch.Tensor:
        """Generate a trace after each sampled first token and score it: rewards (B, G)."""
        g = first.shape[1]
        prompts = [it["prompt"] + [int(t)] for it, row in zip(items, first) for t in row]
        out = rollout.sample(self.accelerator.unwrap_model(model), self.processing_class, prompts, n=1,
                             temperature=self.args.temperature, max_new_tokens=self.args.max_new_tokens,
                             batch_size=self.args.rollout_batch_size, progress=False,
                             seed=self.args.seed * 100003 + self.state.global_step + 1_000_003 * self.slot,
                             backend=self.args.rollout_backend, dtype=self.args.rollout_dtype)
        r = [[float(self.reward_fn(it["problem"], out[b * g + k][0].text)) for k in range(g)]
             for b, it in enumerate(items)]
        self._stats["tokens"] += sum(len(s[0].ids) for s in out)
        return torch.tensor(r, dtype=torch.float64)

    def weighted_loss_sum(self, model, inputs):
        items, prompts = inputs["items"], [it["prompt"] for it in inputs["items"]]
        if self.args.tag_policy == "full":
            logp = ssft.first_token_logprobs(model, prompts, self.pad_id, self.args.temperature)   # (B, V)
        else:
            logp = ssft.tag_logprobs(model, prompts, self.tag_ids, self.pad_id, self.args.temperature, "tags")
        # seeded by (seed, step, slot): the same tags for any split of the batch between processes and
        # gradient accumulation, and after a resume
        gen = torch.Generator().manual_seed(self.args.seed * 1000003 + self.state.global_step + 7_000_003 * self.slot)
        chosen = ssft.sample_tags(logp, self.args.num_generations, gen)
        first = chosen if self.args.tag_policy == "full" else torch.tensor(self.tag_ids)[chosen]
        rewards = self.rollouts(model, items, first)
        ids = [it["problem"].id for it in items for _ in range(rewards.shape[1])]
        rewards, skipped = finite_rewards(rewards, self.args.nan_rewards, self.reward_name, ids)
        adv = torch.nan_to_num(group_normalized(rewards, scale=self.args.scale_rewards,
                                                skip_nan=self.args.nan_rewards == "skip"), nan=0.0)
        if model.training:
            s = self._stats
            scored = ~torch.isnan(rewards)
            s["n"] += rewards.numel()
            s["scored"] += int(scored.sum())
            s["nonfinite_rewards"] += skipped
            s["groups"] += rewards.shape[0]
            s["reward"] += float(rewards.nansum())
            s["zero_std_groups"] += int((adv == 0).all(1).sum())
            p = logp.detach().exp()
            s["entropy"] += float(-(p * logp.detach().clamp(min=-1e4)).sum(-1).sum())
            s["candidates"] = logp.shape[1]
            index = {t: i for i, t in enumerate(self.tag_ids)}
            for t in first.flatten().tolist():
                s[f"tag{index[t]}" if t in index else "other"] += 1
        return gfpo_loss_sum(logp, chosen, adv)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.accelerator.num_processes > 1:  # every process's rollouts, counted once
            parts = dist.gather(dict(self._stats))
            self._stats = Counter()
            for p in parts:  # update() adds negative sums too (a reward_fn may return negative rewards)
                self._stats.update({k: v for k, v in p.items() if k != "candidates"})
            self._stats["candidates"] = max(p.get("candidates", 0) for p in parts)
        s = self._stats
        if "loss" in logs and s["n"]:
            logs = {**logs, "reward": s["reward"] / max(s["scored"], 1),
                    "frac_reward_zero_std": s["zero_std_groups"] / s["groups"],
                    "tag_entropy": s["entropy"] / s["groups"], "tag_entropy_max": math.log(s["candidates"]),
                    "completion_tokens": s["tokens"] / s["n"], "nonfinite_rewards": s["nonfinite_rewards"],
                    "tag_share/other": s["other"] / s["n"],
                    **{f"tag_share/{t}": s[f"tag{i}"] / s["n"] for i, t in enumerate(self.tags)}}
            self._stats = Counter()
        super().log(logs, start_time)
