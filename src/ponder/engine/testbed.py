"""The testbed's task, tokenizer and shipped weights: a tiny reasoning model ponder pre-trains from scratch on
2 CPU cores (the pre-training recipe is `ponder.recipes.testbed`; its weights ship in ``weights/testbed``).

The task is `a+b*c` (a, b two-digit, c one-digit) with step-by-step reasoning in a ``<think>`` block and the
answer sentence "The answer is N." (LaTRO's answer template). The data has what every method needs:

- four distinct solution strategies per problem (`STRATEGIES`; SSFT matches them to forking tokens);
- multi-turn conversations whose follow-up turns ("Now add 17.") build on earlier answers (one-pass);
- retry episodes: a wrong first attempt with a plausible arithmetic slip, the RISE retry feedback, then a
  correct attempt (RISE), so the model knows the multi-turn format and makes fixable first-attempt errors.

The model is a character-level Llama (4 layers, hidden 192, ~1.8M parameters). Its weights ship with the
package (checked by SHA-256), so every machine starts from the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ponder.engine.chat import CHATML_TEMPLATE, THINK_CLOSE, THINK_OPEN
from ponder.engine.prompts import ANSWER_TEMPLATE, RETRY_PROMPT

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", THINK_OPEN, THINK_CLOSE]
CHARSET = [c for c in string.printable if c not in "\r\x0b\x0c"]  # letters, digits, punctuation, space, \t, \n
WORDS = ["system", "user", "assistant", "The answer is"]
TASK = "testbed"
WORDS_TASK = "testbed:words"
VERSION = 2  # bump when the data or the recipe changes


def build_tokenizer():
    """The project tokenizer: one token per character plus ChatML/think specials (deterministic, no training)."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARSET + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    # A few whole words as single tokens (like BPE merges): the role names and the answer phrase. This keeps
    # the question close to the answer in tokens, which a 2M-parameter model needs to learn to copy it.
    tk.add_tokens([AddedToken(w, normalized=False, special=False) for w in WORDS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<unk>",
                                  additional_special_tokens=[THINK_OPEN, THINK_CLOSE])
    tok.chat_template = CHATML_TEMPLATE
    return tok


# ----------------------------------------------------------------------------------------------------------
# problems and solutions
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arith:
    a: int
    b: int
    c: int

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}*{self.c}=?"

    @property
    def answer(self) -> int:
        return self.a + self.b * self.c


def _direct(p: Arith, bc: int, ans) -> str:
    return f"{p.b}*{p.c}={bc}. {p.a}+{bc}={ans(bc)}."


