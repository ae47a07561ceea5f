"""RISE: Recursive IntroSpEction — teaching a model to improve its own answer over turns (Qu, Zhang, Garg, Kumar;
arXiv 2407.18219, NeurIPS 2024; docs/methods.md §3).

A single-turn problem becomes a multi-turn episode (§3.2): the first user turn asks the question; after each
attempt the user answers with the fixed retry feedback (`RETRY_PROMPT`), so the next attempt sees the earlier
answers. During data collection a correct attempt ends the episode with `SUCCESS_PROMPT`; at evaluation the
feedback is always "incorrect" — the model never sees an oracle signal in context (§3.3, §3.7).

This module holds data collection (on-policy turns; best-of-n per turn = self-distillation, or a teacher model = distillation), the conversion of trajectories into reward-weighted SFT
data (weights exp(r/τ), criteria all / better / best / success). The loop collect -> train -> evaluate is the recipe `ponder.recipes.rise`; the
trainer is `ponder.trainers.rise.RISETrainer`: a trajectory is trained as ONE sequence with a
weight per attempt, which equals the official one-example-per-turn loss (tests/test_rise.py proves it).

The episode environment and the evaluation are `ponder.episodes` (shared with retry); their names are
re-exported here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ponder import ui
from ponder.config import check_choice
from ponder.engine import dist, rollout
from ponder.engine.data import DataError, Problem, as_problem, read_jsonl
from ponder.engine.prompts import DEMO_ANSWER, FIRST_TURN_PROMPT, INSTRUCTION, RETRY_PROMPT, SUCCESS_PROMPT
from ponder.methods import metrics
from ponder.methods.advantages import reward_weights
from ponder.methods.episodes import (  # re-exported: the names ponder.methods.rise had
    HEADLINE,
    REWARDS,
    Env,
    assistant_message,
    demo_messages,
    eval_metrics,
    evaluate,
    headline,
    window,
)

__all__ = ["RETRY_PROMPT", "FIRST_TURN_PROMPT", "SUCCESS_PROMPT", "INSTRUCTION", "DEMO_ANSWER", "Env", "collect",
           "convert", "evaluate", "reward_weight", "REWARDS", "window", "HEADLINE", "headline", "eval_metrics",
           "demo_messages", "assistant_message"]

CRITERIA = ("all", "better", "best", "success")
TAU = 0.4


def reward_weight(r, tau: float = TAU):
    """Reward-weighted regression weight exp(r / τ) (docs/methods.md §3.5; official `workflow_convert.py`, τ = 0.4:
    +1 -> 12.18, 0 -> 1.0, -1 -> 0.082). Works on floats and tensors."""
    return reward_weights(r, tau)




# ----------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------


def is_degenerate(text: str, max_repeats: int = 150, max_word: int = 300) -> bool:
    """The official collection filter (`workflow_gen.py detect_duplicates`): a (lower-cased, whitespace-split)
    word repeated more than 150 times or a "word" longer than 300 characters."""
    counts = Counter(text.lower().split())
    return any(c > max_repeats or len(w) > max_word for w, c in counts.items())


# ----------------------------------------------------------------------------------------------------------
# data collection
# ----------------------------------------------------------------------------------------------------------


def _per_turn(values, t: int):
    if isinstance(values, int):
        return values
    values = list(values)
    if not values:
        raise ValueError("samples per turn: empty list")
    return values[min(t, len(values) - 1)]


def collect(model, tokenizer, problems: Sequence[Problem | dict], env: Env | None = None, turns: int = 2,
            samples: int | Sequence[int] = (1, 4), teacher=None, teacher_turns: Sequence[int] | None = None,
            temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
            batch_size: int = 64, progress: bool = True, unit_size: int | None = None, backend: str = "auto",
            dtype: str = "auto") -> list[dict[str, Any]]:
    """On-policy multi-turn rollouts (docs/methods.md §3.4; official `workflow_gen.py`).

    At turn t every unfinished episode samples `samples[t]` candidates (the last entry repeats) from the model
    of that turn — the learner, or `teacher` (a ``(model, tokenizer)`` pair, distillation) at `teacher_turns`
    (default: every turn after the first) — given the history so far. Degenerate candidates are dropped
    (`is_degenerate`); the highest-reward candidate (the first one on ties, like the official ``index(max)``)
    becomes the attempt, followed by its feedback; a successful attempt ends the episode. An episode whose
    candidates are all degenerate stops there (``blocked``).

    Returns one record per problem: the starting messages (``prompt``), every attempt with its reward,
    feedback and all candidates with their rewards, and a summary (``rewards``, ``max_reward``, ``success``).

    Several processes: every process calls it with all the problems; each collects its work units
    (`ponder.dist.map_units`: `unit_size` problems, default one unit per process, each seeded from `seed`) and
    every process gets all the records, in problem order. `backend` and `dtype` are `rollout.sample`'s (the
    learner's turns; a teacher samples as it is).
    """
    env = env or Env()
    problems = [as_problem(p, f"problems[{i}]", i) for i, p in enumerate(problems)]
    if env.evaluation:
        raise ValueError("collect needs a collection environment (evaluation=False)")
    if teacher is not None and teacher_turns is None:
        teacher_turns = range(1, turns)
    teacher_turns = set(teacher_turns or ())
    return dist.map_units(lambda unit, unit_seed: _collect(
        model, tokenizer, unit, env, turns, samples, teacher, teacher_turns, temperature, top_p, max_new_tokens,
        unit_seed, batch_size, progress, backend, dtype), problems, seed, unit_size)


def _collect(model, tokenizer, problems: list[Problem], env: Env, turns: int, samples, teacher, teacher_turns: set,
             temperature: float, top_p: float, max_new_tokens: int, seed: int, batch_size: int, progress: bool,
             backend: str, dtype: str = "auto") -> list[dict[str, Any]]:
    """`collect` on one work unit."""
    eps = []
    for p in problems:
        eps.append({"problem": p, "messages": env.reset(p), "done": False, "record": {
            "id": p.id, "question": p.question, "answer": p.answer, "meta": p.meta, "prompt": env.reset(p),
            "attempts": [], "blocked": False}})
    for t in range(turns):
        active = [e for e in eps if not e["done"]]
        if not active:
            break
        use_teacher = t in teacher_turns
        if use_teacher and teacher is None:
            raise ValueError(f"turn {t} is a teacher turn but no teacher was given")
        m, tok = teacher if use_teacher else (model, tokenizer)
        n = _per_turn(samples, t)
        out = rollout.sample(m, tok, [env.prompt(tok, e["messages"]) for e in active], n=n,
                             max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed + 1000 * t, batch_size=batch_size,
                             progress=progress, description=f"collect turn {t + 1}/{turns} ({n}/episode)",
                             backend="auto" if use_teacher else backend, dtype="auto" if use_teacher else dtype)
        for e, row in zip(active, out):
            p, rec = e["problem"], e["record"]
            cands = [{"text": s.text, "reward": env.score(p, s.text), "finish_reason": s.finish_reason,
                      "degenerate": is_degenerate(s.text)} for s in row]
            ok = [c for c in cands if not c["degenerate"]]
            if not ok:
                rec["blocked"] = True
                e["done"] = True
                continue
            best = max(ok, key=lambda c: c["reward"])  # max() keeps the first of equal rewards
            e["messages"], reward, e["done"] = env.step(p, e["messages"], best["text"])
            msg = e["messages"][-2]
            rec["attempts"].append({"turn": t, "text": best["text"], "reasoning": msg["reasoning"],
                                    "content": msg["content"], "reward": reward,
                                    "finish_reason": best["finish_reason"],
                                    "source": "teacher" if use_teacher else "policy",
                                    "feedback": e["messages"][-1]["content"],
                                    "candidates": [{"text": c["text"], "reward": c["reward"],
                                                    "degenerate": c["degenerate"]} for c in cands]})
    records = []
    for e in eps:
        rec = e["record"]
        rewards = [a["reward"] for a in rec["attempts"]]
        rec.update(rewards=rewards, max_reward=max(rewards) if rewards else None,
                   success=bool(rewards) and max(rewards) >= 1.0)
        records.append(rec)
    return records


def collection_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per turn: episodes reaching it and the success rate of its chosen attempt; overall success."""
    turns = max((len(r["attempts"]) for r in records), default=0)
    by_turn = []
    for t in range(turns):
        at = [r["attempts"][t] for r in records if len(r["attempts"]) > t]
        by_turn.append({"turn": t + 1, "episodes": len(at),
                        "success": sum(a["reward"] >= 1.0 for a in at) / len(at),
                        "candidate_success": metrics.mean([c["reward"] >= 1.0 for a in at for c in a["candidates"]])})
    return {"episodes": len(records), "success": metrics.mean([r["success"] for r in records]),
            "blocked": sum(r["blocked"] for r in records), "by_turn": by_turn,
            "sampled_attempts": sum(len(a["candidates"]) for r in records for a in r["attempts"])}


