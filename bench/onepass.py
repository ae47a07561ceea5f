"""One-pass vs N-pass on multi-turn reasoning conversations, side by side in one run.

For each model and conversation depth: tokens forwarded, wall time of forward+backward of the summed loss over
every turn's trained tokens (one-pass: one sequence; N-pass: one sample per turn), their ratio, the ideal ratio
(N-pass tokens / one-pass tokens), peak memory (process RSS, sampled) and the largest per-token log-prob
difference between the two. Turn shape: user ~ answer length, reasoning ~ 2x answer.

    python bench/onepass.py [--models testbed smollm2-135m] [--depths 2 4 8 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import psutil
import torch

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
    """Samples the process RSS every 2 ms while active; .peak is the increase over the start."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak, self.stop = 0, False
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


def prepare_onepass(tok, msgs):
    """What a trainer prepares once per dataset (not timed): the layout, collated."""
    from ponder import masks
    return masks.collate([masks.onepass_layout(tok, msgs)], tok.pad_token_id)


def prepare_npass(tok, msgs):
    from ponder.chat import render
    out = []
    for k in range(1, len(msgs), 2):
        segs = render(tok, msgs[:k + 1])
        out.append((torch.tensor([segs.ids]), torch.tensor([segs.trained_mask([k])])))
    return out


def run_onepass(model, batch, attention="auto"):
    """One training step's compute: forward over the one-pass layout (the sparse plan or the mask is built
    per step, as in the trainer), backward of the summed log-probs."""
    from ponder.logprobs import logprobs_of
    from ponder.trainers.onepass import onepass_logits
    lp = logprobs_of(onepass_logits(model, batch, attention), batch.input_ids[batch.pairs[0], batch.pairs[2]])
    lp.sum().backward()
    return [lp[batch.pair_message == m].detach() for m in sorted(set(batch.pair_message.tolist()))]


def run_npass(model, samples):
    """N-pass: one sample per turn (history reasoning stripped), each forward+backward on its own (no padding;
    activations freed before the next sample, as a trainer with batch size 1 would)."""
    from ponder.logprobs import token_logprobs
    out = []
    for ids, target in samples:
        lp = token_logprobs(model, ids, target_mask=target)
        lp.sum().backward()
        out.append(lp.detach())
    return out


def tokens(tok, msgs):
    from ponder import masks
    from ponder.chat import render
    one = len(masks.onepass_layout(tok, msgs))
    n = sum(len(render(tok, msgs[:2 * k]).ids) for k in range(1, len(msgs) // 2 + 1))
    return one, n


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
    from ponder import models
    results = []
    for spec in args.models:
        model, tok = models.load(spec)
        model.train()
        for depth in args.depths:
            msgs = conversation(tok, depth, args.answer_tokens, seed=depth)
            n_one, n_n = tokens(tok, msgs)
            batch, samples = prepare_onepass(tok, msgs), prepare_npass(tok, msgs)
            t1, t2, t3, m1, m2, diff = [], [], [], 0, 0, 0.0
            for _ in range(args.repeats):  # interleaved so both see the same machine load
                model.zero_grad(set_to_none=True)
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    a = run_onepass(model, batch)
                    t1.append(time.perf_counter() - t)
                m1 = max(m1, mem.peak)
                model.zero_grad(set_to_none=True)
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    b = run_npass(model, samples)
                    t2.append(time.perf_counter() - t)
                m2 = max(m2, mem.peak)
                diff = max(diff, max((x - y).abs().max().item() for x, y in zip(a, b)))
                model.zero_grad(set_to_none=True)
                t = time.perf_counter()
                run_onepass(model, batch, "dense")  # the dense-mask path, for comparison
                t3.append(time.perf_counter() - t)
            base = psutil.Process().memory_info().rss
            one_s, n_s, dense_s = statistics.median(t1), statistics.median(t2), statistics.median(t3)
            row = dict(model=spec, depth=depth, onepass_tokens=n_one, npass_tokens=n_n, ideal=n_n / n_one,
                       onepass_s=one_s, npass_s=n_s, speedup=n_s / one_s, mem_onepass=m1, mem_npass=m2,
                       mem_ratio_total=(base + m1) / (base + m2), mem_ratio_act=m1 / max(m2, 1), maxdiff=diff,
                       dense_speedup=n_s / dense_s)
            results.append(row)
            print(f"{spec:13s} depth {depth:2d}: tokens {n_one:5d} vs {n_n:6d} (ideal {row['ideal']:.2f}x)  "
                  f"time {one_s:7.3f}s vs {n_s:7.3f}s (speedup {row['speedup']:.2f}x, "
                  f"{row['speedup'] / row['ideal']:.2f} of ideal; dense mask {row['dense_speedup']:.2f}x)  peak extra RSS {m1 / 2**20:7.1f} vs "
                  f"{m2 / 2**20:7.1f} MiB (total x{row['mem_ratio_total']:.2f})  max |dlogp| {diff:.1e}",
                  flush=True)
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
