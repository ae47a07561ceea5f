"""The multi-turn episode environment RISE and retry share (arXiv 2407.18219 §3.2, §3.7; docs/methods.md §3, §7):
a single-turn problem becomes an episode — the question, an attempt, the retry feedback, the next attempt, … —
its reward (`Env`), the sliding context window of the sequential evaluation (`window`), and that evaluation
(`evaluate`: sequential turns with the feedback always "incorrect" + parallel first-turn samples; m1@t1,
m{k}@t1, m1@t{T}, p1@t{T}) with its metrics (`eval_metrics`, `headline`).

History: by default (`Env.history_reasoning = "keep"`, the paper's MDP) an earlier attempt is shown in full,
reasoning included, so the next attempt can see where it went wrong; ``strip`` renders earlier attempts as chat
templates do at inference (answers only). One renderer either way (`ponder.chat.generation_prompt`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ponder.config import check_choice
from ponder.engine import dist, rollout
from ponder.engine.chat import HISTORY_REASONING, generation_prompt, normalize_messages
from ponder.engine.data import Problem, as_problem
from ponder.engine.prompts import DEMO_ANSWER, FIRST_TURN_PROMPT, INSTRUCTION, RETRY_PROMPT, SUCCESS_PROMPT
from ponder.methods import metrics, verify

REWARDS = ("verify", "rise_official", "gsm8k")  # gsm8k: the old name of rise_official

def demo_messages() -> list[dict[str, Any]]:
    """The instruction + one-shot demo prefix: user(INSTRUCTION), assistant(DEMO_ANSWER, never trained)."""
    return [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": DEMO_ANSWER, "weight": 0.0}]


def assistant_message(text: str) -> dict[str, Any]:
    """A generated reply as an assistant message, an inline ``<think>…</think>`` prefix split into `reasoning`."""
    return normalize_messages([{"role": "assistant", "content": text}])[0]


@dataclass
class Env:
    """The RISE multi-turn environment around single-turn problems.

    reward: ``verify`` — `ponder.verify.score` (any task ponder can check; 1 = correct, partial credit counts
    as not yet successful) or ``rise_official`` — the official GSM8K reward, exactly (+1 / 0 / -1 for no
    parsable boxed integer; `ponder.verify.rise_official_reward`, docs/methods.md §3.9); ``gsm8k`` is its old
    name.
    demo: prefix the episode with the instruction + one-shot demo (math chat models); the first real user turn
    is then `FIRST_TURN_PROMPT`. Without it the first user turn is the bare question (the testbed).
    evaluation: the feedback is always `RETRY_PROMPT` and a correct attempt does not end the episode.
    history_reasoning: ``keep`` — an earlier attempt is shown in full in later turns' context (the paper's MDP:
    the next state is the previous state + the attempt + the feedback); ``strip`` — earlier attempts appear
    without their reasoning, as a chat template shows them at inference (docs/methods.md §3.2).
    """
    reward: str = "verify"
    demo: bool = False
    evaluation: bool = False
    history_reasoning: str = "keep"

    def __post_init__(self):
        check_choice("reward", self.reward, REWARDS)
        check_choice("history_reasoning", self.history_reasoning, HISTORY_REASONING)

    @property
    def official(self) -> bool:
        return self.reward in ("rise_official", "gsm8k")

    def prompt(self, tokenizer, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids an attempt is generated from (the history rendered with or without its reasoning)."""
        return generation_prompt(tokenizer, messages, self.history_reasoning)

    @property
    def prefix_len(self) -> int:
        return 2 if self.demo else 0

    def reset(self, problem: Problem | dict) -> list[dict[str, Any]]:
        """The messages an episode starts from."""
        problem = as_problem(problem)
        q = problem.question
        if not self.demo:
            return [{"role": "user", "content": q}]
        return demo_messages() + [{"role": "user", "content": FIRST_TURN_PROMPT.format(query=q)}]

    def score(self, problem: Problem | dict, text: str) -> float:
        problem = as_problem(problem)
        if self.official:
            return float(verify.rise_official_reward(text, problem.meta.get("answer_field") or f"#### {problem.answer}"))
        return float(verify.score(problem, text))

    def answer(self, problem: Problem | dict, text: str) -> str | None:
        """The answer a majority vote compares (`None`: no answer)."""
        problem = as_problem(problem)
        if self.official:
            n = verify.rise_official_answer(text)
            return None if n is None else str(n)
        return verify.extract(problem, text)

    def feedback(self, problem: Problem | dict, reward: float) -> tuple[str, bool]:
        """(the next user message, whether the episode ends)."""
        problem = as_problem(problem)
        if reward >= 1.0 and not self.evaluation:
            return SUCCESS_PROMPT, True
        return RETRY_PROMPT.format(query=problem.question), False

    def step(self, problem: Problem | dict, messages: list[dict[str, Any]], text: str
             ) -> tuple[list[dict[str, Any]], float, bool]:
        """Append the attempt and the feedback: (messages, reward, done)."""
        reward = self.score(problem, text)
        fb, done = self.feedback(problem, reward)
        return messages + [assistant_message(text), {"role": "user", "content": fb}], reward, done


