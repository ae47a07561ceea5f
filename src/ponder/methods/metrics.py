"""Accuracy, unbiased pass@k (Chen et al. 2021), majority vote (maj@k), RISE's sequential m1@tT / p1@tT, and
the evaluation loop."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ponder.engine import dist, rollout
from ponder.engine.data import Problem, as_problem
from ponder.engine.models import check_context, over_context
from ponder.engine.prompts import check_template
from ponder.methods import verify


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    computed as a stable product."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority(answers: Sequence[str | None], none_votes: bool = False) -> int | None:
    """Index of the sample carrying the most frequent answer; ties go to the answer seen first (the lowest
    sample index), as Python's ``max(list, key=list.count)`` does.

    none_votes False: samples without an answer (None) do not vote; None if no sample has one.
    none_votes True: "no answer" is a candidate like any other and can win (the official SSFT Cons@k,
    docs/methods.md §1.11)."""
    counts = Counter(a for a in answers if none_votes or a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, a in enumerate(answers) if (none_votes or a is not None) and counts[a] == best)


def maj_correct(answers: Sequence[str | None], correct: Sequence[bool], none_votes: bool = False) -> bool:
    """Is the majority answer correct? (A winning "no answer" is not.)"""
    i = majority(answers, none_votes)
    return i is not None and answers[i] is not None and bool(correct[i])


def mean(xs) -> float:
    """Mean of an iterable of numbers (bools count as 0/1); 0.0 when empty."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def rate(xs) -> float | None:
    """Mean of an iterable of numbers, or None when it is empty: a rate over no cases is undefined, not 0 (reports
    show it as "—")."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def sequential_metrics(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """RISE's sequential-evaluation metrics (arXiv 2407.18219 §6; docs/methods.md §3.7) from the answers and their
    correctness at each turn, both of shape (problems, turns) with T = turns:

    - ``m1@t1``: accuracy of the first turn's single sample;
    - ``m1@t{T}``: *without an oracle* — the majority vote over the T turns' extracted answers is correct
      (votes are over answers, not over rewards);
    - ``p1@t{T}``: *with an oracle* — some turn is correct (= stopping at the first correct turn).

    Tie rule (`majority`): among answers tied for the most votes the one given at the earliest turn wins;
    turns without an extractable answer (None) do not vote; a problem with no answer at any turn is wrong.
    Also returned: ``m1@tT`` / ``p1@tT`` (the same two values under names that do not depend on T),
    ``accuracy_by_turn`` (accuracy of turn k alone), ``majority_by_turn`` (m1@tk for k = 1..T) and
    ``pass_by_turn`` (p1@tk).
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers has {len(answers)} problems but correct has {len(correct)}")
    if not answers:
        raise ValueError("sequential_metrics needs at least one problem")
    T = len(answers[0])
    for i, (a, c) in enumerate(zip(answers, correct)):
        if len(a) != T or len(c) != T:
            raise ValueError(f"problem {i}: expected {T} turns in answers and correct, got {len(a)} and {len(c)} "
                             "(arrays must have shape (problems, turns))")
    if T < 1:
        raise ValueError("sequential_metrics needs at least one turn")
    acc = [mean([bool(c[k]) for c in correct]) for k in range(T)]
    maj = [mean([maj_correct(list(a[:k + 1]), list(c[:k + 1])) for a, c in zip(answers, correct)])
           for k in range(T)]
    anyc = [mean([any(bool(x) for x in c[:k + 1]) for c in correct]) for k in range(T)]
    out: dict[str, Any] = {"turns": T, "m1@t1": acc[0], f"m1@t{T}": maj[-1], f"p1@t{T}": anyc[-1]}
    out.update({"m1@tT": maj[-1], "p1@tT": anyc[-1], "accuracy_by_turn": acc, "majority_by_turn": maj,
                "pass_by_turn": anyc})
    out["per_problem"] = {"m1@t1": [float(bool(c[0])) for c in correct],
                          f"m1@t{T}": [float(maj_correct(list(a), list(c))) for a, c in zip(answers, correct)],
                          f"p1@t{T}": [float(any(bool(x) for x in c)) for c in correct],
                          f"acc@t{T}": [float(bool(c[-1])) for c in correct]}
    return out


