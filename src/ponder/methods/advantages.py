"""Advantage estimators and reward weights: pure functions on (num_prompts, k) tensors.

Two rules hold for every estimator here (docs/methods.md §4.11):
- a reward that is not finite (NaN, +inf, −inf) never reaches an advantage silently: the estimators raise unless
  told to skip (`skip_nan`), and then treat ±inf exactly as NaN — left out of the group's baseline (and std),
  advantage NaN, which the callers turn into 0; `finite_rewards` is the trainers' check, naming the reward and
  the problem;
- a group with no spread gets advantage exactly 0 in any precision: a group whose (scorable) rewards are all
  equal, and under GRPO normalisation also a group whose std is below `STD_THRESHOLD`. Without this rule an fp32
  group of K equal rewards gets mean − r = ±1 ulp and a std of ~1e-8, and (mean − r)/(std + 1e-6) is up to ±0.95
  for the whole group, all of one sign.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ponder.config import check_choice

#: Groups whose reward std is below this get advantage 0 under GRPO normalisation (the size of the denominator's
#: ε: below it (r − mean)/(std + ε) is rounding noise divided by ε, not a comparison of rollouts).
STD_THRESHOLD = 1e-6

NAN_REWARDS = ("raise", "skip")


def _unscorable(rewards: torch.Tensor, skip_nan: bool, what: str) -> torch.Tensor:
    """The mask of non-finite rewards; raises when there are any and `skip_nan` is off."""
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()) and not skip_nan:
        vals = sorted({str(v) for v in rewards[bad].tolist()})
        raise ValueError(f"{what}: {int(bad.sum())} reward(s) are not finite ({', '.join(vals)}); set nan_rewards: "
                         "skip to leave them out of their group's baseline (TRL's rule)")
    return bad


def _flat(rewards: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Rows whose scorable rewards are all equal (exactly): their advantages are 0 in any precision."""
    first = torch.where(bad, torch.inf, rewards).amin(dim=1, keepdim=True)
    last = torch.where(bad, -torch.inf, rewards).amax(dim=1, keepdim=True)
    return first == last


