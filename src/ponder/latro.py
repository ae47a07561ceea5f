"""LaTRO — Latent Reasoning Optimization (Chen et al., arXiv 2411.04282; docs/methods.md §4): the public scoring
function and the small pure functions the trainer is made of.

The objective (Eq. 3) treats the rationale z as a latent variable and the model as its own reward:

    J(θ) = E_(x,y) [ E_{z~π_θ(·|x)} [ log π_θ(y | x⊕z) ] − β · KL[ π_θ(z|x) || π₀(z|x) ] ]

and its gradient is estimated from K rationales per question (Eq. 4, docs/methods.md §4.4):

    ∇J ≈ 1/(N·K) Σ_i Σ_k [ A_k^(i) · ∇ log π_θ(z_k^(i)|x_i)  +  ∇ log π_θ(y_i | x_i⊕z_k^(i)) ]
    r_k = log π_θ(y | x⊕z_k) − β · (log π_θ(z_k|x) − log π₀(z_k|x)),   A_k = r_k − mean_{j≠k} r_j  (RLOO)

Both log π(z|x) and log π(y|x⊕z) are sums over tokens and come from ONE causal pass over ``[x ⊕ z ⊕ y]``
(π(z|x) does not depend on the y appended after it) — `score` / `score_ids`. The official code uses separate
passes over ``[x ⊕ z]`` and ``[x ⊕ z ⊕ y]`` (`score_separate` here, the baseline of ``bench/latro.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ponder.chat import end_of_turn_id, generation_prompt, pad_id, text_ids
from ponder.logprobs import logits_at, logprobs_of, reduce
from ponder.prompts import ANSWER_TEMPLATE, STOP_STRINGS
from ponder.prompts import LATRO_PROMPT as PROMPT_TEMPLATE

__all__ = ["PROMPT_TEMPLATE", "ANSWER_TEMPLATE", "STOP_STRINGS", "score", "score_ids", "self_rewards", "loss_terms"]

LAYOUTS = ("split", "left", "right")


# ----------------------------------------------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """x: the chat-templated user message with the generation prompt (= ``apply_chat_template(...,
    add_generation_prompt=True)``; ponder's ChatML template when the tokenizer has none)."""
    return generation_prompt(tokenizer, [{"role": "user", "content": prompt}])


def answer_ids(tokenizer, answer: str, eot: int | None = None) -> list[int]:
    """y: the answer text (e.g. "The answer is 42.") followed by the end-of-turn token."""
    if eot is None:
        eot = end_of_turn_id(tokenizer)
    return text_ids(tokenizer, answer) + [eot]  # special-token strings in a gold answer stay text


def rationale_of(sample, eos_ids: Sequence[int] = ()) -> tuple[list[int], bool]:
    """(z ids, stopped) from a `ponder.rollout.Sample` drawn with the answer template as a stop string.

    finish ``stop``: z is everything before the stop string (the rollout has already cut the stop text, and a
    token in which the stop string begins); ``eos``: z without the end-of-turn token — y continues the turn —
    and the rationale counts as stopped (eos is a stop token in the official code, docs/methods.md §4.5);
    ``length``: the rationale reached L without stopping — it gets the non-stop penalty."""
    ids = list(sample.ids)
    if sample.finish_reason == "eos":
        while ids and ids[-1] in eos_ids:
            ids.pop()
        return ids, True
    return ids, sample.finish_reason == "stop"


# ----------------------------------------------------------------------------------------------------------
# fused scoring
# ----------------------------------------------------------------------------------------------------------


def pack(xs: Sequence[Sequence[int]], zs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]], pad_id: int,
         layout: str = "split"):
    """Rows ``[x z y]`` as one padded batch.

    layout: ``split`` — x left-padded to a common width and ``z y`` right-padded (TRL's prompt/completion
    layout: every z starts in the same column, so logits are needed only from there on and ``[x z]`` is a
    column prefix); ``left`` — whole rows left-padded (the official code's pad-to-the-left re-arrangement);
    ``right`` — whole rows right-padded. Returns (input_ids, attention_mask, position_ids, z_pairs, y_pairs,
    first) with pairs (3, P) = (row, predictor column, target column) and `first` the first predictor column.
    Position ids count real tokens only, so padding never shifts RoPE positions."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not (len(xs) == len(zs) == len(ys)):
        raise ValueError(f"prompts, rationales and answers differ in number: {len(xs)}, {len(zs)}, {len(ys)}")
    if any(len(x) == 0 for x in xs):
        raise ValueError("an empty prompt x: there is no position to predict the first rationale token from")
    lx = [len(x) for x in xs]
    lzy = [len(z) + len(y) for z, y in zip(zs, ys)]
    if layout == "split":
        wx = max(lx)
        width = wx + max(lzy)
        starts = [wx - n for n in lx]
    else:
        width = max(a + b for a, b in zip(lx, lzy))
        starts = [width - a - b if layout == "left" else 0 for a, b in zip(lx, lzy)]
    ids = torch.full((len(xs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(xs), width), dtype=torch.long)
    zp, yp = [], []
    for r, (x, z, y, s) in enumerate(zip(xs, zs, ys, starts)):
        row = list(x) + list(z) + list(y)
        ids[r, s:s + len(row)] = torch.tensor(row, dtype=torch.long)
        att[r, s:s + len(row)] = 1
        zs_ = s + len(x)
        zp += [(r, c - 1, c) for c in range(zs_, zs_ + len(z))]
        yp += [(r, c - 1, c) for c in range(zs_ + len(z), zs_ + len(z) + len(y))]
    pos = (att.cumsum(1) - 1).clamp(min=0)
    first = min(s + n - 1 for s, n in zip(starts, lx))

    def pairs(p):
        return torch.tensor(p, dtype=torch.long).T.reshape(3, -1) if p else torch.zeros((3, 0), dtype=torch.long)
    return ids, att, pos, pairs(zp), pairs(yp), first


def _sums(model, ids, att, pos, pair_sets, first: int, n: int) -> list[torch.Tensor]:
    """One forward over `ids`; for each (3, P) pair set, the per-row sum of log p(target | predictor).
    Logits are computed only from column `first` on (`logits_to_keep`), which is where every target lives."""
    device = next(model.parameters()).device
    allp = torch.cat(pair_sets, dim=1).to(device)
    keep = ids.shape[1] - first
    logits = logits_at(model, ids.to(device), (allp[0], allp[1] - first), att.to(device), pos.to(device),
                       logits_to_keep=keep)
    lp = logprobs_of(logits, ids.to(device)[allp[0], allp[2]])
    out, at = [], 0
    for p in pair_sets:
        k = p.shape[1]
        out.append(reduce(lp[at:at + k], allp[0, at:at + k], n))
        at += k
    return out


def score_ids(model, xs: Sequence[Sequence[int]], zs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]],
              pad_id: int, layout: str = "split") -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π(z|x), Σ log π(y|x⊕z)) per sample from ONE causal pass over the padded ``[x z y]`` rows.
    Gradients flow (wrap in ``torch.no_grad()`` for rewards). An empty y gives 0 and makes this the
    ``[x z]``-only pass (the reference model's KL term needs nothing else)."""
    ids, att, pos, zp, yp, first = pack(xs, zs, ys, pad_id, layout)
    lz, ly = _sums(model, ids, att, pos, [zp, yp], first, len(xs))
    return lz, ly


