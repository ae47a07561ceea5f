"""Multi-turn RL on retry episodes whose earlier reasoning stays hidden, every episode trained as ONE tree in one
pass (docs/methods.md §7; the environment is RISE's, arXiv 2407.18219 §3, docs/methods.md §3.2-3.3; turn-level
credit in the spirit of UFO's reward decay, arXiv 2507.14295).

An episode for one problem: user_1 -> attempt_1 (reasoning_1 + answer_1) -> feedback -> attempt_2 -> ... up to T
attempts; a correct attempt ends it (`episodes.Env`, collection mode). Attempt t was sampled from prompt_t, the
history rendered as at inference (``history_reasoning: strip`` — earlier attempts without their reasoning, as
chat templates show them; ``keep`` — in full). With per-turn advantages A_t the policy-gradient loss of the
episode is

    L = - Σ_t A_t · Σ_{j} w_{t,j} · log π(a_{t,j} | prompt_t, a_{t,<j})

(w_{t,j} = 1, or 1/|a_t| under the ``attempts`` normalisation) — T separate sequences [prompt_t a_t]. They share
prefixes: prompt_{t+1} starts with prompt_t (with ``strip`` it then continues with answer_t *without* its
reasoning, so attempt_t and the history copy of its answer are two branches). `prefix_tree` builds the trie of
the T sequences as a `ponder.tree.Tree` (shared prefixes once, every scored token with exactly the context of
its own sequence), and `ponder.tree.pack` / `ponder.tree.logprobs` give every attempt token's log-prob in one
forward, equal to the T separate passes (tests/test_retry.py, fp64).

This module holds the pieces: the episode's sequences and tree, per-turn advantages (`turn_advantages`) and
on-policy episode sampling (`rollout_episodes`). The trainer is `ponder.trainers.retry.RetryTrainer`, the recipe
`ponder.recipes.retry`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ponder.config import check_choice
from ponder.engine import rollout
from ponder.engine.chat import HISTORY_REASONING, normalize_messages, render
from ponder.engine.data import Problem
from ponder.engine.tree import Tree
from ponder.methods.advantages import group_normalized, rloo_advantages
from ponder.methods.episodes import Env, window

ADVANTAGES = ("rloo", "grpo")
CREDITS = ("turn", "return")
ATTEMPT_KINDS = ("tag", "reasoning", "answer", "eot")


# ----------------------------------------------------------------------------------------------------------
# per-turn advantages
# ----------------------------------------------------------------------------------------------------------


def turn_advantages(rewards: Sequence[Sequence[float]], mode: str = "rloo", credit: str = "turn",
                    gamma: float = 1.0, eps: float = 1e-6, skip_nan: bool = False) -> list[list[float]]:
    """Per-turn advantages of G episodes of the same problem (docs/methods.md §7.2).

    rewards[i][t]: the reward of episode i's attempt t (t = 0..T_i-1; episodes that stopped early — a correct
    attempt ends them — are shorter). The value credited to attempt t:

    - ``credit: turn``:   v_{i,t} = r_{i,t};
    - ``credit: return``: v_{i,t} = Σ_{s=t}^{T_i-1} γ^{s-t} r_{i,s}  (the discounted return from turn t; with an
      episode ending at its first success, success at a later turn is worth γ^{delay}: UFO's reward decay,
      arXiv 2507.14295).

    Turn t's group is the episodes that reached turn t, I_t = {i : T_i > t}, n_t = |I_t|; for i in I_t:

    - ``rloo``: A_{i,t} = v_{i,t} - (1/(n_t-1)) Σ_{j ∈ I_t, j≠i} v_{j,t}   (`ponder.advantages.rloo_advantages`)
    - ``grpo``: A_{i,t} = (v_{i,t} - mean_{I_t} v) / (std_{I_t} v + eps), population std
      (`ponder.advantages.group_normalized`)

    and A_{i,t} = 0 when n_t = 1 (no baseline). A turn whose values are all equal, or (grpo) whose std is below
    `ponder.advantages.STD_THRESHOLD`, gets A = 0 exactly. A reward that is not finite (NaN, ±inf) raises unless
    `skip_nan`: then the values it enters (v_{i,t}, and with ``credit: return`` the earlier turns' returns of its
    episode) leave their turn's group and get A = 0. Returns a ragged list shaped like `rewards`."""
    check_choice("advantage", mode, ADVANTAGES)
    check_choice("credit", credit, CREDITS)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    values = []
    for r in rewards:
        v = [float(x) for x in r]
        if not skip_nan and not all(math.isfinite(x) for x in v):
            raise ValueError(f"turn_advantages: a reward is not finite ({v}); set nan_rewards: skip to leave it out "
                             "of its turn's group")
        if credit == "return":
            for t in range(len(v) - 2, -1, -1):
                v[t] += gamma * v[t + 1]
        values.append(v)
    out = [[0.0] * len(v) for v in values]
    for t in range(max((len(v) for v in values), default=0)):
        members = [i for i, v in enumerate(values) if len(v) > t]
        if len(members) < 2:
            continue
        x = torch.tensor([[values[i][t] for i in members]], dtype=torch.float64)
        a = rloo_advantages(x, skip_nan) if mode == "rloo" else group_normalized(x, eps=eps, skip_nan=skip_nan)
        for i, ai in zip(members, torch.nan_to_num(a, nan=0.0)[0].tolist()):
            out[i][t] = ai
    return out