def rloo_advantages(rewards: torch.Tensor, skip_nan: bool = False) -> torch.Tensor:
    """REINFORCE leave-one-out (LaTRO arXiv 2411.04282 Eq. 4, docs/methods.md §4.4): A_k = r_k − mean_{j≠k} r_j, per
    row. rewards: (num_prompts, K) with K >= 2. Each row of the result sums to zero; a row of equal rewards gives
    exactly 0 (the leave-one-out mean of K equal fp32 numbers can be 1 ulp off).

    skip_nan: TRL's RLOOTrainer rule (docs/methods.md §4.11) for rewards that could not be computed (NaN, and here
    ±inf as well): they are left out of their group's baseline, baseline_k = (Σ_{j scorable} r_j − r_k) /
    (n_scorable − 1), and get advantage NaN, as does every rollout of a group with a single scorable one (0/0);
    `normalize_advantages` ignores NaNs and turns them into 0 at the end. Without it a non-finite reward raises
    (it would make the loss NaN or inf)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rloo_advantages needs rewards of shape (num_prompts, K >= 2), got {tuple(rewards.shape)}")
    bad = _unscorable(rewards, skip_nan, "rloo_advantages")
    flat = _flat(rewards, bad)
    if not bool(bad.any()):
        k = rewards.shape[1]
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
        return torch.where(flat, 0.0, rewards - baseline)
    r = torch.where(bad, torch.nan, rewards)
    scorable = (~bad).sum(dim=1, keepdim=True).to(rewards.dtype)
    baseline = (r.nansum(dim=1, keepdim=True) - r) / (scorable - 1)
    adv = r - baseline
    return torch.where(flat & ~bad & (scorable > 1), 0.0, adv)


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """TRL RLOOTrainer's `normalize_advantages` over a whole update batch: (A − mean) / (std + 1e-4), std with
    Bessel's correction, NaNs left out of both; NaN advantages become 0 (docs/methods.md §4.11). An infinite
    advantage is refused: it cannot come from finite rewards."""
    if bool(torch.isinf(advantages).any()):
        raise ValueError("normalize_advantages: an advantage is infinite (a non-finite reward got through)")
    valid = ~torch.isnan(advantages)
    n = int(valid.sum())
    if n == 0:
        return torch.zeros_like(advantages)
    mean = advantages[valid].mean()
    std = advantages[valid].std() if n > 1 else torch.full_like(mean, math.nan)
    return torch.nan_to_num((advantages - mean) / (std + eps), nan=0.0)


def group_normalized(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6, unbiased: bool = False,
                     skip_nan: bool = False, std_threshold: float = STD_THRESHOLD) -> torch.Tensor:
    """GRPO-style group-relative advantages (DeepSeekMath arXiv 2402.03300 §4.1.2): (r − mean_group) /
    (std_group + eps); `unbiased` selects Bessel's correction for the std (GFPO: off; RLPR's verl
    `compute_grpo_outcome_advantage`: on); scale=False keeps only the mean baseline (Dr. GRPO).

    A group whose scorable rewards are all equal, or (scale=True) whose std is below `std_threshold`, gets
    advantage exactly 0, in fp32 as in fp64. skip_nan: non-finite rewards (NaN, ±inf) are left out of their
    group's mean and std and get a NaN advantage; without it they raise."""
    if rewards.dim() != 2:
        raise ValueError(f"group_normalized needs rewards of shape (num_prompts, k), got {tuple(rewards.shape)}")
    bad = _unscorable(rewards, skip_nan, "group_normalized")
    flat = _flat(rewards, bad)
    r = torch.where(bad, torch.nan, rewards)
    n = (~bad).sum(dim=1, keepdim=True).to(rewards.dtype)
    centred = r - r.nansum(dim=1, keepdim=True) / n
    if scale:
        var = torch.where(bad, 0.0, centred ** 2).sum(dim=1, keepdim=True) / (n - 1 if unbiased else n)
        std = var.sqrt()
        flat = flat | (std < std_threshold)
        centred = centred / (std + eps)
    return torch.where(flat & ~bad, 0.0, centred)


def finite_rewards(rewards: torch.Tensor, nan_rewards: str, reward: str, problems: Sequence[str]
                   ) -> tuple[torch.Tensor, int]:
    """A trainer's check of the rewards of an update before they enter any advantage (docs/methods.md §4.11).

    rewards: one per rollout (any shape; flattened in order); problems: the id of each rollout's problem; reward:
    what the number is (e.g. ``mean_prob``, ``verify``), for the message. ``raise``: a non-finite reward (NaN,
    +inf, −inf) stops with one line naming the reward, its value and the problem; ``skip``: they become NaN (the
    estimators leave them out of the baseline, advantage 0). Returns (rewards, how many were not finite)."""
    check_choice("nan_rewards", nan_rewards, NAN_REWARDS)
    bad = ~torch.isfinite(rewards)
    count = int(bad.sum())
    if count and nan_rewards == "raise":
        i = int(bad.reshape(-1).nonzero()[0])
        v = rewards.reshape(-1)[i].item()
        raise ValueError(f"reward {reward} is {v} for problem {problems[i]} ({count} of {rewards.numel()} rewards of "
                         "this update are not finite); fix the reward, or set nan_rewards: skip to leave such "
                         "rollouts out of their group's baseline with advantage 0 (counted in the logs)")
    return torch.where(bad, torch.nan, rewards), count


def reward_weights(rewards: torch.Tensor | float, tau: float = 0.4):
    """Reward-weighted regression weights exp(r / tau) (RISE, docs/methods.md §3.5; tau = 0.4 gives 12.18 / 1.0 /
    0.082 for rewards +1 / 0 / -1)."""
    if isinstance(rewards, torch.Tensor):
        return torch.exp(rewards / tau)
    return math.exp(rewards / tau)
