"""One-pass vs N-pass on multi-turn reasoning conversations, side by side in one run.

For each model and conversation depth: tokens forwarded, wall time of forward+backward of the summed loss over
every turn's trained tokens (one-pass: one sequence; N-pass: one sample per turn), their ratio, the ideal ratio
(N-pass tokens / one-pass tokens), peak memory (process RSS, sampled) and the largest per-token log-prob
difference between the two. Turn shape: user ~ answer length, reasoning ~ 2x answer.

    python bench/onepass.py [--models testbed smollm2-135m] [--depths 2 4 8 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time

import psutil

WORDS = ["the", "sum", "of", "twelve", "and", "seven", "is", "nineteen", "so", "we", "carry", "one", "then",
         "add", "it", "to", "the", "next", "digit", "which", "gives", "three"]


def text(rng, n_tokens, tok):
    """About n_tokens tokens of text under `tok`."""
    out = ""
    while len(tok(out, add_special_tokens=False)["input_ids"]) < n_tokens:
        out += ("" if not out else " ") + rng.choice(WORDS)
    return out


def conversation(tok, depth, answer_tokens, seed=0):
    rng = random.Random(seed)
    msgs = []
    for _ in range(depth):
        msgs.append({"role": "user", "content": text(rng, answer_tokens, tok)})
        msgs.append({"role": "assistant", "reasoning": text(rng, 2 * answer_tokens, tok),
                     "content": text(rng, answer_tokens, tok)})
    return msgs


class PeakRSS:
    """Samples the process RSS every 2 ms while active; .peak is the largest increase over the RSS at entry,
    over every time it was entered. Reliable because main() runs with a fixed malloc mmap threshold, so large
    freed blocks go back to the OS instead of staying in the heap (which would hide later peaks)."""

    def __init__(self):
        self.peak = 0

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *a):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for spec in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == spec]
        d = [r["depth"] for r in rows]
        axes[0].plot(d, [r["npass_s"] for r in rows], "o--", label=f"{spec} N-pass")
        axes[0].plot(d, [r["onepass_s"] for r in rows], "o-", label=f"{spec} one-pass")
        axes[1].plot(d, [r["speedup"] for r in rows], "o-", label=f"{spec} measured")
        axes[1].plot(d, [r["ideal"] for r in rows], "k:", alpha=0.5)
    axes[1].plot([], [], "k:", label="ideal (token ratio)")
    axes[0].set(xlabel="conversation depth (assistant turns)", ylabel="forward+backward seconds / conversation",
                yscale="log", title="time per conversation")
    axes[1].set(xlabel="conversation depth (assistant turns)", ylabel="N-pass time / one-pass time",
                title="speedup of one-pass")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["testbed", "smollm2-135m"])
    ap.add_argument("--depths", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plot", default="bench/onepass.png")
    args = ap.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see PeakRSS; must be set before the process starts
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    from ponder import models
    from ponder.recipes.onepass import compare
    results = []
    for spec in args.models:
        model, tok = models.load(spec)
        model.train()
        for depth in args.depths:
            msgs = conversation(tok, depth, args.answer_tokens, seed=depth)
            mem = {"onepass": PeakRSS(), "npass": PeakRSS()}
            row = compare(model, tok, msgs, args.repeats, on_step=mem.__getitem__)
            dense = compare(model, tok, msgs, 1, attention="dense")  # the dense-mask path, for comparison
            base = psutil.Process().memory_info().rss
            m1, m2 = mem["onepass"].peak, mem["npass"].peak
            row.update(model=spec, mem_onepass=m1, mem_npass=m2, mem_ratio_total=(base + m1) / (base + m2),
                       dense_speedup=dense["npass_s"] / dense["onepass_s"])
            results.append(row)
            print(f"{spec:13s} depth {depth:2d}: tokens {row['onepass_tokens']:5d} vs {row['npass_tokens']:6d} "
                  f"(ideal {row['ideal']:.2f}x)  time {row['onepass_s']:7.3f}s vs {row['npass_s']:7.3f}s "
                  f"(speedup {row['speedup']:.2f}x, {row['speedup'] / row['ideal']:.2f} of ideal; dense mask "
                  f"{row['dense_speedup']:.2f}x)  peak extra RSS {m1 / 2**20:7.1f} vs {m2 / 2**20:7.1f} MiB "
                  f"(total x{row['mem_ratio_total']:.2f})  max |dlogp| {row['maxdiff']:.1e}", flush=True)
        del model
    plot(results, args.plot)
    for r in results:
        key = f"{r['model']}_d{r['depth']}"
        print(f"RATIO onepass_speedup_{key}={r['speedup']:.3f}")
        print(f"RATIO onepass_ideal_{key}={r['ideal']:.3f}")
        print(f"RATIO onepass_of_ideal_{key}={r['speedup'] / r['ideal']:.3f}")
        print(f"RATIO onepass_mem_total_{key}={r['mem_ratio_total']:.3f}")
        print(f"RATIO onepass_dense_speedup_{key}={r['dense_speedup']:.3f}")


if __name__ == "__main__":
    main()