def load_trajectories(path: str | Path) -> list[dict[str, Any]]:
    """Trajectory records written by `collect` (JSONL); a bad record names its file, line and field."""
    out = []
    for where, rec in read_jsonl(path):
        check_trajectory(rec, where)
        out.append(rec)
    if not out:
        raise DataError(f"{path}: no trajectories")
    return out


def check_trajectory(rec: dict[str, Any], where: str) -> None:
    for name, kind in (("prompt", list), ("attempts", list)):
        if not isinstance(rec.get(name), kind):
            raise DataError(f"{where}: field '{name}' must be a {kind.__name__} (a trajectory written by "
                            "`ponder.rise.collect`)")
    for j, a in enumerate(rec["attempts"]):
        if not isinstance(a, dict):
            raise DataError(f"{where}: attempts[{j}] must be an object")
        for name in ("text", "reward", "feedback"):
            if name not in a:
                raise DataError(f"{where}: attempts[{j}]: missing field '{name}'")
        if isinstance(a["reward"], bool) or not isinstance(a["reward"], (int, float)) or not math.isfinite(a["reward"]):
            # a NaN/inf reward (JSON's NaN, Infinity) would make the weight exp(r/τ) NaN, inf or 0 silently
            raise DataError(f"{where}: attempts[{j}].reward must be a finite number, got {a['reward']!r}")