def transitions(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """What a turn does with the previous one (diagnostics of self-correction):
    ``changed_answer_rate`` — the answer differs from the previous turn's; ``right_after_wrong`` /
    ``right_after_right`` — accuracy of turns following a wrong / a correct turn; ``repeats_shown_wrong`` —
    a turn following a wrong answer gives that same answer again, against ``fresh_gives_shown_wrong`` — how
    often an independent first-turn sample gives it (needs the parallel samples). A model that learned from
    the feedback repeats a wrong answer less often than a fresh sample produces it. A rate with no cases (no
    correct turn to follow, a single turn) is None, not 0."""
    steps = [(r, k) for r in records for k in range(1, len(r["answers"]))]
    after_wrong = [(r, k) for r, k in steps if not r["correct"][k - 1]]
    after_right = [(r, k) for r, k in steps if r["correct"][k - 1]]
    shown = [(r, k) for r, k in after_wrong if r["answers"][k - 1] is not None]
    out = {"changed_answer_rate": rate(r["answers"][k] != r["answers"][k - 1] for r, k in steps),
           "right_after_wrong": rate(r["correct"][k] for r, k in after_wrong),
           "right_after_right": rate(r["correct"][k] for r, k in after_right),
           "repeats_shown_wrong": rate(r["answers"][k] == r["answers"][k - 1] for r, k in shown)}
    if shown and "parallel_answers" in shown[0][0]:
        out["fresh_gives_shown_wrong"] = rate(a == r["answers"][k - 1] for r, k in shown
                                              for a in r["parallel_answers"])
    return out


def evaluate(model, tokenizer, problems: Sequence[Problem | dict], samples: int = 8, temperature: float = 1.0,
             max_new_tokens: int = 256, batch_size: int = 64, seed: int = 0, prompt: str = "{question}",
             greedy: bool = True, unit_size: int | None = None) -> dict[str, Any]:
    """Greedy accuracy, and over `samples` samples at `temperature`: mean accuracy, pass@k for k = 1, 2, 4, ...
    up to `samples`, and maj@`samples`. Also returns per-problem records. Problems whose prompt plus
    `max_new_tokens` does not fit the model's context are skipped and counted (``skipped_too_long``).
    Several processes: every process calls it; each samples its work units of problems (`ponder.dist.map_units`)
    and the metrics are computed once over the gathered records, the same on every process."""
    check_template(prompt, ("question",), "prompt")
    problems = [as_problem(p, f"problems[{i}]", i) for i, p in enumerate(problems)]
    prompts = [rollout.prompt_ids(tokenizer, prompt.format(question=p.question)) for p in problems]
    long = set(over_context(model, prompts, max_new_tokens))  # counted and skipped, never generated from
    if long and len(long) == len(problems):
        check_context(model, prompts, max_new_tokens)  # nothing left to evaluate: refuse, naming a prompt
    if long:
        problems = [p for i, p in enumerate(problems) if i not in long]
        prompts = [x for i, x in enumerate(prompts) if i not in long]

    def unit_records(unit: list[int], unit_seed: int) -> list[dict[str, Any]]:
        ps, xs = [problems[i] for i in unit], [prompts[i] for i in unit]
        records = [{"id": p.id, "question": p.question, "answer": p.answer} for p in ps]
        if greedy:
            g = rollout.sample(model, tokenizer, xs, n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed=unit_seed, description="greedy")
            for r, p, s in zip(records, ps, g):
                r.update(greedy=s[0].text, greedy_correct=verify.is_correct(p, s[0].text))
        if samples:
            ss = rollout.sample(model, tokenizer, xs, n=samples, temperature=temperature,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=unit_seed + 1,
                                description=f"{samples} samples/problem")
            for r, p, row in zip(records, ps, ss):
                r.update(samples=[s.text for s in row], correct=[verify.is_correct(p, s.text) for s in row],
                         answers=[verify.extract(p, s.text) for s in row])
        return records

    records = dist.map_units(unit_records, range(len(problems)), seed, unit_size)
    out: dict[str, Any] = {"n": len(problems), **({"skipped_too_long": len(long)} if long else {})}
    if greedy:
        out["greedy_accuracy"] = mean([r["greedy_correct"] for r in records])
    if samples:
        correct, answers = [r["correct"] for r in records], [r["answers"] for r in records]
        out["sample_accuracy"] = mean([mean(c) for c in correct])
        k = 1
        while k <= samples:
            out[f"pass@{k}"] = mean([pass_at_k(samples, sum(c), k) for c in correct])
            k *= 2
        if samples not in (1, 2, 4, 8, 16, 32, 64):
            out[f"pass@{samples}"] = mean([pass_at_k(samples, sum(c), samples) for c in correct])
        out[f"maj@{samples}"] = mean([maj_correct(a, c) for a, c in zip(answers, correct)])
        out["mixed_outcomes"] = mean([0 < sum(c) < samples for c in correct])
    out["records"] = records
    return out
