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
from dataclasses import dataclass, field

import torch

from ponder import dist, rollout, ssft, ui, verify
from ponder.advantages import group_normalized
from ponder.chat import generation_prompt, pad_id
from ponder.data import DataError, as_problem, load_problems
from ponder.trainers.base import PonderTrainer, model_and_tokenizer, save_merged
from ponder.trainers.ssft import ForkingConfig, collate, setup_model


@dataclass
class GFPOConfig(ForkingConfig):
    model: str = field(default="runs/ssft-testbed/final", metadata={"help": "an SSFT model (with <think1..N>)"})
    dataset: str | None = field(default="testbed", metadata={"help": "problems: testbed | rg:<task> | .jsonl | hf:"})
    dataset_size: int = field(default=512, metadata={"help": "number of training problems"})
    num_tags: int = field(default=6, metadata={"help": "N forking tokens <think1>..<thinkN>"})
    num_generations: int = field(default=8, metadata={"help": "G: tags (and rollouts) sampled per question"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (tag and trace)"})
    max_new_tokens: int = field(default=128, metadata={"help": "rollout length budget"})
    scale_rewards: bool = field(default=True, metadata={"help": "divide advantages by the group std (GRPO)"})
    tag_policy: str = field(default="full", metadata={"help": "full (the first token from the whole vocabulary, "
                                                               "the paper) | tags (restricted to the N tags)"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences per generation batch"})
    rollout_backend: str = field(default="auto", metadata={"help": "sampler: auto | generate | lean | vllm | vllm-server "
                                                                     "(docs/methods.md §6)"})

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2 (the advantage is relative to the group)")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (GFPO samples its tags)")
        if self.tag_policy not in ssft.TAG_POLICIES:
            raise ValueError(f"tag_policy must be one of {', '.join(ssft.TAG_POLICIES)}, got {self.tag_policy!r}")
        rollout.check_backend(self.rollout_backend)
        if self.output_dir is None:
            self.output_dir = "runs/gfpo"
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
        data = train_dataset if train_dataset is not None else args.dataset
        if data is None:
            raise ValueError("no training problems: pass train_dataset or set `dataset` in the config")
        if isinstance(data, str):
            data = load_problems(data, n=args.dataset_size, split="train", seed=args.data_seed or args.seed)
        problems = [as_problem(p, f"train_dataset[{i}]", i) for i, p in enumerate(data)]
        items = [{"id": p.id, "prompt": generation_prompt(tok, [{"role": "user", "content": p.question}]),
                  "problem": p, "units": args.num_generations} for p in problems]
        if not items:
            raise DataError("no training problems")
        self.data_stats = {"train": Counter(examples=len(items))}
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
                             batch_size=self.args.generation_batch_size, progress=False,
                             seed=self.args.seed * 100003 + self.state.global_step + 1_000_003 * self.slot,
                             backend=self.args.rollout_backend)
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
        adv = group_normalized(rewards, scale=self.args.scale_rewards)
        if model.training:
            s = self._stats
            s["n"] += rewards.numel()
            s["groups"] += rewards.shape[0]
            s["reward"] += float(rewards.sum())
            s["zero_std_groups"] += int((rewards.std(1, unbiased=False) == 0).sum())
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
            logs = {**logs, "reward": s["reward"] / s["n"], "frac_reward_zero_std": s["zero_std_groups"] / s["groups"],
                    "tag_entropy": s["entropy"] / s["groups"], "tag_entropy_max": math.log(s["candidates"]),
                    "completion_tokens": s["tokens"] / s["n"],
                    "tag_share/other": s["other"] / s["n"],
                    **{f"tag_share/{t}": s[f"tag{i}"] / s["n"] for i, t in enumerate(self.tags)}}
            self._stats = Counter()
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        save_merged(self, output_dir, _internal_call)
