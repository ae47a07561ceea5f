"""Global forking tokens (Jia, Wang, Kasiviswanathan, arXiv 2510.05132; docs/methods.md §1): the pure parts.

A question x has M distinct traces r^(1..M); the model gets N >= M forking tokens g^(1..N) (``<think1>`` ..
``<thinkN>``) that open the reasoning block in place of ``<think>`` (the tag sits at the start of the assistant
turn, docs/methods.md §1.4). Set SFT (SSFT) matches traces to tags per question per step:

- matching cost (§1.3):  C[i, j] = -(1/L) Σ_{t<=L} log π(r^(j)_t | x, g^(i), r^(j)_{<t}), no gradient, the first
  L trained tokens of trace j after the tag (`matching_costs`; all N·M prefixes in ONE forward);
- assignment:  σ̂ = argmin_σ Σ_j C[σ(j), j] over injective σ: traces -> tags (`match`, the Hungarian algorithm);
- loss:  -Σ_j Σ_t log π(r^(j)_t | x, g^(σ̂(j)), r^(j)_{<t}) on the M matched full traces (`trainers/ssft.py`).

Evaluation (§1.7, §1.11): Pass@1 with ``<think1>`` and with a model-chosen tag, pass@k, Cons@k with the
official rules, per-tag accuracy / length / strategy (`evaluate_forking`). Our choices where the paper's
training code is unreleased (the tag's place, its initialisation, the tag is conditioning not a target, the tag
policy) are in docs/methods.md §1.4 and §1.10.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from ponder import ui
from ponder.config import check_choice
from ponder.engine import dist, masks, rollout, testbed, tree
from ponder.engine.chat import generation_prompt, pad_id, render
from ponder.engine.data import Problem, as_problem
from ponder.engine.logprobs import left_pad, reduce
from ponder.methods import verify
from ponder.methods.metrics import maj_correct, mean, pass_at_k

TAG_FORMAT = "<think{}>"


def forking_tags(n: int) -> list[str]:
    """``["<think1>", ..., "<thinkN>"]``."""
    if n < 1:
        raise ValueError(f"the number of forking tokens must be >= 1, got {n}")
    return [TAG_FORMAT.format(i) for i in range(1, n + 1)]


def tag_token_ids(tokenizer, tags: Sequence[str], single: bool = True) -> list[tuple[int, ...]]:
    """The token ids of each tag (as the tokenizer encodes it in isolation). single=True: each tag must be one
    token (forking tokens are added as special tokens; `ponder.models.load(..., add_tokens=...)`)."""
    out = []
    for t in tags:
        ids = tuple(tokenizer(t, add_special_tokens=False)["input_ids"])
        if single and len(ids) != 1:
            raise ValueError(f"tag {t!r} is {len(ids)} tokens under this tokenizer; forking tokens must be single "
                             "special tokens (load the model with add_tokens=forking_tags(N))")
        out.append(ids)
    return out


# ----------------------------------------------------------------------------------------------------------
# encoding a question and its traces
# ----------------------------------------------------------------------------------------------------------


def _trace_fields(trace: Any, where: str) -> tuple[str, str]:
    if isinstance(trace, dict):
        reasoning, content = trace.get("reasoning", trace.get("reasoning_content")), trace.get("content")
    else:
        reasoning, content = getattr(trace, "reasoning", None), getattr(trace, "content", None)
    if not isinstance(reasoning, str) or not isinstance(content, str) or not content:
        raise ValueError(f"{where}: a trace needs a string 'reasoning' and a non-empty string 'content'")
    return reasoning, content


def trace_messages(question: str, trace: Any, tag: str | None) -> list[dict[str, Any]]:
    """The conversation SSFT trains on: the question, then the trace as an assistant turn opened by `tag`."""
    reasoning, content = _trace_fields(trace, "trace")
    msg = {"role": "assistant", "reasoning": reasoning, "content": content}
    if tag is not None:
        msg["tag"] = tag
    return [{"role": "user", "content": question}, msg]


@dataclass
class Encoded:
    """A question with its traces, as ids: the prompt up to the tag, and per trace its trained tokens after
    the tag (reasoning block, answer, end-of-turn). Every sequence is ``prompt + tag_ids + traces[j]``."""
    prompt: list[int]
    traces: list[list[int]]
    sources: list[str]


def split_at_tag(segments) -> tuple[list[int], list[int], list[int]]:
    """(ids before the tag, the tag's ids, the trained ids after it) of a rendered tagged turn."""
    kinds = [s.kind for s in segments]
    if "tag" not in kinds:
        raise ValueError("the rendered turn has no tag segment")
    k = kinds.index("tag")
    before = [t for s in segments[:k] for t in s.ids]
    after = [t for s in segments[k + 1:] if s.trained for t in s.ids]
    return before, list(segments[k].ids), after


def encode(tokenizer, question: str, traces: Sequence[Any], tag: str = TAG_FORMAT.format(1),
           sources: Sequence[str] | None = None) -> Encoded:
    """Render each trace after `tag` with `ponder.chat.render` and cut it at the tag."""
    prompt, outs = None, []
    for j, tr in enumerate(traces):
        _trace_fields(tr, f"traces[{j}]")
        before, _, after = split_at_tag(render(tokenizer, trace_messages(question, tr, tag)))
        if prompt is None:
            prompt = before
        elif before != prompt:  # cannot happen with a sane template: the prompt does not depend on the trace
            raise ValueError(f"traces[{j}]: the prompt renders differently for different traces")
        outs.append(after)
    if prompt is None:
        raise ValueError("a question needs at least one trace")
    if sources is None:
        sources = [(t.get("source") if isinstance(t, dict) else getattr(t, "source", None)) or str(j)
                   for j, t in enumerate(traces)]
    return Encoded(prompt, outs, list(sources))


def check_substitution(tokenizer, question: str, trace: Any, tags: Sequence[str]) -> None:
    """Assert that swapping the tag's ids is the same as rendering with another tag (what lets SSFT encode a
    trace once and put any tag in front of it). Raises ValueError naming the tag otherwise."""
    ref = encode(tokenizer, question, [trace], tags[0])
    for t, ids in zip(tags, tag_token_ids(tokenizer, tags, single=False)):
        before, tag, after = split_at_tag(render(tokenizer, trace_messages(question, trace, t)))
        if (before, tag, after) != (ref.prompt, list(ids), ref.traces[0]):
            raise ValueError(f"tag {t!r}: the trace tokenizes differently after it than after {tags[0]!r}; "
                             "forking tokens must be special tokens that the tokenizer never merges")


# ----------------------------------------------------------------------------------------------------------
# matching costs: all N x M prefixes in one forward
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def costs_from_ids(model, items: Sequence[tuple[list[int], Sequence[Sequence[int]], Sequence[list[int]]]],
                   prefix_len: int | None, layout: str = "shared", pad_id: int = 0,
                   row_tokens: int = 1024) -> list[torch.Tensor]:
    """Matching costs for several questions in ONE forward.

    items: (prompt ids, ids of each of the N tags, the M traces' trained ids after the tag). Returns per question
    an (N, M) tensor of -mean log-prob of each trace's first `prefix_len` tokens (None or 0: whole trace).
    layout / row_tokens: see `ponder.masks.shared_prefix_rows` (the trees, packed into rows of `row_tokens`
    by the tree engine, `ponder.tree`)."""
    if layout not in ("shared", "packed"):
        raise ValueError(f"cost layout must be 'shared' or 'packed', got {layout!r}")
    trees = masks.shared_prefix_rows(items, prefix_len, layout, row_tokens)
    packed = tree.pack([tree.flatten(t) for t in trees], pad_id, row_tokens).to(next(model.parameters()).device)
    n_cells = [len(tags) * len(traces) for _, tags, traces in items]
    mean = reduce(tree.logprobs(model, packed), packed.pair_group, sum(n_cells), "mean").cpu()
    out, at = [], 0
    for (_, tags, traces), n in zip(items, n_cells):
        out.append(-mean[at:at + n].reshape(len(tags), len(traces)))
        at += n
    return out


def matching_costs(model, tokenizer, question: str, traces: Sequence[Any], num_tags: int, prefix_len: int | None,
                   tags: Sequence[str] | None = None, layout: str = "shared", row_tokens: int = 1024) -> torch.Tensor:
    """The SSFT matching-cost matrix (docs/methods.md §1.3), shape (N, M):
    C[i, j] = -(1/L) Σ_{t=1..L} log π(r^(j)_t | x, g^(i), r^(j)_{<t}), L = min(prefix_len, |r^(j)|), where r^(j)
    is trace j's trained tokens after the tag (reasoning block, answer, end-of-turn). No gradient; all N·M
    prefixes in one forward. tags: default ``<think1>..<thinkN>`` (must already be in the tokenizer)."""
    tags = list(tags) if tags is not None else forking_tags(num_tags)
    if len(tags) != num_tags:
        raise ValueError(f"num_tags={num_tags} but {len(tags)} tags were given")
    enc = encode(tokenizer, question, traces, tags[0])
    tag_ids = tag_token_ids(tokenizer, tags, single=False)
    return costs_from_ids(model, [(enc.prompt, tag_ids, enc.traces)], prefix_len, layout, pad_id(tokenizer),
                          row_tokens)[0]


# ----------------------------------------------------------------------------------------------------------
# assignment
# ----------------------------------------------------------------------------------------------------------


def match(cost: torch.Tensor) -> list[int]:
    """σ̂ = argmin over injective maps traces -> tags of Σ_j cost[σ(j), j] (scipy's Hungarian solver).

    cost: (N, M) tensor, tags x traces, N >= M. Returns the tag index of each trace (all distinct); N - M tags
    stay unused. Exact ties are broken by scipy's deterministic order (permute the traces to break them at
    random)."""
    if cost.dim() != 2:
        raise ValueError(f"cost must be a 2-D (tags x traces) matrix, got shape {tuple(cost.shape)}")
    n, m = cost.shape
    if n < m:
        raise ValueError(f"SSFT needs at least as many tags as traces (N >= M), got N={n}, M={m}")
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not (c == c).all():
        raise ValueError("the cost matrix contains NaN")
    rows, cols = linear_sum_assignment(c)
    out = [-1] * m
    for r, col in zip(rows.tolist(), cols.tolist()):
        out[col] = r
    return out


def random_match(num_tags: int, num_traces: int, rng: random.Random) -> list[int]:
    """The random-σ ablation (docs/methods.md §1.2): a uniformly random injective map traces -> tags."""
    if num_tags < num_traces:
        raise ValueError(f"need N >= M, got N={num_tags}, M={num_traces}")
    return rng.sample(range(num_tags), num_traces)


def assignment_cost(cost: torch.Tensor, sigma: Sequence[int]) -> float:
    return float(sum(cost[s, j] for j, s in enumerate(sigma)))


# ----------------------------------------------------------------------------------------------------------
# the tag distribution π(g | x)
# ----------------------------------------------------------------------------------------------------------


def first_token_logprobs(model, prompts: Sequence[Sequence[int]], pad_id: int = 0,
                         temperature: float = 1.0) -> torch.Tensor:
    """(B, V) log π(· | x) of the first assistant token after each prompt (a generation prompt ending with the
    assistant header), over the full vocabulary at `temperature`. Differentiable; one forward over the
    left-padded prompts, logits kept only at the last position."""
    ids, att, pos = left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device),
                use_cache=False, logits_to_keep=1)
    logits = out.logits[:, -1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(logits / temperature, dim=-1)


def tag_logprobs(model, prompts: Sequence[Sequence[int]], tag_ids: Sequence[int], pad_id: int = 0,
                 temperature: float = 1.0, policy: str = "tags") -> torch.Tensor:
    """(B, N) log π(g | x) of each tag as the first assistant token (docs/methods.md §1.10).
    policy ``full``: the tags' log-probs under the full-vocabulary softmax (they need not sum to one: other
    first tokens keep the rest); ``tags``: the distribution restricted to the N tags and renormalised."""
    check_choice("tag policy", policy, TAG_POLICIES)
    full = first_token_logprobs(model, prompts, pad_id, temperature)[:, list(tag_ids)]
    return full if policy == "full" else torch.log_softmax(full, dim=-1)


def tag_distribution(model, tokenizer, problems: list[Any], num_tags: int, batch_size: int = 64,
                     policy: str = "full") -> torch.Tensor:
    """Mean π(g | x) over problems (what GFPO moves): a (N,) tensor (under ``full`` the tags' mass need not
    sum to one)."""
    tags = forking_tags(num_tags)
    ids = [t[0] for t in tag_token_ids(tokenizer, tags)]
    prompts = [generation_prompt(tokenizer, [{"role": "user", "content": as_problem(p).question}]) for p in problems]
    pad = pad_id(tokenizer)
    with torch.no_grad():
        ps = [tag_logprobs(model, prompts[i:i + batch_size], ids, pad, policy=policy).exp() for i in
              range(0, len(prompts), batch_size)]
    return torch.cat(ps).mean(0)


def sample_tags(logp: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, n) column indices drawn from exp(logp) (rows of log-probs over tags or the vocabulary), with
    replacement."""
    return torch.multinomial(logp.detach().exp().float().cpu(), n, replacement=True, generator=generator)


# ----------------------------------------------------------------------------------------------------------
# consensus metrics (docs/methods.md §1.7)
# ----------------------------------------------------------------------------------------------------------


def distinct_answers(groups: Sequence[Sequence[dict[str, Any]]]) -> float | None:
    """Mean number of different extracted answers per problem (`groups`: each problem's sample records), over
    the problems with at least one: samples without an answer are not an answer, and a problem without any has
    no count (counting it as 0 would put the mean below one distinct answer per problem). None if none has one."""
    counts = [len(a) for a in ({r["answer"] for r in g if r["answer"] is not None} for g in groups) if a]
    return sum(counts) / len(counts) if counts else None


CONS_RULES = ("official", "ponder")
TAG_POLICIES = ("full", "tags")
CONS_ORDERS = ("round_robin", "tag_blocks")


def round_robin(per_tag: Sequence[Sequence[Any]], k: int | None = None) -> list[Any]:
    """[tag1 s1, tag2 s1, ..., tagN s1, tag1 s2, ...], cut to the first `k` (default all): the order in which
    the official tag-balanced Cons@k sees samples (`maj_sot@k`; its first 32 of 6 tags are 6, 6, 5, 5, 5, 5
    samples), so a tie goes to the earlier tag of the earliest round (docs/methods.md §1.11)."""
    n = len(per_tag[0])
    if any(len(s) != n for s in per_tag):
        raise ValueError("every tag needs the same number of samples")
    out = [s[i] for i in range(n) for s in per_tag]
    return out if k is None else out[:k]


def fair_split(k: int, num_tags: int) -> list[int]:
    """How the official evaluation spreads k samples over N tags: k // N each, the first k % N tags one more."""
    base, rem = divmod(k, num_tags)
    return [base + (i < rem) for i in range(num_tags)]


def tag_blocks(per_tag: Sequence[Sequence[Any]], k: int | None = None) -> list[Any]:
    """All of tag 1's samples, then tag 2's, ... cut to the first `k`: the order of the official plain maj@k."""
    out = [x for s in per_tag for x in s]
    return out if k is None else out[:k]


def vote_order(per_tag: Sequence[Sequence[Any]], cons_k: int | None = None, cons_order: str = "round_robin"
               ) -> list[Any]:
    """The samples one Cons@K vote sees, in the order the official LightEval fork lists them — the order that
    breaks a tie (the first-seen of the tied answers wins; docs/methods.md §1.11):
    - K = all samples: the plain `MajAtK` over the predictions as generated, tag by tag (`tag_blocks`: all of
      tag 1's samples, then tag 2's, ...), whatever `cons_order`;
    - K < all, ``round_robin``: the tag-balanced `maj_sot@K` (`MajAtKSoTsingle`), which lists the samples
      round-robin and counts the first K (`round_robin`: 6, 6, 5, 5, 5, 5 of 32 over 6 tags);
    - K < all, ``tag_blocks``: the plain `maj@K`, the first K in tag-block order."""
    check_choice("cons_order", cons_order, CONS_ORDERS)
    total = sum(len(s) for s in per_tag)
    if cons_k is None or cons_k >= total or cons_order == "tag_blocks":
        return tag_blocks(per_tag, cons_k)
    return round_robin(per_tag, cons_k)


def cons_at_k(answers: Sequence[str | None], correct: Sequence[bool], group_size: int | None = None,
              rule: str = "official") -> float:
    """Consensus accuracy of one problem's samples, in the order given (`vote_order` for one vote, `round_robin`
    for groups) (docs/methods.md §1.11).

    group_size None: one majority vote over all samples (the official Cons@32). Otherwise the samples are cut
    into consecutive groups of `group_size` (with N tags and group_size N, each group holds one sample of every
    tag in tag order: the official "native Cons@6", 11 groups x 6 tags), each group is majority-voted and
    scored, and the scores are averaged. Ties go to the answer seen first.
    rule ``official``: a sample without an answer (None) is a candidate like any other — if "no answer" wins,
    the vote scores 0; ``ponder``: unanswered samples do not vote (our earlier variant)."""
    check_choice("cons rule", rule, CONS_RULES)
    none_votes = rule == "official"
    if group_size is None:
        return float(maj_correct(answers, correct, none_votes))
    if group_size < 1 or len(answers) % group_size:
        raise ValueError(f"{len(answers)} samples do not split into groups of {group_size}")
    groups = range(0, len(answers), group_size)
    return sum(maj_correct(answers[g:g + group_size], correct[g:g + group_size], none_votes)
               for g in groups) / len(groups)


_OPENER = re.compile(r"^\s*<think\d*>")


def reasoning_of(completion: str) -> str:
    """The reasoning part of a completion (text before ``</think>``), without the opener the model chose itself
    when its first token was sampled (``<think>``, ``<think3>``, ...)."""
    return _OPENER.sub("", completion.split("</think>", 1)[0]).strip()


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluate_forking(model, tokenizer, problems: Sequence[Problem | dict], tags: Sequence[str], per_tag: int = 2,
                     sampled: int | None = None, group_size: int | None = None, temperature: float = 1.0,
                     max_new_tokens: int = 256, batch_size: int = 64, seed: int = 0,
                     prompt: str = "{question}", cons_k: int | None = None, cons_rule: str = "official",
                     cons_order: str = "round_robin", tag_policy: str = "full") -> dict[str, Any]:
    """Diversity evaluation of a model with forking tokens (docs/methods.md §1.7, §1.11).

    For every problem: `per_tag` samples with each tag forced (k = len(tags)·per_tag) and `sampled` samples
    (default k; 0 with a single tag) whose tag the model chooses itself: ``tag_policy="full"`` — plain sampling
    from the prompt, the first token drawn from the full vocabulary (the paper's GFPO evaluation; a first token
    that is no tag counts as ``other``); ``"tags"`` — the first token drawn among the tags only. Reports
    - ``pass@1/<tag1>`` (the paper's Pass@1), ``pass@1/sampled``, ``pass@1/tags`` (mean over forced samples);
    - ``pass@k`` (any of the k forced samples correct; unbiased estimator with n = k) and ``pass@k/sampled``;
    - ``cons@K`` — one majority vote over the first K = `cons_k` (default k) forced samples in `cons_order`
      (``round_robin``: the official tag-balanced Cons@K, 6, 6, 5, 5, 5, 5 samples for 32 over 6 tags;
      ``tag_blocks``: the official plain maj@K; with K = k, all samples in tag-major order, the official MajAtK:
      `vote_order`) — and ``cons@G/groups`` (groups of `group_size`, default
      len(tags): one sample per tag per group, the paper's "native" Cons@N), and ``maj@k/sampled``; votes follow
      `cons_rule` (``official``: "no answer" is a candidate; ``ponder``: it does not vote);
    - per tag: accuracy, mean completion length (tokens), share of each recognised strategy (testbed);
    - ``distinct_answers@k`` / ``distinct_strategies@k``: mean number of different final answers / solution
      strategies among the k forced samples (and among the sampled ones). Samples without an extractable answer
      are left out, and so are problems none of whose samples has one (None when no problem has one): the mean
      is over problems with an answer, so it is >= 1; ``no_answer@k`` is the share of samples left out.
    With a single tag (e.g. ``["<think>"]`` for an SFT-mixed model) the same numbers are plain sampling metrics.
    """
    problems = [as_problem(p, f"problems[{i}]", i) for i, p in enumerate(problems)]
    tags = list(tags)
    t_ids = tag_token_ids(tokenizer, tags, single=False)
    k = len(tags) * per_tag
    cons_k = cons_k or k
    if cons_k > k:
        raise ValueError(f"cons_k={cons_k} needs at least {-(-cons_k // len(tags))} samples per tag, got {per_tag}")
    check_choice("cons_order", cons_order, CONS_ORDERS)
    check_choice("tag_policy", tag_policy, TAG_POLICIES)
    sampled = (k if len(tags) > 1 else 0) if sampled is None else sampled  # one tag: sampling it = forcing it
    group_size = group_size or len(tags)
    base = [generation_prompt(tokenizer, [{"role": "user", "content": prompt.format(question=p.question)}])
            for p in problems]
    is_testbed = all(verify.verifier_of(p) in ("answer_is", "testbed") and p.meta.get("task") == "testbed"
                     for p in problems)

    def strategy(text):
        return testbed.strategy_of(reasoning_of(text)) if is_testbed else None

    def score(p, s, tag):
        return {"tag": tag, "text": s.text, "tokens": len(s.ids), "correct": verify.is_correct(p, s.text),
                "answer": verify.extract(p, s.text), "strategy": strategy(s.text)}

    def unit_records(unit: list[int], unit_seed: int) -> list[dict[str, Any]]:
        return _forking_records(model, tokenizer, [problems[i] for i in unit], [base[i] for i in unit], tags, t_ids,
                                per_tag, sampled, temperature, max_new_tokens, batch_size, unit_seed, tag_policy,
                                score)

    # several processes: each samples its work units of problems; every process gets all records, in order
    records = dist.map_units(unit_records, range(len(problems)), seed)
    forced = [r["forced"] for r in records]
    sampled_recs = [r["sampled"] for r in records]

    res: dict[str, Any] = {"n": len(problems), "tags": tags, "k": k, "per_tag": per_tag, "temperature": temperature}
    flat = [round_robin(f) for f in forced]
    res[f"pass@1/{tags[0]}"] = mean([mean([r["correct"] for r in f[0]]) for f in forced])
    res["pass@1/tags"] = mean([mean([r["correct"] for r in fl]) for fl in flat])
    res[f"pass@{k}"] = mean([pass_at_k(k, sum(r["correct"] for r in fl), k) for fl in flat])
    voted = [vote_order(f, cons_k, cons_order) for f in forced]
    res[f"cons@{cons_k}"] = mean([cons_at_k([r["answer"] for r in v], [r["correct"] for r in v], rule=cons_rule)
                                  for v in voted])
    if k % group_size == 0:
        res[f"cons@{group_size}/groups"] = mean([cons_at_k([r["answer"] for r in fl], [r["correct"] for r in fl],
                                                            group_size, cons_rule) for fl in flat])
    res[f"distinct_answers@{k}"] = distinct_answers(flat)
    res[f"no_answer@{k}"] = mean([mean([r["answer"] is None for r in fl]) for fl in flat])
    if is_testbed:
        res[f"distinct_strategies@{k}"] = mean([len({r["strategy"] for r in fl if r["strategy"]}) for fl in flat])
        res["unrecognised_strategy"] = mean([mean([r["strategy"] is None for r in fl]) for fl in flat])
    if sampled:
        res["pass@1/sampled"] = mean([mean([r["correct"] for r in s]) for s in sampled_recs])
        res[f"pass@{sampled}/sampled"] = mean([pass_at_k(sampled, sum(r["correct"] for r in s), sampled)
                                                for s in sampled_recs])
        res[f"maj@{sampled}/sampled"] = mean([cons_at_k([r["answer"] for r in s], [r["correct"] for r in s],
                                                         rule=cons_rule) for s in sampled_recs])
        res[f"distinct_answers@{sampled}/sampled"] = distinct_answers(sampled_recs)
        if is_testbed:
            res[f"distinct_strategies@{sampled}/sampled"] = mean([len({r["strategy"] for r in s if r["strategy"]})
                                                                   for s in sampled_recs])
        share = Counter(r["tag"] for s in sampled_recs for r in s)
        res["sampled_tag_share"] = {t: share[t] / (len(problems) * sampled) for t in [*tags, "other"] if share[t]}
    per = {}
    for ti, t in enumerate(tags):
        rs = [r for f in forced for r in f[ti]]
        row = {"accuracy": mean([r["correct"] for r in rs]), "mean_tokens": mean([r["tokens"] for r in rs])}
        if is_testbed:
            c = Counter(r["strategy"] or "other" for r in rs)
            row["strategies"] = {s: c[s] / len(rs) for s in sorted(c)}
        per[t] = row
    res["per_tag"] = per
    res["per_problem"] = {f"pass@1/{tags[0]}": [mean([r["correct"] for r in f[0]]) for f in forced],
                          "pass@1/tags": [mean([r["correct"] for r in fl]) for fl in flat],
                          f"pass@{k}": [float(any(r["correct"] for r in fl)) for fl in flat],
                          f"cons@{cons_k}": [cons_at_k([r["answer"] for r in v], [r["correct"] for r in v],
                                                       rule=cons_rule) for v in voted]}
    if sampled:
        res["per_problem"]["pass@1/sampled"] = [mean([r["correct"] for r in x]) for x in sampled_recs]
    res["records"] = [{"id": p.id, "question": p.question, "answer": p.answer, "forced": f, "sampled": s}
                      for p, f, s in zip(problems, forced, sampled_recs)]
    ui.info(f"forking eval: {len(problems)} problems, {len(tags)} tags x {per_tag} + {sampled} sampled-tag samples")
    return res


def _forking_records(model, tokenizer, problems: list[Problem], base: list[list[int]], tags: list[str],
                     t_ids: list[tuple[int, ...]], per_tag: int, sampled: int, temperature: float, max_new_tokens: int,
                     batch_size: int, seed: int, tag_policy: str, score) -> list[dict[str, Any]]:
    """`evaluate_forking`'s samples for one work unit of problems: per problem the forced samples (per tag) and
    the sampled-tag ones, scored."""
    pad = pad_id(tokenizer)
    forced_prompts = [b + list(t) for b in base for t in t_ids]
    out = rollout.sample(model, tokenizer, forced_prompts, n=per_tag, temperature=temperature,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                         description=f"{per_tag} samples x {len(tags)} tags")
    forced = []  # forced[p][t][s]
    for pi, p in enumerate(problems):
        forced.append([[score(p, s, tags[ti]) for s in out[pi * len(tags) + ti]] for ti in range(len(tags))])

    sampled_recs: list[list[dict]] = [[] for _ in problems]
    if sampled and tag_policy == "full":
        first = {t[0]: tag for t, tag in zip(t_ids, tags)}
        souts = rollout.sample(model, tokenizer, base, n=sampled, temperature=temperature,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed + 2,
                               description="sampled-tag samples")
        for pi, p in enumerate(problems):
            sampled_recs[pi] = [score(p, s, first.get(s.ids[0] if s.ids else None, "other")) for s in souts[pi]]
    elif sampled:
        gen = torch.Generator().manual_seed(seed + 1)
        logp = torch.cat([tag_logprobs(model, base[i:i + batch_size], [t[0] for t in t_ids], pad, temperature)
                          .detach() for i in range(0, len(base), batch_size)]) if len(tags) > 1 else \
            torch.zeros(len(base), 1)
        chosen = sample_tags(logp, sampled, gen)
        sp = [base[pi] + list(t_ids[int(t)]) for pi in range(len(problems)) for t in chosen[pi]]
        souts = rollout.sample(model, tokenizer, sp, n=1, temperature=temperature, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed=seed + 2, description="sampled-tag samples")
        for pi, p in enumerate(problems):
            sampled_recs[pi] = [score(p, souts[pi * sampled + j][0], tags[int(chosen[pi, j])])
                                for j in range(sampled)]

    return [{"forced": f, "sampled": s} for f, s in zip(forced, sampled_recs)]
