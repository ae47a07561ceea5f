"""Answer extraction and checking.

`score(problem, text) -> float` (1.0 = correct) dispatches on the problem's verifier
(``problem.meta["verifier"]``, else by task): ``math`` (math-verify, the default), ``gsm8k`` (``#### N``, then
``\\boxed{}``, "The answer is", the last number), ``boxed`` (last ``\\boxed{}``), ``answer_is`` (LaTRO's
extractor), ``arc`` (LaTRO's official ARC check, `arc_answer`), ``text`` (a free-text answer: the final line,
normalised, equals the reference sentence), ``rg:<task>`` (reasoning-gym's own `score_answer`; it gives partial
credit, so only 1.0 counts as correct in `is_correct`; scorers that evaluate text never run in this process:
`ponder.rgscore`). `extract(problem, text)` returns the canonical answer string used for majority votes.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation

from ponder.engine.data import VERIFIERS, Problem, as_problem
from ponder.methods import rgscore

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def canonical_number(s: str | None) -> str | None:
    """'1,234' -> '1234', '5.0' -> '5', '-0' -> '0', '$7.' -> '7'; None if `s` is not a number."""
    if s is None:
        return None
    t = s.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    return canonical_number(nums[-1]) if nums else None


def first_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    return canonical_number(nums[0]) if nums else None


def gsm8k_hash(text: str) -> str | None:
    """The number after the last ``####``."""
    if "####" not in text:
        return None
    return first_number(text.rsplit("####", 1)[1])


def boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed) or ``\\boxed N``; None if absent/unclosed."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.index("box", i) + 3
    if j < len(text) and text[j] == "e":  # \boxed
        j += 2
    if j < len(text) and text[j] == " ":
        m = re.match(r" ([^\s$]+)", text[j:])
        return m.group(1) if m else None
    if j >= len(text) or text[j] != "{":
        return None
    depth, k = 0, j
    while k < len(text):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k]
        k += 1
    return None


_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def answer_is(text: str, numeric: bool = True) -> str | None:
    """LaTRO's extractor: the first number after the last "The answer is", else the last number in the text.
    numeric=False: the text after the last "The answer is" up to the end of its line, without the final '.'
    (for non-numeric answers); None if the phrase is absent."""
    hits = list(_ANSWER_IS.finditer(text))
    if numeric:
        if hits:
            n = first_number(text[hits[-1].end():])
            if n is not None:
                return n
        return last_number(text)
    if not hits:
        return None
    rest = text[hits[-1].end():].lstrip(" :").split("\n", 1)[0].strip()
    return rest[:-1].strip() if rest.endswith(".") else rest


def arc_answer(text: str) -> str:
    """LaTRO's official ARC extraction (`utils/eval_utils.py`): the first '.'-sentence containing "the answer
    is", lower-cased, after the phrase, stripped of ``:'[]()".``; without the phrase, the last sentence. A
    prediction is correct when the gold option text (lower-cased, final '.' removed) is a SUBSTRING of it."""
    delim = "the answer is"
    if delim in text.lower():
        for sent in text.split("."):
            if delim in sent.lower():
                return sent.lower().split(delim)[-1].lstrip(":").strip(" '[]()\".").rstrip(".")
    return text.lower().strip(" '[]()\".").rstrip(".").split(".")[-1]


def free_text(text: str) -> str:
    """A free-text answer for comparison: the last non-empty line after any ``</think>``, lower-cased, spaces
    collapsed, surrounding quotes and final punctuation removed."""
    body = text.rsplit("</think>", 1)[-1]
    lines = [ln for ln in body.splitlines() if ln.strip()]
    return normalize_text(lines[-1] if lines else "")


def normalize_text(s: str) -> str:
    return " ".join(s.lower().split()).strip(" '\"").rstrip(".!?").strip()


def answer_tag(text: str) -> str | None:
    found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return found[-1].strip() if found else None


# ----------------------------------------------------------------------------------------------------------
# math-verify
# ----------------------------------------------------------------------------------------------------------


def math_equal(gold: str, text: str) -> bool:
    """math-verify: is the answer in `text` equal to `gold`? Safe off the main thread (its signal-based
    time-outs only work on the main thread, so they are switched off there)."""
    from math_verify import parse, verify
    main = threading.current_thread() is threading.main_thread()
    kw_parse = {} if main else {"parsing_timeout": None}
    kw_verify = {} if main else {"timeout_seconds": None}
    g = parse(gold if "$" in gold or "\\" in gold else f"${gold}$", **kw_parse)
    a = parse(text, **kw_parse)
    if not g or not a:
        return False
    return bool(verify(g, a, **kw_verify))


# ----------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------


def verifier_of(problem: Problem | dict) -> str:
    meta = as_problem(problem).meta
    if meta.get("verifier"):
        return meta["verifier"]
    task = meta.get("task", "")
    if task == "testbed":
        return "answer_is"
    if task.startswith("rg:"):
        return task
    return "math"