def window(messages: list[dict[str, Any]], prefix_len: int, context_window: int | None) -> list[dict[str, Any]]:
    """The sliding context window of the sequential evaluation (docs/methods.md §3.7, `--context_window`): the prefix
    and the first user turn, then only the last (context_window - 1) attempt/feedback pairs. None or 0 keeps
    everything. (The official code keeps everything for context_window=1 through a ``[-0:]`` slice; here 1 keeps
    no earlier attempt.)"""
    if not context_window:
        return messages
    if context_window < 1:
        raise ValueError(f"context_window must be >= 1 (or 0/None for the full history), got {context_window}")
    head, rest = messages[:prefix_len + 1], messages[prefix_len + 1:]
    keep = 2 * (context_window - 1)
    return head + (rest[-keep:] if keep else [])


def evaluate(model, tokenizer, problems: Sequence[Problem | dict], env: Env | None = None, turns: int = 5, parallel: int = 5,
             context_window: int | None = 2, temperature: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
             batch_size: int = 64, progress: bool = True, unit_size: int | None = None, backend: str = "auto"
             ) -> dict[str, Any]:
    """Sequential and parallel evaluation (docs/methods.md §3.7; official `workflow_eval.py`).

    Sequential: `turns` turns, one sample per turn, feedback always `RETRY_PROMPT` (the episode never stops
    early), the sliding `context_window`. Parallel: `parallel` i.i.d. first-turn samples (equal compute).
    Returns m1@t1, m1@t{turns}, p1@t{turns} (`ponder.metrics.sequential_metrics`), m{parallel}@t1 (majority of
    the parallel samples) and p{parallel}@t1 (any parallel sample correct), per-turn accuracy, and records.
    `backend`: `rollout.sample`'s (a run with ``rollout_backend: vllm`` evaluates on its engine too).

    Several processes: every process calls it; the problems are split into work units as in `collect`, the
    records gathered, and the metrics computed once over all of them (`eval_metrics`), the same on every process.
    """
    env = dataclasses.replace(env or Env(), evaluation=True)
    problems = [as_problem(p, f"problems[{i}]", i) for i, p in enumerate(problems)]
    records = dist.map_units(lambda unit, unit_seed: _eval_records(
        model, tokenizer, unit, env, turns, parallel, context_window, temperature, max_new_tokens, unit_seed,
        batch_size, progress, backend), problems, seed, unit_size)
    result = eval_metrics(records, parallel)
    result["records"] = records
    return result


def _eval_records(model, tokenizer, problems: list[Problem], env: Env, turns: int, parallel: int,
                  context_window: int | None, temperature: float, max_new_tokens: int, seed: int, batch_size: int,
                  progress: bool, backend: str = "auto") -> list[dict[str, Any]]:
    """`evaluate`'s samples for one work unit: a record per problem (turns, answers, rewards, correct, and the
    parallel samples)."""
    msgs = [env.reset(p) for p in problems]
    texts: list[list[str]] = [[] for _ in problems]
    answers: list[list[str | None]] = [[] for _ in problems]
    correct: list[list[bool]] = [[] for _ in problems]
    rewards: list[list[float]] = [[] for _ in problems]
    for t in range(turns):
        prompts = [env.prompt(tokenizer, window(m, env.prefix_len, context_window)) for m in msgs]
        out = rollout.sample(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed + 1000 * t, batch_size=batch_size, progress=progress,
                             description=f"sequential turn {t + 1}/{turns}", backend=backend)
        for i, (p, row) in enumerate(zip(problems, out)):
            text = row[0].text
            msgs[i], r, _ = env.step(p, msgs[i], text)
            texts[i].append(text)
            rewards[i].append(r)
            answers[i].append(env.answer(p, text))
            correct[i].append(r >= 1.0)
    records = [{"id": p.id, "question": p.question, "answer": p.answer, "turns": texts[i], "answers": answers[i],
                "rewards": rewards[i], "correct": correct[i]} for i, p in enumerate(problems)]
    if parallel:
        out = rollout.sample(model, tokenizer, [env.prompt(tokenizer, env.reset(p)) for p in problems], n=parallel,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 999_983,
                             batch_size=batch_size, progress=progress, description=f"parallel x{parallel}",
                             backend=backend)
        for r, p, row in zip(records, problems, out):
            r.update(parallel=[s.text for s in row], parallel_answers=[env.answer(p, s.text) for s in row],
                     parallel_correct=[env.score(p, s.text) >= 1.0 for s in row])
    return records


def eval_metrics(records: Sequence[dict[str, Any]], parallel: int) -> dict[str, Any]:
    """`evaluate`'s metrics from its records (all problems)."""
    result: dict[str, Any] = {"n": len(records)}
    result.update(metrics.sequential_metrics([r["answers"] for r in records], [r["correct"] for r in records]))
    if parallel:
        pa, pc = [r["parallel_answers"] for r in records], [r["parallel_correct"] for r in records]
        result[f"m{parallel}@t1"] = metrics.mean(metrics.maj_correct(a, c) for a, c in zip(pa, pc))
        result[f"p{parallel}@t1"] = metrics.mean(any(c) for c in pc)
        result["parallel_sample_accuracy"] = metrics.mean(metrics.mean(c) for c in pc)
        result["per_problem"][f"m{parallel}@t1"] = [float(metrics.maj_correct(a, c)) for a, c in zip(pa, pc)]
    result.update(metrics.transitions(list(records)))
    return result


HEADLINE = ("m1@t1", "m{k}@t1", "m1@t{T}", "p1@t{T}", "p{k}@t1")


def headline(result: dict[str, Any], turns: int, parallel: int) -> list[tuple[str, float]]:
    keys = dict.fromkeys(h.format(k=parallel, T=turns) for h in HEADLINE)  # k = 1 makes m{k}@t1 = m1@t1
    return [(k, result[k]) for k in keys if k in result]
