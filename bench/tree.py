"""The prefix-tree engine (`ponder.tree`) vs separate sequences, side by side in one run.

Cases, per model (segment lengths for scale 1; SmolLM2 runs at 0.5 by default, for memory):
- ``grpo``: a GRPO/RLOO group — one prompt (4x the completion: 256 + 8 x 64 tokens), all completions scored;
- ``latro``: LaTRO, K=8 rationales of one question, each followed by the answer (x 128, z 96, y 16): the
  policy pass (z and y scored, forward+backward) plus the reference pass over [x z] (forward only);
- ``episode_T2/4/8``: multi-turn episodes whose reasoning is hidden from later turns (user 16, reasoning 32,
  answer 16 tokens per turn) vs one sample per turn;
- ``onepass_d16``: a one-pass conversation of depth 16 (bench/onepass.py's shape, the real chat template).

For each: tokens forwarded by the tree and by the separate sequences (their ratio is the ideal speedup), the
median forward+backward seconds of the tree (the path `ponder.tree.choose` picks, and both paths), of the
separate sequences as one padded batch and one at a time (the faster is the baseline), the peak extra RSS of
the tree and of the separate batch, and the largest log-prob difference. Repeats are interleaved, so every
variant sees the same machine load.

    python bench/tree.py [--models testbed smollm2-135m] [--cases ...] [--repeats 3] [--scales testbed=1 ...]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import psutil
import torch
from onepass import PeakRSS, conversation

from ponder import masks, models, tree
from ponder.chat import pad_id
from ponder.tree import Tree


def grpo(rng, vocab, s):
    t = Tree()
    p = t.add(ids(rng, vocab, 256 * s))
    for g in range(8):
        t.add(ids(rng, vocab, 64 * s), p, weight=1.0, group=g)
    return t


def latro(rng, vocab, s, with_y=True):
    t = Tree()
    x = t.add(ids(rng, vocab, 128 * s))
    for k in range(8):
        z = t.add(ids(rng, vocab, 96 * s), x, weight=1.0, group=2 * k)
        if with_y:
            t.add(ids(rng, vocab, 16 * s), z, weight=1.0, group=2 * k + 1)
    return t


def episode(rng, vocab, s, turns):
    t = Tree()
    at = None
    for k in range(turns):
        u = t.add(ids(rng, vocab, 16 * s), at, turn=k)
        r = t.add(ids(rng, vocab, 32 * s), u, weight=1.0, group=k, hidden=True)
        at = t.add(ids(rng, vocab, 16 * s), r, weight=1.0, group=k)
    return t


def ids(rng, vocab, n):
    return [rng.randrange(3, vocab) for _ in range(max(1, round(n)))]


def tree_step(model, packed, attention, ref=None):
    """Forward+backward of the weighted log-likelihood; `ref`: a second packed batch forwarded without grad."""
    lp = tree.logprobs(model, packed, attention)
    (lp * packed.pair_weight.to(lp.dtype)).sum().backward()
    if ref is not None:
        with torch.no_grad():
            tree.logprobs(model, ref, attention)
    return lp.detach()


def separate_rows(model, batch, grad=True):
    ids, att, pairs = batch
    cols, slot = torch.unique(pairs[1], return_inverse=True)
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids, attention_mask=att, use_cache=False, logits_to_keep=cols)
        logits = out.logits[pairs[0], slot].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[pairs[0], pairs[2]][:, None])[:, 0]


def separate_step(model, batches, weights, ref_batches=()):
    """Forward+backward over the separate sequences, batch by batch (one padded batch, or one per sequence)."""
    out = []
    for b, w in zip(batches, weights):
        lp = separate_rows(model, b)
        (lp * w.to(lp.dtype)).sum().backward()
        out.append(lp.detach())
    for b in ref_batches:
        separate_rows(model, b, grad=False)
    return torch.cat(out)


def build(case, tok, vocab, s):
    """(policy tree, reference tree or None)."""
    rng = random.Random(case)
    if case == "grpo":
        return grpo(rng, vocab, s), None
    if case == "latro":
        return latro(rng, vocab, s), latro(random.Random(case), vocab, s, with_y=False)
    if case.startswith("episode_T"):
        return episode(rng, vocab, s, int(case[9:])), None
    if case == "onepass_d16":
        return masks.onepass_tree(tok, conversation(tok, 16, max(1, round(16 * s)), seed=16)), None
    raise ValueError(case)


def measure(model, tok, case, repeats, scale):
    pad = pad_id(tok)
    pol, ref = build(case, tok, model.config.vocab_size, scale)
    packed = tree.pack([tree.flatten(pol)], pad)
    ref_packed = tree.pack([tree.flatten(ref)], pad) if ref is not None else None
    seps = tree.separate(pol)
    ref_seps = tree.separate(ref) if ref is not None else []
    order = [tok_ for sep in seps for tok_ in sep.tokens]
    flat_order = tree.flatten(pol).pair_token
    perm = torch.tensor([order.index(t) for t in flat_order])  # separate order -> tree pair order
    one = [tree.separate_batch(seps, pad)]
    one_w = [torch.tensor([w for sep in seps for w in sep.weights], dtype=torch.float64)]
    each = [tree.separate_batch([sep], pad) for sep in seps]
    each_w = [torch.tensor(sep.weights, dtype=torch.float64) for sep in seps]
    ref_one = [tree.separate_batch(ref_seps, pad)] if ref_seps else []
    ref_each = [tree.separate_batch([sep], pad) for sep in ref_seps]
    auto = tree.choose(model, packed)
    runs = {
        "tree_dense": lambda: tree_step(model, packed, "dense", ref_packed),
        "tree_sparse": lambda: tree_step(model, packed, "sparse", ref_packed),
        "separate_batch": lambda: separate_step(model, one, one_w, ref_one),
        "separate_each": lambda: separate_step(model, each, each_w, ref_each),
    }
    mem = {k: PeakRSS() for k in runs}
    times = {k: [] for k in runs}
    diff = 0.0
    for fn in runs.values():  # warm-up: the first call of a shape pays for allocator growth
        model.zero_grad(set_to_none=True)
        fn()
    for _ in range(repeats):
        out = {}
        for k, fn in runs.items():
            model.zero_grad(set_to_none=True)
            with mem[k]:
                t = time.perf_counter()
                out[k] = fn()
                times[k].append(time.perf_counter() - t)
        for k in ("tree_dense", "tree_sparse"):
            diff = max(diff, (out[k] - out["separate_batch"][perm]).abs().max().item())
    model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    tree_tokens = packed.tokens + (ref_packed.tokens if ref_packed is not None else 0)
    sep_tokens = sum(len(x.ids) for x in seps + ref_seps)
    base_s = min(med["separate_batch"], med["separate_each"])
    tree_s = med[f"tree_{auto}"]
    rss = psutil.Process().memory_info().rss
    return {"case": case, "auto": auto, "tree_tokens": tree_tokens, "separate_tokens": sep_tokens,
            "ideal": sep_tokens / tree_tokens, **{f"{k}_s": v for k, v in med.items()},
            "speedup": base_s / tree_s, "speedup_dense": base_s / med["tree_dense"],
            "speedup_sparse": base_s / med["tree_sparse"],
            "mem_tree": mem[f"tree_{auto}"].peak, "mem_separate": mem["separate_batch"].peak,
            "mem_ratio": mem[f"tree_{auto}"].peak / max(1, mem["separate_batch"].peak),
            "mem_ratio_total": (rss + mem[f"tree_{auto}"].peak) / (rss + mem["separate_batch"].peak),
            "maxdiff": diff}


CASES = ["grpo", "latro", "episode_T2", "episode_T4", "episode_T8", "onepass_d16"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["testbed", "smollm2-135m"])
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scales", nargs="+", default=["testbed=1", "smollm2-135m=0.5"],
                    help="MODEL=FACTOR: multiply every segment length (SmolLM2's activations: ~1.2 MB/token)")
    args = ap.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see PeakRSS; must be set before the process starts
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    scales = dict(x.split("=") for x in args.scales)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), "
          f"threads {torch.get_num_threads()}", flush=True)
    results = []
    for spec in args.models:
        model, tok = models.load(spec)
        model.train()
        for case in args.cases:
            r = measure(model, tok, case, args.repeats, float(scales.get(spec, 1)))
            r["model"] = spec
            results.append(r)
            print(f"{spec:13s} {case:12s} tokens {r['tree_tokens']:5d} vs {r['separate_tokens']:6d} (ideal "
                  f"{r['ideal']:.2f}x)  tree dense {r['tree_dense_s']:.3f}s sparse {r['tree_sparse_s']:.3f}s "
                  f"[auto: {r['auto']}]  separate batch {r['separate_batch_s']:.3f}s each "
                  f"{r['separate_each_s']:.3f}s  speedup {r['speedup']:.2f}x ({r['speedup'] / r['ideal']:.2f} of "
                  f"ideal)  peak RSS {r['mem_tree'] / 2**20:.0f} vs {r['mem_separate'] / 2**20:.0f} MiB "
                  f"(x{r['mem_ratio']:.2f})  max |dlogp| {r['maxdiff']:.1e}", flush=True)
        del model
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")
    for r in results:
        key = f"{r['case']}_{r['model']}"
        print(f"RATIO tree_ideal_{key}={r['ideal']:.3f}")
        print(f"RATIO tree_speedup_{key}={r['speedup']:.3f}  # auto={r['auto']}")
        print(f"RATIO tree_of_ideal_{key}={r['speedup'] / r['ideal']:.3f}")
        print(f"RATIO tree_dense_speedup_{key}={r['speedup_dense']:.3f}")
        print(f"RATIO tree_sparse_speedup_{key}={r['speedup_sparse']:.3f}")
        print(f"RATIO tree_mem_{key}={r['mem_ratio']:.3f}  # peak extra RSS, tree / separate batch")


if __name__ == "__main__":
    main()
