"""What the reasoning-gym scoring sandbox costs (ponder.rgscore), side by side in one run, repeats interleaved.

Per call, on the same answers: reasoning-gym's scorer in-process (what ponder does for tasks whose scorer never
evaluates text), the fork-server (`ponder/rg_server.py`: a fresh fork per call; what ponder uses for the tasks
that do), and a persistent worker (the same server's imports, scoring in the server process itself: cheaper, but
one hostile answer could rewrite the scorers for every later call). Also the server's start-up time. Prints
`RATIO name=value` lines (milliseconds, and fork-server / persistent).

    python bench/rg_sandbox.py [--calls 100] [--repeats 3] [--task spiral_matrix]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from ponder import data, rgscore

# a persistent worker for comparison only: same interpreter flags and imports, no fork per call
PERSISTENT = """
import json, sys
from reasoning_gym.factory import get_score_answer_fn
print("ready", flush=True)
fns = {}
for line in sys.stdin:
    req = json.loads(line)
    fn = fns.setdefault(req["task"], get_score_answer_fn(req["task"]))
    print(json.dumps({"score": float(fn(req["answer"], req["entry"]))}), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--task", default="spiral_matrix")
    a = ap.parse_args()
    p = data.load_problems(f"rg:{a.task}", n=1)[0]
    entry = json.loads(json.dumps(p.meta["entry"], default=list))
    answers = [p.answer, "[1, 2, 3]", "not an answer"]
    from reasoning_gym.factory import get_score_answer_fn
    fn = get_score_answer_fn(a.task)

    t = time.perf_counter()
    sandbox = rgscore.Sandbox()
    sandbox.score(a.task, p.answer, entry)
    startup = time.perf_counter() - t
    worker = subprocess.Popen([sys.executable, "-I", "-c", PERSISTENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    worker.stdout.readline()

    def persistent(ans):
        worker.stdin.write(json.dumps({"task": a.task, "answer": ans, "entry": entry}) + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())["score"]

    runs = {"in_process": lambda ans: fn(ans, entry), "fork_server": lambda ans: sandbox.score(a.task, ans, entry)["score"],
            "persistent": persistent}
    times = {k: [] for k in runs}
    same = True
    for _ in range(a.repeats):
        for name, call in runs.items():
            t = time.perf_counter()
            got = [call(answers[i % 3]) for i in range(a.calls)]
            times[name].append((time.perf_counter() - t) / a.calls * 1e3)
            same &= got == [fn(answers[i % 3], entry) for i in range(a.calls)]
    worker.stdin.close()
    worker.wait()
    sandbox.close()
    ms = {k: statistics.median(v) for k, v in times.items()}
    print(f"task {a.task}: {a.calls} calls x {a.repeats} repeats, medians; scores identical to in-process: {same}")
    for k, v in ms.items():
        print(f"RATIO rg_{k}_ms={v:.4f}")
    print(f"RATIO rg_fork_server_startup_s={startup:.2f}")
    print(f"RATIO rg_fork_over_persistent={ms['fork_server'] / ms['persistent']:.1f}")


if __name__ == "__main__":
    main()