def score_separate(model, xs, zs, ys, pad_id: int, layout: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's way (docs/methods.md §4.8): log π(z|x) from a pass over ``[x z]`` and log π(y|x⊕z)
    from a second pass over ``[x z y]``, both left-padded. Same numbers as `score_ids`, ~2x the compute."""
    empty = [[] for _ in xs]
    ids, att, pos, zp, _, first = pack(xs, zs, empty, pad_id, layout)
    (lz,) = _sums(model, ids, att, pos, [zp], first, len(xs))
    ids, att, pos, _, yp, _ = pack(xs, zs, ys, pad_id, layout)
    (ly,) = _sums(model, ids, att, pos, [yp], int(yp[1].min()) if yp.shape[1] else 0, len(xs))
    return lz, ly


def score(model, tokenizer, prompts: Sequence[str], rationales: Sequence[str], answers: Sequence[str],
          layout: str = "split", batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LaTRO's two sums for each sample, from ONE fused causal pass over ``[x ⊕ z ⊕ y]``.

    prompts: user-message contents (the CoT trigger already in them); x = the chat template with the
    generation prompt. rationales: z = ``tokenizer(rationale, add_special_tokens=False)``. answers: the
    answer texts (e.g. "The answer is 42."); y = their tokens + the end-of-turn token. The pieces are
    concatenated at the token level, as the official code does. Returns (logp_z, logp_y), 1-D tensors with
    Σ_t log π(z_t | x, z_<t) and Σ_t log π(y_t | x⊕z, y_<t). Gradients flow unless called under no_grad.
    batch_size: score in chunks of this many samples (memory), default all at once.
    """
    if not (len(prompts) == len(rationales) == len(answers)):
        raise ValueError(f"prompts, rationales and answers differ in number: {len(prompts)}, {len(rationales)}, "
                         f"{len(answers)}")
    eot = end_of_turn_id(tokenizer)
    xs = [prompt_ids(tokenizer, p) for p in prompts]
    zs = [list(tokenizer(z, add_special_tokens=False)["input_ids"]) if z else [] for z in rationales]
    ys = [answer_ids(tokenizer, a, eot) for a in answers]
    step = batch_size or max(1, len(xs))
    parts = [score_ids(model, xs[i:i + step], zs[i:i + step], ys[i:i + step], pad_id(tokenizer), layout)
             for i in range(0, len(xs), step)]
    if not parts:
        empty = torch.zeros(0)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------------------------------------
# rewards, advantages, loss (pure functions on 1-D tensors of per-rollout values)
# ----------------------------------------------------------------------------------------------------------


def nonstop_penalty(rewards: torch.Tensor, stopped: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Rationales that reached the length limit without a stop get γ × the batch mean reward (docs/methods.md §4.5,
    following TRL's RLOO penalty; the official code uses γ = 2 and the mean over the local batch). The
    self-rewards are log-likelihoods (negative), so this doubles the badness of an average rationale."""
    stopped = stopped.to(torch.bool)
    if bool(stopped.all()):
        return rewards
    return torch.where(stopped, rewards, gamma * rewards.mean())


def self_rewards(logp_y: torch.Tensor, logp_z: torch.Tensor, ref_logp_z: torch.Tensor | None,
                 stopped: torch.Tensor, beta: float, gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward, kl) per rollout, detached: r = penalised log π(y|x⊕z) − β·(log π(z|x) − log π₀(z|x)).
    kl is the single-sample sequence-level estimate log π(z|x) − log π₀(z|x) folded into the reward
    (docs/methods.md §4.4); zero without a reference model (β = 0)."""
    logp_y, logp_z = logp_y.detach(), logp_z.detach()
    kl = logp_z - ref_logp_z.detach() if ref_logp_z is not None else torch.zeros_like(logp_z)
    return nonstop_penalty(logp_y, stopped, gamma) - beta * kl, kl


def loss_terms(logp_z: torch.Tensor, logp_y: torch.Tensor, advantages: torch.Tensor,
               sft_weight: float = 1.0) -> torch.Tensor:
    """Per-rollout surrogate loss whose gradient is minus the rollout's Eq. 4 term:
    −A·Σlog π(z|x) + sft_weight·(−Σ log π(y|x⊕z)). Averaging over the N·K rollouts of an optimizer step gives
    the official ``rloo_loss + sft_penalty · sft_loss`` (both means over rollouts). sft_weight = 1 is Eq. 4;
    the official code's default (sft_penalty) is 0: only the rationale term."""
    loss = -advantages.detach() * logp_z
    if sft_weight:
        loss = loss - sft_weight * logp_y
    return loss