# ----------------------------------------------------------------------------------------------------------
# one episode as one tree
# ----------------------------------------------------------------------------------------------------------


def prefix_tree(sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                weights: Sequence[float | Sequence[float]], groups: Sequence[int] | None = None) -> Tree:
    """The trie of sequences [context_t + scored_t] as a `Tree`: tokens shared by several sequences at the same
    place (the same prefix) are one node; scored_t's tokens carry weights[t] (one number, or one per token) and
    group label groups[t] (default t). A scored token is never merged into another sequence's scored token (each
    is scored once). Every scored token's tree context is exactly its own sequence's prefix, so
    `ponder.tree.separate` of the result gives back the T sequences (merged where one is a prefix of another)."""
    groups = list(range(len(sequences))) if groups is None else list(groups)
    if not (len(sequences) == len(weights) == len(groups)):
        raise ValueError(f"{len(sequences)} sequences, {len(weights)} weights and {len(groups)} groups")
    tok: list[int] = []
    par: list[int] = []
    score: list[tuple[float, int] | None] = []
    turn: list[int] = []
    kids: dict[tuple[int, int], int] = {}      # (parent node, token) -> node, for merging

    def node(p: int, t: int, s, k: int) -> int:
        n = kids.get((p, t))
        if n is not None and (s is None or score[n] is None):
            if s is not None:
                score[n] = s
            return n
        n = len(tok)
        tok.append(t)
        par.append(p)
        score.append(s)
        turn.append(k)
        if (p, t) not in kids:
            kids[(p, t)] = n
        return n

    for k, ((ctx, scored), w, g) in enumerate(zip(sequences, weights, groups)):
        scored = [int(x) for x in scored]
        if not ctx and scored:
            raise ValueError(f"sequence {k}: scored tokens need a context before them")
        ws = [float(w)] * len(scored) if isinstance(w, (int, float)) else [float(x) for x in w]
        if len(ws) != len(scored):
            raise ValueError(f"sequence {k}: {len(ws)} weights for {len(scored)} scored tokens")
        p = -1
        for t in ctx:
            p = node(p, int(t), None, k)
        for t, x in zip(scored, ws):
            p = node(p, t, (x, int(g)), k)
    # compress chains into segments: a segment ends where a node has != 1 child or the scoring changes
    children: list[list[int]] = [[] for _ in tok]
    roots = []
    for n, p in enumerate(par):
        (children[p] if p >= 0 else roots).append(n)
    size = [1] * len(tok)
    for n in range(len(tok) - 1, -1, -1):   # children are created after their parents
        if par[n] >= 0:
            size[par[n]] += size[n]
    tree = Tree()

    def kind(n):
        return None if score[n] is None else score[n][1]

    stack = [(r, None) for r in sorted(roots, key=lambda r: -size[r])][::-1]
    while stack:
        n, parent_seg = stack.pop()
        chain = [n]
        while len(children[chain[-1]]) == 1 and kind(children[chain[-1]][0]) == kind(n):
            chain.append(children[chain[-1]][0])
        w = None if score[n] is None else [score[m][0] for m in chain]
        s = tree.add([tok[m] for m in chain], parent_seg, weight=w, group=kind(n) or 0,
                     turn=max(turn[n], tree.segments[parent_seg].turn if parent_seg is not None else 0))
        # the largest subtree first: it continues this segment's causal run (`ponder.tree.flatten`)
        stack += [(c, s) for c in sorted(children[chain[-1]], key=lambda c: -size[c])][::-1]
    return tree


def attempt_indices(messages: Sequence[dict[str, Any]], prefix_len: int = 0) -> list[int]:
    """Indices of the attempts (assistant messages after the environment's prefix)."""
    return [k for k, m in enumerate(messages) if m["role"] == "assistant" and k >= prefix_len]


