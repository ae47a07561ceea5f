"""reasoning-gym scores without running model output or dataset text in the ponder process.

Some of reasoning-gym's `score_answer`s evaluate text (audited for reasoning-gym 0.1.25): ``eval`` of the
model's answer (n_queens, spiral_matrix, binary_matrix, string_insertion), sympy's ``parse_expr`` — an
``eval`` with every builtin in reach — of the answer (simple/intermediate_integration,
polynomial_multiplication, puzzle24, countdown), or ``eval``/``parse_expr`` of entry fields a crafted dataset
controls (bitwise_arithmetic, number_sorting, the integrations, polynomial_multiplication); ``composite``
delegates to them. Scoring such a task goes through two layers:

1. **Parse-only guards** (`guard`): the scorer runs only on an answer (and entry) that is the exact gold, a
   Python literal (`ast.literal_eval`, which cannot run code; ``eval`` of a literal gives the same value) or an
   expression over the task's own symbols with small literal exponents; anything else gets the scorer's own
   failure score. Scores are unchanged wherever the guard lets an answer through; only non-literal Python
   answers lose their 0.1/0.5 partial credit, and ``Integral(...)`` (which scored 1.0 on every integration
   item, a reward hack) is refused.
2. **A fork-server sandbox** (`ponder/rg_server.py`): the scorer runs in a fresh ``fork()`` per call of a
   separate isolated interpreter, as ``nobody`` when started as root, with resource limits, an audit hook that
   refuses processes, sockets and writes, and a wall-clock time limit (SIGKILL). ~10 ms a call
   (bench/rg_sandbox.py); a persistent worker would cost ~0.1 ms but one hostile answer could rewrite the
   scorers for every later call.

Every other task's scorer never evaluates text and runs in-process (microseconds). With any reasoning-gym
version other than the audited one, every task goes to the sandbox. Answers longer than `MAX_ANSWER`
characters score 0 without reaching a scorer.
"""

from __future__ import annotations

import ast
import atexit
import importlib.metadata
import json
import os
import pickle
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

AUDITED_VERSION = "0.1.25"
#: Tasks whose scorer can evaluate the answer or the entry (reasoning-gym 0.1.25; docs/errors.md).
EVALUATING = frozenset({
    "n_queens", "spiral_matrix", "binary_matrix", "string_insertion", "simple_integration",
    "intermediate_integration", "polynomial_multiplication", "puzzle24", "countdown", "bitwise_arithmetic",
    "number_sorting", "composite"})
MAX_ANSWER = 10_000
TIMEOUT = 5.0            # seconds of wall clock per sandboxed score
MEMORY = 512 << 20       # bytes of address space a sandboxed score may add
SERVER = Path(__file__).with_name("rg_server.py")


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("reasoning_gym")
    except importlib.metadata.PackageNotFoundError:
        return None


def sandboxed(task: str) -> bool:
    """Does `task` score in the sandbox (its scorer may evaluate text, or reasoning-gym is not the audited one)?"""
    return task in EVALUATING or installed_version() != AUDITED_VERSION


# ----------------------------------------------------------------------------------------------------------
# layer 1: parse-only guards
# ----------------------------------------------------------------------------------------------------------

_ARITH = re.compile(r"[\d\s+\-*/().]{1,200}")
#: ``**`` followed by a literal exponent of at most two digits (or a small literal fraction), not chained.
_SMALL_POW = re.compile(r"\*\*\s*(\(\s*-?\d{1,2}(\s*/\s*\d{1,2})?\s*\)|\d{1,2})(?!\s*\*\*)")
_FUNCS = frozenset({"sin", "cos", "tan", "exp", "log", "sqrt", "asin", "acos", "atan", "sinh", "cosh", "tanh",
                    "pi", "E"})
_BITWISE = re.compile(r"[0-9a-fx\s()+\-*<>]{1,2000}")


def is_literal(s: str, cap: int = MAX_ANSWER) -> bool:
    """A Python literal (numbers, strings, lists, tuples, dicts, sets) of at most `cap` characters."""
    if not isinstance(s, str) or len(s) > cap:
        return False
    try:
        ast.literal_eval(s.strip())
    except Exception:  # noqa: BLE001 - SyntaxError, ValueError, MemoryError, RecursionError: not a literal
        return False
    return True


def small_powers(s: str) -> bool:
    return s.count("**") == len(_SMALL_POW.findall(s))


def is_math(s: str, names: set[str], cap: int = 1000) -> bool:
    """An arithmetic expression over `names` (and numbers), with small literal exponents only."""
    if not isinstance(s, str) or len(s) > cap or not re.fullmatch(r"[\w\s+\-*/().,]*", s):
        return False
    if not set(re.findall(r"[A-Za-z_]\w*", s)) <= names or re.search(r"\d[A-Za-z_]|__", s):
        return False
    return small_powers(s)