def _split(p: Arith, bc: int, ans) -> str:
    hi, lo = (p.b // 10) * 10, p.b % 10
    return f"{hi}*{p.c}={hi * p.c}. {lo}*{p.c}={lo * p.c}. {hi * p.c}+{lo * p.c}={bc}. {p.a}+{bc}={ans(bc)}."


def _swap(p: Arith, bc: int, ans) -> str:
    return f"{p.c}*{p.b}={bc}. {bc}+{p.a}={ans(bc)}."


def _ones_first(p: Arith, bc: int, ans) -> str:
    hi, lo = (p.b // 10) * 10, p.b % 10
    return f"{lo}*{p.c}={lo * p.c}. {hi}*{p.c}={hi * p.c}. {lo * p.c}+{hi * p.c}={bc}. {bc}+{p.a}={ans(bc)}."


STRATEGIES = {"direct": _direct, "split": _split, "swap": _swap, "ones_first": _ones_first}
STRATEGY_WEIGHTS = {"direct": 0.4, "split": 0.2, "swap": 0.2, "ones_first": 0.2}


def solve(p: Arith, strategy: str = "direct", slip: int = 0) -> tuple[str, int]:
    """(reasoning, final answer). `slip` != 0 makes the product step wrong by that amount and carries the
    error through, as a real arithmetic slip would."""
    bc = p.b * p.c + slip
    return STRATEGIES[strategy](p, bc, lambda x: p.a + x), p.a + bc


def answer_text(n: int | str) -> str:
    return ANSWER_TEMPLATE.format(answer=n)


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """An integer in English words, the free-text answers of ``testbed:words``: 72 -> "seventy-two",
    712 -> "seven hundred twelve", 1005 -> "one thousand five", -3 -> "minus three" (|n| < 10**6)."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")
    if n < 10**6:
        return number_words(n // 1000) + " thousand" + (" " + number_words(n % 1000) if n % 1000 else "")
    raise ValueError(f"number_words covers |n| < 10**6, got {n}")


def strategy_of(reasoning: str) -> str | None:
    """Which of `STRATEGIES` a reasoning text follows (by its shape), or None."""
    steps = [s for s in reasoning.strip().split(". ") if s]
    if len(steps) == 2:
        return "direct" if re.match(r"^\d{2}\*\d=", steps[0]) else "swap" if re.match(r"^\d\*\d{2}=", steps[0]) else None
    if len(steps) == 4:
        return "split" if re.match(r"^\d0\*\d=", steps[0]) else "ones_first" if re.match(r"^\d\*\d=", steps[0]) else None
    return None


def sample_problem(rng: random.Random) -> Arith:
    return Arith(rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9))


def heldout(n: int = 200, seed: int = 12345) -> list[Arith]:
    """Held-out test problems; never used for pre-training."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        p = sample_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


_HELDOUT = frozenset(heldout(1000))


def problems(n: int, seed: int = 0, split: str = "test") -> list[dict[str, Any]]:
    """`n` testbed problems as Problem dicts. split="test": the held-out set (first n of a fixed list);
    split="train": fresh problems drawn with `seed`, never in the held-out set."""
    if split == "test":
        ps = heldout(n)
    else:
        rng, ps = random.Random(seed), []
        while len(ps) < n:
            p = sample_problem(rng)
            if p not in _HELDOUT:
                ps.append(p)
    return [{"id": f"testbed-{split}-{i}", "question": p.question, "answer": str(p.answer),
             "meta": {"task": TASK, "a": p.a, "b": p.b, "c": p.c}} for i, p in enumerate(ps)]


def word_problems(n: int, seed: int = 0, split: str = "test") -> list[dict[str, Any]]:
    """``testbed:words``, the testbed's free-text task: the same problems as `problems` (same seeds, same split
    rule), whose reference answer is the number in words ("seven hundred twelve"; y = "The answer is seven
    hundred twelve."). There is no number to parse: the answer is checked as text (verifier ``answer_is``,
    case-insensitive exact match after "The answer is"). The rationale stays in digits, so the model can compute
    in the format it knows and must then *say* the result: a reference answer that is a sentence, reachable
    by the testbed after a short SFT on `conversations("words")`."""
    out = problems(n, seed, split)
    for p in out:
        p["id"] = p["id"].replace("testbed-", "testbed-words-")
        p["answer"] = number_words(int(p["answer"]))
        p["meta"] = {**p["meta"], "task": WORDS_TASK, "verifier": "answer_is"}
    return out


def _pick_strategy(rng: random.Random) -> str:
    return rng.choices(list(STRATEGY_WEIGHTS), weights=list(STRATEGY_WEIGHTS.values()))[0]


def _assistant(reasoning: str, answer: int) -> dict[str, Any]:
    return {"role": "assistant", "reasoning": reasoning, "content": answer_text(answer)}


def single_turn(p: Arith, rng: random.Random, strategy: str | None = None) -> list[dict[str, Any]]:
    reasoning, ans = solve(p, strategy or _pick_strategy(rng))
    return [{"role": "user", "content": p.question}, _assistant(reasoning, ans)]


_FOLLOW_UPS = [("Now add {d}.", lambda x, d: (f"{x}+{d}={x + d}.", x + d)),
               ("Now subtract {d}.", lambda x, d: (f"{x}-{d}={x - d}.", x - d)),
               ("Now double it.", lambda x, d: (f"{x}*2={2 * x}.", 2 * x))]


def multi_turn(p: Arith, rng: random.Random, turns: int, strategy: str | None = None) -> list[dict[str, Any]]:
    """A conversation of `turns` assistant turns: the problem, then follow-ups on the previous answer."""
    msgs = single_turn(p, rng, strategy)
    x = p.answer
    for _ in range(turns - 1):
        text, step = _FOLLOW_UPS[rng.randrange(len(_FOLLOW_UPS))]
        d = rng.randint(10, 99)
        reasoning, x2 = step(x, d)
        if abs(x2) > 9999:  # keep numbers small enough for a tiny model
            text, step = _FOLLOW_UPS[1]
            reasoning, x2 = step(x, d)
        msgs += [{"role": "user", "content": text.format(d=d)}, _assistant(reasoning, x2)]
        x = x2
    return msgs


def slip(rng: random.Random) -> int:
    return rng.choice([-1, 1]) * rng.choice([1, 2, 10, 10, 20, 100])


def retry_episode(p: Arith, rng: random.Random, wrong_attempts: int = 1, strategy: str | None = None,
                  strategies: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Wrong attempt(s) with an arithmetic slip, the RISE retry feedback after each, then a correct attempt;
    each attempt's strategy is `strategy`, else drawn from `strategies` (default `STRATEGY_WEIGHTS`). Only the
    final attempt is trained (the failed ones carry weight 0: context)."""
    def pick():
        if strategy:
            return strategy
        w = strategies or STRATEGY_WEIGHTS
        return rng.choices(list(w), weights=list(w.values()))[0]

    msgs = [{"role": "user", "content": p.question}]
    for _ in range(wrong_attempts):
        reasoning, ans = solve(p, pick(), slip=slip(rng))
        msgs += [dict(_assistant(reasoning, ans), weight=0.0),
                 {"role": "user", "content": RETRY_PROMPT.format(query=p.question)}]
    reasoning, ans = solve(p, pick())
    return msgs + [_assistant(reasoning, ans)]


def gold_conversation(problem) -> list[dict[str, Any]]:
    """A testbed `Problem` with its gold rationale in the ``direct`` format the testbed was pre-trained on (the
    SFT baseline of LaTRO: one gold rationale per question)."""
    return single_turn(Arith(*(int(problem.meta[k]) for k in "abc")), random.Random(0), "direct")


def trace_set(p: Arith, strategies: list[str] | None = None) -> dict[str, Any]:
    """One question with one trace per strategy (SSFT's TraceSet record); `strategies`: a subset of
    `STRATEGIES` (default all four)."""
    traces = []
    for name in strategies or STRATEGIES:
        reasoning, ans = solve(p, name)
        traces.append({"reasoning": reasoning, "content": answer_text(ans), "source": name})
    return {"question": p.question, "answer": str(p.answer), "traces": traces}


def _train_problems(rng: random.Random):
    while True:
        p = sample_problem(rng)
        if p not in _HELDOUT:
            yield p


def words_turn(p: Arith) -> list[dict[str, Any]]:
    """The ``direct`` gold rationale with the answer in words (`word_problems`' reference answer)."""
    reasoning, ans = solve(p, "direct")
    return [{"role": "user", "content": p.question},
            {"role": "assistant", "reasoning": reasoning, "content": answer_text(number_words(ans))}]


def conversations(kind: str, n: int, seed: int = 0, split: str = "train") -> list[list[dict[str, Any]]]:
    """Generated conversations: ``multi`` (2-8 turns), ``retry``, ``single`` (a random strategy), ``gold``
    (the ``direct`` strategy the testbed was pre-trained on: LaTRO's SFT baseline) or ``words`` (``gold`` with the
    answer in words: the SFT that teaches ``testbed:words``); the problems are those of `problems(n, seed, split)`
    (split="test": the held-out ones)."""
    rng = random.Random(seed)
    probs = iter(heldout(n)) if split == "test" else _train_problems(rng)
    makers = {"multi": lambda p: multi_turn(p, rng, rng.randint(2, 8)),
              "gold": lambda p: single_turn(p, rng, "direct"),
              "words": lambda p: words_turn(p),
              "retry": lambda p: retry_episode(p, rng, wrong_attempts=rng.choice([1, 1, 2])),
              "single": lambda p: single_turn(p, rng)}
    if kind not in makers:
        raise ValueError(f"unknown testbed conversation kind {kind!r} (expected {', '.join(makers)})")
    return [makers[kind](next(probs)) for _ in range(n)]


def trace_sets(n: int, seed: int = 0, split: str = "train", strategies: list[str] | None = None
               ) -> list[dict[str, Any]]:
    """TraceSet records: each question with one trace per strategy (SSFT's data); `strategies` as in
    `trace_set` (``testbed:traces:direct,split``: the two the testbed was pre-trained on)."""
    bad = [s for s in strategies or () if s not in STRATEGIES]
    if bad or (strategies is not None and len(set(strategies)) < 2):
        raise ValueError(f"testbed trace strategies must be two or more of {', '.join(STRATEGIES)}, "
                         f"got {','.join(strategies or [])!r}")
    probs = iter(heldout(n)) if split == "test" else _train_problems(random.Random(seed))
    return [trace_set(next(probs), strategies) for _ in range(n)]


PRETRAIN_STRATEGIES = {"direct": 0.75, "split": 0.25}


def pretraining_conversations(n: int, seed: int = 0, mix: dict[str, float] | None = None,
                              strategies: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The pre-training data (records with ``messages`` and ``meta``), in training order (held-out problems
    excluded).

    Solutions use two of the four strategies (`PRETRAIN_STRATEGIES`): mostly ``direct`` (one 2-digit x 1-digit
    product: short, and the step a 2M model gets wrong most), sometimes ``split`` (tens and units separately:
    longer, easier steps). A model that knows a short and a careful way gives every method something to act on
    — LaTRO can prefer the rationale that makes the answer likely, RISE can learn to try the careful way after
    a failure, GFPO can pick the better tag — while the other two strategies are left for SSFT to teach (a
    mixture of all four cut greedy accuracy from ~57% to ~10% at equal steps in v1). Retry episodes (wrong
    attempt(s) with a slip, the RISE feedback, a fresh attempt from the same strategy mix — the data never
    shows a switch) come in both history views: half show the failed attempts in full
    (``meta.history_reasoning: keep``, the RISE MDP), half as chat templates do at inference; follow-ups
    (multi-turn) always hide earlier reasoning (the one-pass setting)."""
    mix = mix or {"single": 0.86, "multi": 0.04, "retry": 0.10}
    strategies = strategies or PRETRAIN_STRATEGIES
    names, sw = list(strategies), list(strategies.values())
    rng, out = random.Random(seed), []
    kinds, weights = list(mix), list(mix.values())
    for p in _train_problems(rng):
        if len(out) >= n:
            break
        kind = rng.choices(kinds, weights=weights)[0]
        pick = rng.choices(names, weights=sw)[0]
        if kind == "single":
            out.append({"messages": single_turn(p, rng, pick)})
        elif kind == "multi":
            out.append({"messages": multi_turn(p, rng, rng.randint(2, 4), strategy=pick)})
        else:
            msgs = retry_episode(p, rng, wrong_attempts=rng.choice([1, 1, 2]), strategies=strategies)
            keep = rng.random() < 0.5
            out.append({"messages": msgs, "meta": {"history_reasoning": "keep" if keep else "strip"}})
    return out


# ----------------------------------------------------------------------------------------------------------
# the shipped weights
# ----------------------------------------------------------------------------------------------------------

MODEL_CONFIG = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=6, head_dim=32, max_position_embeddings=2048)
WEIGHTS = Path(__file__).parent / "weights" / "testbed"


def weights_dir() -> Path:
    """The testbed model directory: ``$PONDER_TESTBED`` if set (a rebuilt model), else the weights shipped in
    the package, checked against the SHA-256 recorded when they were built (`ponder testbed build --ship`)."""
    override = os.environ.get("PONDER_TESTBED")
    if override:
        path = Path(override)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"PONDER_TESTBED={override}: no model there (config.json missing); build one "
                                    "with `ponder testbed build --out DIR`")
        return path
    info = WEIGHTS / "testbed.json"
    if not info.exists():
        raise FileNotFoundError(f"{WEIGHTS}: the shipped testbed weights are missing; reinstall ponder or build "
                                "them with `ponder testbed build --ship`")
    want = json.loads(info.read_text()).get("sha256")
    got = file_sha256(WEIGHTS / "model.safetensors")
    if want != got:
        raise ValueError(f"{WEIGHTS / 'model.safetensors'}: SHA-256 {got[:12]}… does not match testbed.json "
                         f"({str(want)[:12]}…); the shipped weights were changed or damaged")
    return WEIGHTS


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
