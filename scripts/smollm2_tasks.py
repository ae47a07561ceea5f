"""Which reasoning-gym tasks does SmolLM2-135M-Instruct partly solve? Greedy accuracy and the mean accuracy of
2 samples at T = 1 on N held-out problems of each candidate task, with a prompt that asks for "The answer is".
Used to choose the SmolLM2 proving-ground tasks (docs/results/smollm2.md): tasks in the 15-60% band, where
training can move the number both ways.

    python scripts/smollm2_tasks.py [--n 48] [--tasks "rg:gcd:max_value=20;rg:letter_counting"]

Prints one row per task and writes runs/smollm2-tasks/tasks.json (a re-run skips the tasks already there) and
each task's records (question, answer, greedy output) next to it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ponder.engine import data, models, runtime
from ponder.methods import metrics

# reasoning-gym tasks at an easy setting (rg:<task>:option=value,...): at their default difficulty every task
# tried was 0-1% (basic_arithmetic, leg_counting: 48 problems each)
CANDIDATES = [
    "rg:chain_sum:min_terms=2,max_terms=2,max_digits=1",
    "rg:chain_sum:min_terms=2,max_terms=2,max_digits=2",
    "rg:basic_arithmetic:min_terms=2,max_terms=2,max_digits=1,allow_parentheses=false,allow_negation=false",
    "rg:leg_counting:min_animals=1,max_animals=2,max_instances=3",
    "rg:family_relationships",
    "rg:gcd:max_value=20",
    "rg:letter_counting:min_words=3,max_words=5",
    "rg:needle_haystack:min_num_statements=5,max_num_statements=10",
    "rg:number_sorting:min_numbers=3,max_numbers=3,max_decimals=0,min_value=0,max_value=99",
    "testbed",
]
PROMPT = "{question} Let's think step by step, then finish with \"The answer is <answer>.\""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tasks", default=";".join(CANDIDATES), help="dataset specs separated by ;")
    ap.add_argument("--out", default="runs/smollm2-tasks/tasks.json")
    a = ap.parse_args()
    print(runtime.describe(runtime.machine()))
    model, tok = models.load("smollm2-135m")
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else {}
    for task in a.tasks.split(";"):
        if task in rows:
            continue
        problems = data.load_problems(task, n=a.n, split="test")
        t = time.perf_counter()
        r = metrics.evaluate(model, tok, problems, samples=a.samples, max_new_tokens=a.max_new_tokens,
                             batch_size=64, prompt=PROMPT)
        out.parent.mkdir(parents=True, exist_ok=True)
        data.write_jsonl(out.parent / f"records-{len(rows)}.jsonl", [{"task": task, **x} for x in r["records"]])
        rows[task] = {"greedy": r["greedy_accuracy"], "sample": r["sample_accuracy"],
                      "n": len(problems), "seconds": time.perf_counter() - t}
        print(f"{task:60s} greedy {100 * rows[task]['greedy']:5.1f}%  sample {100 * rows[task]['sample']:5.1f}%"
              f"  ({rows[task]['seconds']:.0f} s)", flush=True)
        out.write_text(json.dumps(rows, indent=1))  # after every task: an interrupted run keeps what it measured


if __name__ == "__main__":
    main()