def guard(task: str, answer: str, entry: dict[str, Any]) -> float | None:
    """The scorer's own failure score if `answer` / `entry` could make `task`'s scorer evaluate anything but
    a literal or a plain expression; None if the scorer may run."""
    md = entry.get("metadata") or {}
    gold = str(entry.get("answer", ""))
    if task in ("spiral_matrix", "binary_matrix", "string_insertion"):
        return None if answer.strip() == gold.strip() or is_literal(answer) else 0.0
    if task == "n_queens":
        return None if answer in (md.get("valid_answers") or ()) or is_literal(answer) else 0.0
    if task in ("puzzle24", "countdown"):
        return None if _ARITH.fullmatch(answer.strip()) and small_powers(answer) else 0.01
    if task in ("simple_integration", "intermediate_integration"):
        names = set(_FUNCS) | {str(md.get("variable", "x")), "C"}
        ok = is_math(answer, names) and is_math(str(md.get("integrand", "")), names - {"C"})
        return None if ok else 0.0
    if task == "polynomial_multiplication":
        names = {str(v) for v in (md.get("variables") or ("x", "y", "z"))}
        return None if is_math(answer, names) and is_math(gold, names) else 0.0
    if task == "bitwise_arithmetic":  # the answer goes through int(s, 0); the entry's problem is evaluated
        problem = str(md.get("problem", ""))
        return None if _BITWISE.fullmatch(problem) and "**" not in problem else 0.0
    if task == "number_sorting":       # the gold is evaluated when it is not JSON
        return None if is_literal(gold.replace("'", '"')) else 0.0
    return None


# ----------------------------------------------------------------------------------------------------------
# layer 2: the fork-server
# ----------------------------------------------------------------------------------------------------------


class SandboxError(OSError):
    """The sandbox process could not be started or stopped answering (an environment problem, not bad input)."""


class Sandbox:
    """A client of one `rg_server.py` process (started on first use, restarted if it dies; thread-safe)."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._lock = threading.Lock()
        self.calls = self.killed = 0

    def _start(self) -> None:
        self.close()
        self._dir = tempfile.mkdtemp(prefix="ponder-rg-")
        os.chmod(self._dir, 0o755)
        env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}
        with open(os.path.join(self._dir, "stderr"), "wb") as err:
            self._proc = subprocess.Popen([sys.executable, "-I", str(SERVER)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=err, cwd=self._dir, env=env)
        line = self._readline(120.0)
        if not line.startswith(b'{"ready"'):
            with open(os.path.join(self._dir, "stderr"), "rb") as err:
                tail = " ".join(err.read().decode(errors="replace").split()[-30:])
            self.close()
            raise SandboxError(f"the reasoning-gym scoring sandbox ({SERVER.name}, POSIX only) did not start: {tail}")

    def _readline(self, timeout: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        return self._proc.stdout.readline() if ready else b""

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                if f is not None:
                    f.close()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def score(self, task: str, answer: str, entry: dict[str, Any], timeout: float = TIMEOUT,
              memory: int = MEMORY) -> dict[str, Any]:
        """``{"score": x}``, ``{"error": name}`` (the scorer raised) or ``{"killed": why}`` (time, memory)."""
        req = pickle.dumps({"task": task, "answer": answer, "entry": entry, "timeout": timeout, "memory": memory})
        with self._lock:
            for _attempt in (0, 1):
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                assert self._proc is not None and self._proc.stdin is not None
                try:
                    self._proc.stdin.write(struct.pack(">I", len(req)) + req)
                    self._proc.stdin.flush()
                    line = self._readline(timeout + 30.0)
                except (BrokenPipeError, OSError):
                    line = b""
                if line:
                    break
                self.close()  # dead or hung: start a fresh server and try once more
            else:
                raise SandboxError(f"the reasoning-gym scoring sandbox failed on task {task!r}")
            self.calls += 1
        out = json.loads(line)
        if "killed" in out:
            self.killed += 1
        return out


_SANDBOX = Sandbox()
atexit.register(_SANDBOX.close)


def sandbox() -> Sandbox:
    return _SANDBOX


def score(task: str, answer: str, entry: dict[str, Any], fallback: Callable[[], float],
          timeout: float = TIMEOUT) -> float:
    """reasoning-gym's score of `answer` for `entry`, in [0, 1]. `fallback()` is used when the scorer raises
    (an entry without the metadata it needs: external data keep only the gold answer, `ponder.data`)."""
    if len(answer) > MAX_ANSWER:
        return 0.0
    if not sandboxed(task):
        from reasoning_gym.factory import get_score_answer_fn
        try:
            return _clip(get_score_answer_fn(task)(answer, entry))
        except Exception:  # noqa: BLE001 - the scorer's failure on an entry it cannot read
            return fallback()
    refused = guard(task, answer, entry)
    if refused is not None:
        return refused
    out = _SANDBOX.score(task, answer, entry, timeout=timeout)
    if "score" in out:
        return _clip(out["score"])
    return 0.0 if "killed" in out else fallback()


def _clip(x: Any) -> float:
    x = float(x)
    return min(max(x, 0.0), 1.0) if x == x else 0.0