# ----------------------------------------------------------------------------------------------------------
# conversion into reward-weighted SFT data
# ----------------------------------------------------------------------------------------------------------


def keep_mask(rewards: Sequence[float], criteria: str = "all") -> list[bool]:
    """Which turns carry loss (official `workflow_convert.py`): the first turn always, except under
    ``success``; ``all`` every turn; ``better`` r_i > r_{i-1}; ``best`` r_i >= every earlier r_j;
    ``success`` r_i = 1."""
    check_choice("criteria", criteria, CRITERIA)
    out = []
    for i, r in enumerate(rewards):
        if criteria == "success":
            out.append(r >= 1.0)
        elif i == 0 or criteria == "all":
            out.append(True)
        elif criteria == "better":
            out.append(r > rewards[i - 1])
        else:
            out.append(all(r >= q for q in rewards[:i]))
    return out


def dedupe(attempts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop attempts whose stripped text is empty or repeats an earlier attempt, together with their feedback
    (official ``--remove_duplication``)."""
    seen, out = set(), []
    for a in attempts:
        t = a["text"].strip()
        if t and t not in seen:
            seen.add(t)
            out.append(a)
    return out


def to_conversation(record: dict[str, Any], tau: float = TAU, criteria: str = "all",
                    remove_duplicates: bool = False) -> dict[str, Any] | None:
    """One trajectory -> ONE conversation with a weight on every assistant message: exp(r_i/τ) on attempts the
    criterion keeps, 0 (context only) on the others and on the demo answer. The conversation ends at its last
    weighted attempt. None when no attempt is kept."""
    attempts = dedupe(record["attempts"]) if remove_duplicates else list(record["attempts"])
    for i, a in enumerate(attempts):  # an episode ends at its first success (the official converter too)
        if a["reward"] >= 1.0:
            attempts = attempts[:i + 1]
            break
    keep = keep_mask([a["reward"] for a in attempts], criteria)
    if not any(keep):
        return None
    msgs = [dict(m, weight=0.0) if m["role"] == "assistant" else dict(m) for m in record["prompt"]]
    for i, (a, k) in enumerate(zip(attempts, keep)):
        m = assistant_message(a["text"])
        m["weight"] = float(reward_weight(a["reward"], tau)) if k else 0.0
        msgs.append(m)
        if i < len(attempts) - 1:
            msgs.append({"role": "user", "content": a["feedback"]})
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant" and m["weight"])
    return {"id": record.get("id"), "messages": msgs[:last + 1],
            "rewards": [a["reward"] for a in attempts], "kept": [i for i, k in enumerate(keep) if k]}


def convert(records: Sequence[dict[str, Any]], tau: float = TAU, criteria: str = "all",
            remove_duplicates: bool = False, only_success: bool = False) -> tuple[list[dict[str, Any]], Counter]:
    """Trajectories -> weighted conversations (one per trajectory) and counts of what was kept and dropped."""
    out, stats = [], Counter()
    for i, rec in enumerate(records):
        check_trajectory(rec, f"trajectories[{i}]")
        stats["trajectories"] += 1
        if only_success and not any(a["reward"] >= 1.0 for a in rec["attempts"]):
            stats["skipped_not_successful"] += 1
            continue
        n = len(rec["attempts"])
        conv = to_conversation(rec, tau, criteria, remove_duplicates)
        if remove_duplicates:
            stats["duplicate_attempts_removed"] += n - len(dedupe(rec["attempts"]))
        if conv is None:
            stats["skipped_nothing_kept"] += 1
            continue
        stats["weighted_attempts"] += len(conv["kept"])
        for k in conv["kept"]:
            stats[f"weighted_attempts_reward_{conv['rewards'][k]:g}"] += 1
        out.append(conv)
    ui.info(f"rise data: {stats['trajectories']} trajectories -> {len(out)} conversations with "
            f"{stats['weighted_attempts']} weighted attempts (criteria={criteria}, tau={tau})")
    return out, stats


def per_turn_examples(conversation: dict[str, Any] | list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The official layout of the same data: one example per weighted attempt — the conversation truncated
    after it, only that last attempt carrying its weight, earlier attempts masked (docs/methods.md §3.5)."""
    msgs = conversation["messages"] if isinstance(conversation, dict) else conversation
    out = []
    for k, m in enumerate(msgs):
        if m["role"] == "assistant" and m.get("weight", 1.0):
            out.append([dict(x, weight=(x.get("weight", 1.0) if j == k else 0.0)) if x["role"] == "assistant"
                        else dict(x) for j, x in enumerate(msgs[:k + 1])])
    return out


