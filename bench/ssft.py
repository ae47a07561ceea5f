"""SSFT matching cost: all N·M prefixes in one forward vs N·M separate forwards, side by side in one run.

For each model: the (N, M) cost matrix of `ponder.ssft.costs_from_ids` for a batch of questions, computed
- ``separate``: one forward per (tag, trace) prefix, N·M per question (the naive implementation);
- ``padded``: all N·M prefixes of a question as rows of one right-padded batch (one forward per question);
- ``packed``: ponder's packed layout, N·M sequences back to back in one row (block-diagonal attention);
- ``shared``: ponder's default, the prompt once and N·M branches under a custom mask;
the packed/shared variants run every question of the batch in ONE forward (rows of at most --row-tokens
tokens: attention cost ~ tokens x row length). Interleaved repeats, median wall
time, and the largest difference from the separate-forward costs (correctness in the same run).

    OMP_NUM_THREADS=1 python bench/ssft.py [--models testbed smollm2-135m] [--questions 8] [--L 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ponder import models, ssft, testbed


@torch.no_grad()
def separate(model, items, L):
    out = []
    for prompt, tags, traces in items:
        c = torch.empty(len(tags), len(traces), dtype=torch.float64)
        for i, tag in enumerate(tags):
            for j, tr in enumerate(traces):
                pre = tr[:L]
                ids = torch.tensor([prompt + list(tag) + pre])
                lp = torch.log_softmax(model(ids).logits[0, -len(pre) - 1:-1].float(), -1)
                c[i, j] = -lp[torch.arange(len(pre)), torch.tensor(pre)].mean()
        out.append(c)
    return out


@torch.no_grad()
def padded(model, items, L, pad):
    out = []
    for prompt, tags, traces in items:
        seqs = [(prompt + list(tag) + tr[:L], len(tr[:L])) for tag in tags for tr in traces]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), pad)
        att = torch.zeros_like(ids)
        for r, (s, _) in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            att[r, :len(s)] = 1
        logp = torch.log_softmax(model(ids, attention_mask=att).logits.float(), -1)
        c = torch.empty(len(seqs), dtype=torch.float64)
        for r, (s, n) in enumerate(seqs):
            pos = torch.arange(len(s) - n - 1, len(s) - 1)
            c[r] = -logp[r, pos, torch.tensor(s[-n:])].mean()
        out.append(c.view(len(tags), len(traces)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["testbed"])
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--num-tags", type=int, default=6)
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--row-tokens", type=int, nargs="+", default=[256, 1024],
                    help="row lengths to try for the packed / shared layouts")
    a = ap.parse_args()
    torch.manual_seed(0)
    tags = ssft.forking_tags(a.num_tags)
    for spec in a.models:
        model, tok = models.load(spec, add_tokens=tags, token_init="mean+noise")
        tag_ids = ssft.tag_token_ids(tok, tags)
        items = []
        for ts in testbed.trace_sets(a.questions, seed=3):
            enc = ssft.encode(tok, ts["question"], ts["traces"])
            items.append((enc.prompt, tag_ids, enc.traces))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        M = len(items[0][2])
        runs = {"separate": (separate, (model, items, a.L)), "padded": (padded, (model, items, a.L, pad)),
                **{f"{lay}/{rt}": (ssft.costs_from_ids, (model, items, a.L, lay, pad, rt))
                   for lay in ("packed", "shared") for rt in a.row_tokens}}
        times = {k: [] for k in runs}
        results = {}
        for f, args in runs.values():  # warm-up
            f(*args)
        for _ in range(a.repeats):
            for k, (f, args) in runs.items():
                t = time.perf_counter()
                results[k] = f(*args)
                times[k].append(time.perf_counter() - t)
        ref = results["separate"]
        n_tok = {"separate": sum(a.num_tags * sum(len(p) + 1 + min(len(t), a.L) for t in tr) for p, _, tr in items)}
        n_tok["padded"] = n_tok["separate"]
        shared_tok = sum(len(p) + a.num_tags * sum(1 + min(len(t), a.L) for t in tr) for p, _, tr in items)
        for k in runs:
            if k.startswith("packed"):
                n_tok[k] = n_tok["separate"]
            elif k.startswith("shared"):
                n_tok[k] = shared_tok
        print(f"\n{spec}: {a.questions} questions, N={a.num_tags} tags x M={M} traces, L={a.L} "
              f"(median of {a.repeats}, fp32, {torch.get_num_threads()} thread(s))")
        print(f"{'method':<12}{'forwards':>8}{'tokens':>9}{'ms':>10}{'speed-up':>10}{'max |dcost|':>14}")
        base = statistics.median(times["separate"])
        fwd = {"separate": a.questions * a.num_tags * M, "padded": a.questions}
        for k in runs:
            med = statistics.median(times[k])
            err = max((x - y).abs().max().item() for x, y in zip(results[k], ref))
            print(f"{k:<12}{fwd.get(k, 1):>8}{n_tok[k]:>9}{med * 1e3:>10.1f}{base / med:>10.2f}{err:>14.2e}")
        name = spec.replace("-", "_")
        for lay in ("packed", "shared"):
            best = min((statistics.median(times[k]), k) for k in runs if k.startswith(lay))
            print(f"RATIO ssft_matching_{lay}_{name}={base / best[0]:.2f}  # best row_tokens: {best[1]}")


if __name__ == "__main__":
    main()
