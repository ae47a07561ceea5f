"""Advantage estimators and reward weights: pure functions on (num_prompts, k) tensors."""

from __future__ import annotations

import math

import torch


def rloo_advantages(rewards: torch.Tensor, skip_nan: bool = False) -> torch.Tensor:
    """REINFORCE leave-one-out (LaTRO Eq. 4, docs/methods.md §4.4): A_k = r_k - mean_{j != k} r_j, per row.
    rewards: (num_prompts, K) with K >= 2. Each row of the result sums to zero.

    skip_nan: TRL's RLOOTrainer rule (docs/methods.md §4.11) for rewards that could not be computed (NaN): they
    are left out of their group's baseline, baseline_k = (Σ_{j scorable} r_j − r_k) / (n_scorable − 1), and get
    advantage NaN, as does every rollout of a group with a single scorable one (0/0); `normalize_advantages`
    ignores NaNs and turns them into 0 at the end. Without it a NaN reward raises (it would make the loss NaN)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rloo_advantages needs rewards of shape (num_prompts, K >= 2), got {tuple(rewards.shape)}")
    nan = torch.isnan(rewards)
    if bool(nan.any()) and not skip_nan:
        raise ValueError(f"{int(nan.sum())} reward(s) are NaN; set nan_rewards: skip to leave them out of the "
                         "baseline (TRL's rule)")
    if not skip_nan:
        k = rewards.shape[1]
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
        return rewards - baseline
    scorable = (~nan).sum(dim=1, keepdim=True).to(rewards.dtype)
    baseline = (rewards.nansum(dim=1, keepdim=True) - rewards) / (scorable - 1)
    return rewards - baseline


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """TRL RLOOTrainer's `normalize_advantages` over a whole update batch: (A − mean) / (std + 1e-4), std with
    Bessel's correction, NaNs left out of both; NaN advantages become 0 (docs/methods.md §4.11)."""
    valid = ~torch.isnan(advantages)
    n = int(valid.sum())
    if n == 0:
        return torch.zeros_like(advantages)
    mean = advantages[valid].mean()
    std = advantages[valid].std() if n > 1 else torch.full_like(mean, math.nan)
    return torch.nan_to_num((advantages - mean) / (std + eps), nan=0.0)


def group_normalized(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6, unbiased: bool = False
                     ) -> torch.Tensor:
    """GRPO-style group-relative advantages: (r - mean_group) / (std_group + eps); `unbiased` selects Bessel's
    correction for the std (GFPO: off; RLPR's verl `compute_grpo_outcome_advantage`: on); scale=False keeps only
    the mean baseline. NaN rewards are left out of their group's mean and std and get a NaN advantage."""
    if rewards.dim() != 2:
        raise ValueError(f"group_normalized needs rewards of shape (num_prompts, k), got {tuple(rewards.shape)}")
    nan = torch.isnan(rewards)
    if not bool(nan.any()):
        centred = rewards - rewards.mean(dim=1, keepdim=True)
        if not scale:
            return centred
        return centred / (rewards.std(dim=1, keepdim=True, unbiased=unbiased) + eps)
    n = (~nan).sum(dim=1, keepdim=True).to(rewards.dtype)
    centred = rewards - rewards.nansum(dim=1, keepdim=True) / n
    if not scale:
        return centred
    var = torch.where(nan, 0.0, centred ** 2).sum(dim=1, keepdim=True) / (n - 1 if unbiased else n)
    return centred / (var.sqrt() + eps)


def reward_weights(rewards: torch.Tensor | float, tau: float = 0.4):
    """Reward-weighted regression weights exp(r / tau) (RISE, docs/methods.md §3.5; tau = 0.4 gives 12.18 / 1.0 /
    0.082 for rewards +1 / 0 / -1)."""
    if isinstance(rewards, torch.Tensor):
        return torch.exp(rewards / tau)
    return math.exp(rewards / tau)