def _numeric_or_text(pred: str | None, gold: str) -> float:
    if pred is None:
        return 0.0
    g, p = canonical_number(gold), canonical_number(pred)
    if g is not None and p is not None:
        return float(Decimal(g) == Decimal(p))
    return float(pred.strip().lower() == gold.strip().lower())


def gsm8k_extract(text: str) -> str | None:
    for f in (gsm8k_hash, lambda t: canonical_number(boxed(t)), lambda t: answer_is(t)):
        v = f(text)
        if v is not None:
            return v
    return None


def _rg_extract(text: str, gold: str) -> str | None:
    tag = answer_tag(text)
    if tag is not None:
        return tag
    numeric = canonical_number(gold) is not None
    for v in (answer_is(text, numeric=numeric), boxed(text)):
        if v is not None:
            return v
    return last_number(text) if numeric else None


def extract(problem: Problem | dict, text: str) -> str | None:
    """The answer in `text`, in the canonical form majority votes compare."""
    problem = as_problem(problem)
    kind, gold = verifier_of(problem), problem.answer
    if kind in ("answer_is", "testbed"):
        return answer_is(text, numeric=canonical_number(gold) is not None)
    if kind == "gsm8k":
        return gsm8k_extract(text)
    if kind == "arc":
        return arc_answer(text) if text else None
    if kind == "text":
        return free_text(text) or None
    if kind == "boxed":
        b = boxed(text)
        return canonical_number(b) or (b.strip() if b is not None else None)
    if kind.startswith("rg:"):
        v = _rg_extract(text, gold)
        return canonical_number(v) or v if v is not None else None
    # math: prefer \boxed, then "The answer is", then the last number
    b = boxed(text)
    if b is not None:
        return canonical_number(b) or b.strip()
    return answer_is(text, numeric=True)


def score(problem: Problem | dict, text: str) -> float:
    """Reward in [0, 1] for `text` as an answer to `problem` (1.0 = correct)."""
    problem = as_problem(problem)
    kind, gold = verifier_of(problem), problem.answer
    if kind.startswith("rg:"):
        pred = _rg_extract(text, gold)
        if pred is None:
            return 0.0
        entry = problem.meta.get("entry")
        if entry is None:  # a record from a file: its entry is never trusted (ponder.data), the gold answer is
            return _numeric_or_text(pred, gold)
        # never in this process when the scorer can evaluate text (ponder.rgscore)
        return rgscore.score(kind[3:], pred, entry, fallback=lambda: _numeric_or_text(pred, gold))
    if kind == "math":
        return float(math_equal(gold, text))
    if kind == "arc":
        return float(bool(text) and gold.lower().strip().rstrip(".") in arc_answer(text))
    if kind == "text":
        return float(free_text(text) == normalize_text(gold))
    if kind not in VERIFIERS:
        raise ValueError(f"unknown verifier {kind!r} (expected {', '.join(VERIFIERS)} or rg:<task>)")
    return _numeric_or_text(extract(problem, text), gold)


def is_correct(problem: Problem | dict, text: str) -> bool:
    return score(problem, text) >= 1.0


_RISE_BOX = re.compile(r"boxed{([^}]+)}")
_RISE_GOLD = re.compile(r"####\s*([-+]?\d+(?:\.\d+)?)")
_RISE_MAX_DIGITS = 300  # float(int) overflows near 1e308; the official code raises there, ponder scores -1


def rise_official_answer(text: str) -> int | None:
    """The official RISE GSM8K answer extraction (`environments/gsm8k.py`, docs/methods.md §3.9): the content of
    the LAST match of ``boxed{([^}]+)}`` (no brace balancing; ``\\fbox``, ``\\boxed 72`` and an empty box never
    match), commas removed, converted with Python's `int` (which accepts spaces, a sign, leading zeros and
    digit underscores, and rejects ``72.0``, ``1e2``, ``$72``); None when there is none."""
    found = _RISE_BOX.findall(text)
    if not found:
        return None
    content = found[-1].replace(",", "")
    if len(content) > _RISE_MAX_DIGITS + 50:
        return None
    try:
        n = int(content)
    except ValueError:
        return None
    return n if len(str(abs(n))) <= _RISE_MAX_DIGITS else None


def rise_official_reward(text: str, gold: str) -> int:
    """The official RISE GSM8K reward (arXiv 2407.18219; `GSM8KEnv.evaluate_response` at commit 4a2806e),
    reproduced exactly without its `eval` of the gold solution's ``<<…>>`` annotations (whose result it discards):
    -1 when `text` has no boxed integer (`rise_official_answer`), else +1 if ``float(answer) == float(gold)`` and
    0 otherwise. `gold` is the GSM8K answer field: its number is read after the first ``####`` with the official
    regex, so ``#### 1,000`` reads as 1, as it does officially (docs/methods.md §3.9). A gold without ``#### N``
    raises ValueError (the official code raises too)."""
    answer = rise_official_answer(text)
    if answer is None:
        return -1
    g = _RISE_GOLD.search(gold)
    if g is None:
        raise ValueError(f"RISE official reward: the gold answer field has no '#### N': {gold[-60:]!r}")
    return 1 if float(answer) == float(g.group(1)) else 0
