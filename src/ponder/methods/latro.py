"""LaTRO — Latent Reasoning Optimization (Chen et al., arXiv 2411.04282; docs/methods.md §4): the public scoring
function and the small pure functions the trainer is made of, with the likelihood-reward family around it
(docs/methods.md §4.12-§4.16).

The objective (Eq. 3) treats the rationale z as a latent variable and the model as its own reward:

    J(θ) = E_(x,y) [ E_{z~π_θ(·|x)} [ log π_θ(y | x⊕z) ] − β · KL[ π_θ(z|x) || π₀(z|x) ] ]

and its gradient is estimated from K rationales per question (Eq. 4, docs/methods.md §4.4):

    ∇J ≈ 1/(N·K) Σ_i Σ_k [ A_k^(i) · ∇ log π_θ(z_k^(i)|x_i)  +  ∇ log π_θ(y_i | x_i⊕z_k^(i)) ]
    r_k = log π_θ(y | x⊕z_k) − β · (log π_θ(z_k|x) − log π₀(z_k|x)),   A_k = r_k − mean_{j≠k} r_j  (RLOO)

Both log π(z|x) and log π(y|x⊕z) are sums over tokens and come from ONE forward over the prefix trees
x -> z_k -> y_k (`ponder.tree`; π(z|x) does not depend on the y appended after it, and a question's K
rationales share its x, forwarded once) — `score` / `score_ids`; the reference model's pass is the same trees
without y. The official code uses separate passes over ``[x ⊕ z]`` and ``[x ⊕ z ⊕ y]`` per sample
(`score_separate` here, the baseline of ``bench/latro.py`` and ``bench/tree.py``).

The reward R(z) may be any of `REWARDS` (`answer_score`; docs/methods.md §4.12): LaTRO's Σ log π(y|x⊕z), its
per-token mean (Kwiatkowski et al., arXiv 2602.03979 Eq. 10), VeriFree's π(y|x⊕z) (arXiv 2505.21493 Eq. 4),
RLPR's mean token probability (arXiv 2506.18254 Eq. 2, de-biased by Eqs. 3-4: `debias`, filtered by §2.4:
`StdFilter`), or a 0/1 verifier. The KL term, the non-stop penalty and the advantages are shared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ponder.engine import tree
from ponder.engine.chat import end_of_turn_id, generation_prompt, pad_id, text_ids, text_ids_offsets
from ponder.engine.logprobs import reduce, token_logprobs
from ponder.engine.prompts import ANSWER_TEMPLATE, LATRO_ARC_PROMPT, STOP_STRINGS
from ponder.engine.prompts import LATRO_PROMPT as PROMPT_TEMPLATE

__all__ = ["PROMPT_TEMPLATE", "ANSWER_TEMPLATE", "STOP_STRINGS", "REWARDS", "REWARD_SPANS", "score", "score_ids",
           "answer_score", "answer_span", "self_rewards", "loss_terms", "render_prompt", "StdFilter"]

#: R(z) for a rationale z (docs/methods.md §4.12): the four likelihood rewards of the reference answer y, and a
#: 0/1 verifier on the model's own answer (then the trainer is plain RLOO/GRPO).
REWARDS = ("logprob", "mean_logprob", "prob", "mean_prob", "verifier")
#: Rewards in [0, 1]: a rollout that never stops gets 0, the floor (docs/methods.md §4.5).
BOUNDED_REWARDS = ("prob", "mean_prob", "verifier")
#: Which tokens of y the probability rewards (`SPAN_REWARDS`) score (`reward_span`, docs/methods.md §4.12):
#: ``answer`` — only the reference answer's own tokens (RLPR, VeriFree); ``full`` — all of y, the answer
#: template and the end-of-turn token included (ponder before issue 22).
REWARD_SPANS = ("answer", "full")
SPAN_REWARDS = ("prob", "mean_prob")
#: Named prompt templates (`prompt_template: arc`): the official GSM8K and ARC-Challenge user messages.
PROMPTS = {"gsm8k": PROMPT_TEMPLATE, "arc": LATRO_ARC_PROMPT}


# ----------------------------------------------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """x: the chat-templated user message with the generation prompt (= ``apply_chat_template(...,
    add_generation_prompt=True)``; ponder's ChatML template when the tokenizer has none)."""
    return generation_prompt(tokenizer, [{"role": "user", "content": prompt}])


def render_prompt(template: str, question: str, options: Sequence[str] | None = None) -> str:
    """The user message: `template` with {question} and, for multiple choice, {options} rendered as the official
    code renders ARC's ``choices["text"]`` in an f-string — the Python list repr, e.g. ``['dry palms', "it's
    palms"]`` (docs/methods.md §4.7). `template` may be a name in `PROMPTS` (gsm8k, arc)."""
    template = PROMPTS.get(template, template)
    if "{options}" in template:
        if options is None:
            raise KeyError("options")
        return template.format(question=question, options=str(list(options)))
    return template.format(question=question)


def answer_ids(tokenizer, answer: str, eot: int | None = None) -> list[int]:
    """y: the answer text (e.g. "The answer is 42.") followed by the end-of-turn token."""
    if eot is None:
        eot = end_of_turn_id(tokenizer)
    return text_ids(tokenizer, answer) + [eot]  # special-token strings in a gold answer stay text


def answer_span(tokenizer, template: str, answer: str, eot: int | None = None) -> tuple[list[int], tuple[int, int]]:
    """y = `answer_ids` of ``template.format(answer=answer)`` and the token span [a, b) of the reference answer
    itself inside it: the tokens whose characters overlap the ``{answer}`` text (a token that merges the space
    before it, e.g. " 42", belongs to the span). The template text around it and the end-of-turn token are outside
    the span — what RLPR (arXiv 2506.18254 Eq. 2: the probabilities of the reference answer's tokens y*) and
    VeriFree (arXiv 2505.21493 Eq. 4: π(y*|x⊕z)) score (`REWARD_SPANS`, docs/methods.md §4.12)."""
    if eot is None:
        eot = end_of_turn_id(tokenizer)
    text = template.format(answer=answer)
    start = len(template.split("{answer}", 1)[0].format()) if "{answer}" in template else 0
    end = start + len(answer) if "{answer}" in template else len(text)
    ids, offsets = text_ids_offsets(tokenizer, text)
    inside = [i for i, (lo, hi) in enumerate(offsets) if lo < end and hi > start]
    span = (inside[0], inside[-1] + 1) if inside else (0, len(ids) + 1)  # no answer text: all of y
    return ids + [eot], span


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


def rationale_length(tokenizer, ids: Sequence[int], stops: Sequence[str]) -> int:
    """Tokens of a whole completion before its answer template begins (the earliest stop string; all of them
    when there is none): the rationale length of a ``reward: verifier`` rollout, for the metrics."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return len(ids)
    c, lo, hi = min(hits), 0, len(ids)  # the largest k with decode(ids[:k]) no longer than text[:c]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(list(ids[:mid]), skip_special_tokens=False)) <= c:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------------------------------------
# scoring on the prefix tree
# ----------------------------------------------------------------------------------------------------------


def trees(xs: Sequence[Sequence[int]], zs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]],
          spans: Sequence[tuple[int, int] | None] | None = None) -> list[tree.Tree]:
    """The samples as `ponder.tree` trees x -> z_k -> y_k: one tree per distinct prompt x (samples with equal x,
    e.g. a question's K rationales, share it: x is forwarded once), z_k scored with group 2i and y_k with group
    2i+1 (i: the sample's index). An empty y leaves x -> z_k, the reference model's pass; an empty z makes y_k
    a child of x. spans[i] = (a, b): only y[a:b] is scored, y[:a] is context and y[b:] is left out (causal: it
    changes nothing before it)."""
    if not (len(xs) == len(zs) == len(ys)):
        raise ValueError(f"prompts, rationales and answers differ in number: {len(xs)}, {len(zs)}, {len(ys)}")
    if any(len(x) == 0 for x in xs):
        raise ValueError("an empty prompt x: there is no position to predict the first rationale token from")
    out: dict[tuple[int, ...], tuple[tree.Tree, int]] = {}
    for i, (x, z, y) in enumerate(zip(xs, zs, ys)):
        key = tuple(x)
        if key not in out:
            t = tree.Tree()
            out[key] = (t, t.add(x))
        t, root = out[key]
        at = t.add(z, root, weight=1.0, group=2 * i) if len(z) else root
        a, b = (0, len(y)) if spans is None or spans[i] is None else spans[i]
        if a > 0 and b > a:
            at = t.add(y[:a], at, group=2 * i + 1)  # the template before the answer: context only
        if len(y[a:b]):
            t.add(y[a:b], at, weight=1.0, group=2 * i + 1)
    return [t for t, _ in out.values()]


def score_ids(model, xs: Sequence[Sequence[int]], zs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]],
              pad_id: int, reward: str = "logprob", attention: str = "auto",
              spans: Sequence[tuple[int, int] | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π(z|x), R(y|x⊕z)) per sample from ONE forward over the trees x -> z_k -> y_k (`trees`: a prompt
    shared by several samples is forwarded once; `ponder.tree` makes every token's log-prob that of the separate
    ``[x z y]`` pass); R is `answer_score` with `reward` (default Σ log π(y|x⊕z), LaTRO's). Gradients flow (wrap
    in ``torch.no_grad()`` for rewards). An empty y gives R = 0 and makes this the ``[x z]``-only pass (the
    reference model's KL term needs nothing else). attention: `ponder.tree.logits`'s mode. spans: per sample the
    token span of y that R scores (`answer_span`; None: all of y)."""
    n = len(xs)
    flats = [tree.flatten(t) for t in trees(xs, zs, ys, spans)]
    device = next(model.parameters()).device
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    if not any(f.pairs for f in flats):  # nothing scored (every z and y empty)
        zero = torch.zeros(n, dtype=dtype, device=device)
        return zero, answer_score(zero[:0], torch.zeros(0, dtype=torch.long, device=device), n, reward)
    packed = tree.pack(flats, pad_id).to(device)
    lp = tree.logprobs(model, packed, attention)
    sample, is_y = packed.pair_group // 2, packed.pair_group % 2 == 1
    return (answer_score(lp[~is_y], sample[~is_y], n, "logprob"),
            answer_score(lp[is_y], sample[is_y], n, reward))


@torch.no_grad()
def no_rationale_scores(model, xs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]], pad_id: int,
                        batch_size: int = 64, spans: Sequence[tuple[int, int] | None] | None = None
                        ) -> torch.Tensor:
    """RLPR's r' (arXiv 2506.18254 Eq. 3; docs/methods.md §4.15): the mean token probability of each y (its
    `spans`, as the reward scores it) decoded right after its x, with no rationale — computed once, before
    training, with the initial model."""
    sp = spans if spans is not None else [None] * len(xs)
    out = [score_ids(model, xs[i:i + batch_size], [[]] * len(xs[i:i + batch_size]), ys[i:i + batch_size], pad_id,
                     reward="mean_prob", spans=sp[i:i + batch_size])[1] for i in range(0, len(xs), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def score_separate(model, xs, zs, ys, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's way (docs/methods.md §4.8): log π(z|x) from a pass over ``[x z]`` and log π(y|x⊕z)
    from a second pass over ``[x z y]``, one padded row per sample (`ponder.tree.separate`; the official code
    pads on the left, which changes nothing: positions count real tokens). Same numbers as `score_ids`, ~2x
    the compute and more when prompts are shared."""
    n, device = len(xs), next(model.parameters()).device
    empty = [[] for _ in xs]
    out = []
    for part, keep in ((trees(xs, zs, empty), 0), (trees(xs, zs, ys), 1)):
        seqs = [s for t in part for s in tree.separate(_only(t, keep))]
        vals = torch.zeros(n, dtype=next(model.parameters()).dtype, device=device)
        if seqs:
            ids, att, pairs = tree.separate_batch(seqs, pad_id)
            lp = token_logprobs(model, ids.to(device), pairs.to(device), att.to(device))
            groups = torch.tensor([g // 2 for s in seqs for g in s.groups], device=device)
            vals = reduce(lp, groups, n, "sum")
        out.append(vals)
    return out[0], out[1]


def _only(t: tree.Tree, kind: int) -> tree.Tree:
    """The tree with only the z (kind 0) or only the y (kind 1) segments scored, the others context."""
    out = tree.Tree()
    for s in t.segments:
        keep = s.weights is not None and s.group % 2 == kind
        out.add(s.ids, None if s.parent < 0 else s.parent, weight=s.weights if keep else None, group=s.group,
                hidden=s.hidden, turn=s.turn)
    return out


def score(model, tokenizer, prompts: Sequence[str], rationales: Sequence[str], answers: Sequence[str],
          batch_size: int | None = None, reward: str = "logprob", attention: str = "auto"
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """LaTRO's two sums for each sample, from ONE forward over the trees x -> z -> y (`score_ids`).

    prompts: user-message contents (the CoT trigger already in them); x = the chat template with the
    generation prompt. rationales: z = ``tokenizer(rationale, add_special_tokens=False)``. answers: the
    answer texts (e.g. "The answer is 42."); y = their tokens + the end-of-turn token. The pieces are
    concatenated at the token level, as the official code does. Returns (logp_z, logp_y), 1-D tensors with
    Σ_t log π(z_t | x, z_<t) and Σ_t log π(y_t | x⊕z, y_<t). Gradients flow unless called under no_grad.
    batch_size: score in chunks of this many samples (memory), default all at once. reward: the second value is
    `answer_score` with this reduction instead of the sum (e.g. ``prob`` for VeriFree's π(y|x⊕z)).
    attention: `ponder.tree.logits`'s mode (auto | dense | sparse | flex).
    """
    if not (len(prompts) == len(rationales) == len(answers)):
        raise ValueError(f"prompts, rationales and answers differ in number: {len(prompts)}, {len(rationales)}, "
                         f"{len(answers)}")
    eot = end_of_turn_id(tokenizer)
    xs = [prompt_ids(tokenizer, p) for p in prompts]
    zs = [list(tokenizer(z, add_special_tokens=False)["input_ids"]) if z else [] for z in rationales]
    ys = [answer_ids(tokenizer, a, eot) for a in answers]
    step = batch_size or max(1, len(xs))
    parts = [score_ids(model, xs[i:i + step], zs[i:i + step], ys[i:i + step], pad_id(tokenizer), reward,
                       attention)
             for i in range(0, len(xs), step)]
    if not parts:
        empty = torch.zeros(0)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------------------------------------
# rewards (docs/methods.md §4.12-§4.16), the penalty, the loss: pure functions on 1-D per-rollout tensors
# ----------------------------------------------------------------------------------------------------------


def answer_score(logprobs: torch.Tensor, rows: torch.Tensor, n: int, reward: str = "logprob") -> torch.Tensor:
    """R(y | x⊕z) per sample from the per-token log-probs ℓ_t = log π(y_t | x⊕z, y_<t) of the scored tokens of
    the reference answer (rows: the sample of each token; |y| counts them: all of y with the end-of-turn token,
    or for ``reward_span: answer`` only the answer's own tokens, `answer_span`):

    - ``logprob``       Σ_t ℓ_t = log π(y|x⊕z)                 LaTRO, arXiv 2411.04282 Eq. 3
    - ``mean_logprob``  (1/|y|) Σ_t ℓ_t                          Kwiatkowski et al., arXiv 2602.03979 Eq. 10
    - ``prob``          exp(Σ_t ℓ_t) = π(y|x⊕z)                  VeriFree, arXiv 2505.21493 Eq. 4
    - ``mean_prob``     (1/|y|) Σ_t exp(ℓ_t)                     RLPR, arXiv 2506.18254 Eq. 2 (f_seq = mean)

    Differentiable: its gradient is the answer-side term of the loss (`loss_terms`). A sample with no y tokens
    gets 0."""
    total = reduce(logprobs, rows, n, "sum")
    if reward == "logprob":
        return total
    count = reduce(torch.ones_like(logprobs), rows, n, "sum").clamp(min=1)
    if reward == "mean_logprob":
        return total / count
    if reward == "prob":
        return total.exp()
    if reward == "mean_prob":
        return reduce(logprobs.exp(), rows, n, "sum") / count
    raise ValueError(f"reward must be one of {', '.join(REWARDS[:4])} for a likelihood score, got {reward!r}")


def debias(scores: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """RLPR's de-biased reward (arXiv 2506.18254 Eqs. 3-4): r̂ = clip(r − r', 0, 1), with r' the same score of y
    decoded right after the prompt (no rationale) by the initial model (docs/methods.md §4.15)."""
    return (scores - baseline).clamp(0.0, 1.0)


def nonstop_penalty(rewards: torch.Tensor, stopped: torch.Tensor, gamma: float = 2.0, bounded: bool = False
                    ) -> torch.Tensor:
    """Rationales that reached the length limit without a stop get γ × the mean reward of ALL the rollouts given
    (the trainer passes a whole update's; docs/methods.md §4.5), the official code's rule (γ = 2, from TRL's
    RLOO). The self-rewards are log-likelihoods (negative), so this doubles the badness of an average rationale.
    bounded: rewards in [0, 1] (prob, mean_prob, verifier), where γ × mean would be a bonus: a non-stopped
    rollout gets the floor 0 instead (VeriFree's code scores a truncated response π = 0); γ = 0 turns the
    penalty off for them. NaN rewards are left out of the mean."""
    stopped = stopped.to(torch.bool)
    if bool(stopped.all()):
        return rewards
    if bounded:
        return torch.where(stopped, rewards, torch.zeros_like(rewards)) if gamma > 0 else rewards
    return torch.where(stopped, rewards, gamma * rewards.nanmean())


def self_rewards(logp_y: torch.Tensor, logp_z: torch.Tensor, ref_logp_z: torch.Tensor | None,
                 stopped: torch.Tensor, beta: float, gamma: float = 2.0, bounded: bool = False,
                 baseline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward, kl) per rollout, detached: r = penalised R − β·(log π(z|x) − log π₀(z|x)), where R is `logp_y`
    (LaTRO's log π(y|x⊕z), or any `answer_score` / verifier score), de-biased first when `baseline` r' is given
    (RLPR). kl is the single-sample sequence-level estimate log π(z|x) − log π₀(z|x) folded into the reward
    (docs/methods.md §4.4); zero without a reference model (β = 0)."""
    logp_y, logp_z = logp_y.detach(), logp_z.detach()
    if baseline is not None:
        logp_y = debias(logp_y, baseline.detach())
    kl = logp_z - ref_logp_z.detach() if ref_logp_z is not None else torch.zeros_like(logp_z)
    return nonstop_penalty(logp_y, stopped, gamma, bounded) - beta * kl, kl


def loss_terms(logp_z: torch.Tensor, logp_y: torch.Tensor, advantages: torch.Tensor,
               sft_weight: float = 1.0) -> torch.Tensor:
    """Per-rollout surrogate loss whose gradient is minus the rollout's Eq. 4 term:
    −A·Σlog π(z|x) + sft_weight·(−R(y|x⊕z)). Averaging over the N·K rollouts of an optimizer step gives the
    official ``rloo_loss + sft_penalty · sft_loss`` (both means over rollouts). sft_weight = 1 is Eq. 4; the
    official code's default (sft_penalty) is 0: only the rationale term.

    With another reward, −sft_weight·R is the reward's own gradient (Kwiatkowski et al. Lemma 1: ∇E_z[R_θ(z)] =
    E[(R − c)∇log π(z|x) + ∇R_θ(z)]): for ``prob``, ∇π(y|x⊕z) = π·∇log π(y|x⊕z) is VeriFree's reference-answer
    term (arXiv 2505.21493 Eq. 7), for the means it is the mean's gradient (docs/methods.md §4.12)."""
    loss = -advantages.detach() * logp_z
    if sft_weight:
        loss = loss - sft_weight * logp_y
    return loss


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """Per-group standard deviation of the rewards (num_prompts, K), Bessel-corrected (torch.std, as RLPR's verl
    `compute_grpo_outcome_advantage`)."""
    return rewards.std(dim=1)


@dataclass
class StdFilter:
    """RLPR's standard-deviation filter (arXiv 2506.18254 §2.4; official `ray_trainer.py`, filter_mode EMA;
    docs/methods.md §4.16): from update `start` on, a question whose group reward std is below β·EMA is dropped
    from the update. The EMA is of the per-update mean group std: updates `ema_start` .. `start`−1 only collect
    it; at `start` the EMA is their mean, and after every later update ema ← ratio·ema + (1 − ratio)·(that
    update's mean std, the dropped groups included). Updates count from 1, as verl's global_steps. Defaults are
    RLPR's reproduce scripts (β = 0.5 for Qwen, 0.99, 6, 11)."""
    beta: float = 0.5
    ratio: float = 0.99
    ema_start: int = 6
    start: int = 11
    ema: float | None = None
    history: list[float] = field(default_factory=list)

    def threshold(self, step: int) -> float:
        """The std below which a group is dropped at update `step` (1-based); advances the EMA. 0 before `start`."""
        if self.beta <= 0 or step < self.start or not self.history:
            return 0.0
        if self.ema is None:
            self.ema = sum(self.history) / len(self.history)
        elif step > self.start:
            self.ema = self.ratio * self.ema + (1 - self.ratio) * self.history[-1]
        return self.ema * self.beta

    def observe(self, step: int, stds: torch.Tensor) -> None:
        """Record update `step`'s group stds (non-finite ones left out, as the official code)."""
        vals = [v for v in stds.tolist() if math.isfinite(v)]
        if step >= self.ema_start and vals:
            self.history.append(sum(vals) / len(vals))

    def state(self) -> dict:
        return {"ema": self.ema, "history": list(self.history)}

    def load(self, state: dict | None) -> None:
        if state:
            self.ema, self.history = state["ema"], list(state["history"])