def turn_sequences(tokenizer, messages: Sequence[dict[str, Any]], history_reasoning: str = "strip",
                   attempt_ids: Sequence[Sequence[int]] | None = None, prefix_len: int = 0,
                   context_window: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt_t, attempt_t) of every attempt of an episode: prompt_t = the history before attempt t rendered
    as the model is given it (`episodes.Env.prompt`: earlier reasoning stripped or kept, the optional sliding
    `context_window`), attempt_t = the sampled token ids when given (on-policy: exactly what was sampled), else
    the attempt as the template renders it when generated (reasoning block, answer, end of turn)."""
    check_choice("history_reasoning", history_reasoning, HISTORY_REASONING)
    msgs = normalize_messages(messages)
    env = Env(history_reasoning=history_reasoning)
    idx = attempt_indices(msgs, prefix_len)
    if attempt_ids is not None and len(attempt_ids) != len(idx):
        raise ValueError(f"{len(attempt_ids)} attempt id lists for {len(idx)} attempts")
    out = []
    for t, k in enumerate(idx):
        prompt = env.prompt(tokenizer, window(msgs[:k], prefix_len, context_window))
        if attempt_ids is not None:
            ids = [int(x) for x in attempt_ids[t]]
        else:
            ids = [i for s in render(tokenizer, msgs[:k + 1], reasoning="last")
                   if s.message == k and s.kind in ATTEMPT_KINDS for i in s.ids]
        out.append((prompt, ids))
    return out


def episode_tree(tokenizer, messages: Sequence[dict[str, Any]], per_turn_weights: Sequence[float | Sequence[float]],
                 history_reasoning: str = "strip", attempt_ids: Sequence[Sequence[int]] | None = None,
                 prefix_len: int = 0, context_window: int | None = None) -> Tree:
    """One episode as one `Tree`: the trie of its per-turn sequences [prompt_t attempt_t] (`turn_sequences`),
    attempt t scored with per_turn_weights[t] (one number per attempt — the advantage, per token — or one per
    token), group label t. With ``strip`` the trunk is the history as later turns see it and each attempt (its
    reasoning and its answer) is a branch off the end of its prompt; with ``keep`` (and attempt ids that the
    template re-renders identically) the episode is one causal chain."""
    seqs = turn_sequences(tokenizer, messages, history_reasoning, attempt_ids, prefix_len, context_window)
    if len(per_turn_weights) != len(seqs):
        raise ValueError(f"{len(per_turn_weights)} per-turn weights for {len(seqs)} attempts")
    return prefix_tree(seqs, per_turn_weights)


# ----------------------------------------------------------------------------------------------------------
# on-policy episodes
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One sampled episode: the problem's index, the messages (prefix, then attempt/feedback pairs), and per
    attempt the prompt ids it was sampled from, the sampled ids, the reward and the finish reason."""
    problem: int
    messages: list[dict[str, Any]]
    prompts: list[list[int]] = field(default_factory=list)
    attempts: list[list[int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    done: bool = False

    @property
    def sequences(self) -> list[tuple[list[int], list[int]]]:
        return list(zip(self.prompts, self.attempts))


def rollout_episodes(model, tokenizer, problems: Sequence[Problem], env: Env, num_generations: int,
                     max_turns: int, temperature: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
                     batch_size: int = 64, backend: str = "auto", context_window: int | None = None,
                     progress: bool = False, dtype: str = "auto") -> list[list[Episode]]:
    """G episodes of up to T attempts per problem, on-policy (`ponder.rollout.sample`, no grad): turn 1 samples G
    attempts from each problem's first prompt, later turns one attempt per unfinished episode from its history
    as rendered by `env` (reasoning stripped or kept); a correct attempt ends its episode (`episodes.Env.step` in
    collection mode). Seeded by `seed` and the turn; `backend` and `dtype` are `rollout.sample`'s. Returns
    episodes[problem][g]."""
    if env.evaluation:
        raise ValueError("rollout_episodes needs a collection environment (evaluation=False)")
    eps = [[Episode(i, env.reset(p)) for _ in range(num_generations)] for i, p in enumerate(problems)]
    flat = [e for row in eps for e in row]
    for t in range(max_turns):
        active = [e for e in flat if not e.done]
        if not active:
            break
        if t == 0:
            prompts = [env.prompt(tokenizer, window(row[0].messages, env.prefix_len, context_window)) for row in eps]
            out = rollout.sample(model, tokenizer, prompts, n=num_generations, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, batch_size=batch_size, progress=progress,
                                 description="retry turn 1", backend=backend, dtype=dtype)
            pairs = [(e, prompts[i], s) for i, (row, samples) in enumerate(zip(eps, out)) for e, s in zip(row, samples)]
        else:
            prompts = [env.prompt(tokenizer, window(e.messages, env.prefix_len, context_window)) for e in active]
            out = rollout.sample(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed + 1000 * t, batch_size=batch_size,
                                 progress=progress, description=f"retry turn {t + 1}", backend=backend,
                                 dtype=dtype)
            pairs = [(e, p, row[0]) for e, p, row in zip(active, prompts, out)]
        for e, prompt, s in pairs:
            e.messages, reward, e.done = env.step(problems[e.problem], e.messages, s.text)
            e.prompts.append(list(prompt))
            e.attempts.append(list(s.ids))
            e.rewards.append(float(reward))
            e.finish.append(s.finish_reason)
    return eps
