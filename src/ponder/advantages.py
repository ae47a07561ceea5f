"""Advantage estimators and reward weights: pure functions on (num_prompts, k) tensors."""

from __future__ import annotations

import math

import torch


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (LaTRO Eq. 4, docs/methods.md §4.4): A_k = r_k - mean_{j != k} r_j, per row.
    rewards: (num_prompts, K) with K >= 2. Each row of the result sums to zero."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rloo_advantages needs rewards of shape (num_prompts, K >= 2), got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def group_normalized(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO-style group-relative advantages: (r - mean_group) / (std_group + eps) (std over the group,
    unbiased=False); scale=False keeps only the mean baseline."""
    if rewards.dim() != 2:
        raise ValueError(f"group_normalized needs rewards of shape (num_prompts, k), got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def reward_weights(rewards: torch.Tensor | float, tau: float = 0.4):
    """Reward-weighted regression weights exp(r / tau) (RISE, docs/methods.md §3.5; tau = 0.4 gives 12.18 / 1.0 /
    0.082 for rewards +1 / 0 / -1)."""
    if isinstance(rewards, torch.Tensor):
        return torch.exp(rewards / tau)
    return math.exp(rewards / tau)
