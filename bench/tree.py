"""The prefix-tree engine (`ponder.tree`) vs separate sequences, side by side in one run.

Cases, per model (segment lengths for scale 1; SmolLM2 runs at 0.5 by default, for memory):
- ``grpo``: a GRPO/RLOO group — one prompt (4x the completion: 256 + 8 x 64 tokens), all completions scored
  (the trees of `ponder.latro.trees`, as the LaTRO trainer builds them for ``reward: verifier``);
- ``latro``: LaTRO, K=8 rationales of one question, each followed by the answer (x 128, z 96, y 16;
  `ponder.latro.trees`): the policy pass (z and y scored, forward+backward) plus the reference pass over
  x -> z_k (forward only); the separate baseline is one [x z y] row per rationale plus one [x z] row each;
- ``episode_T2/4/8``: multi-turn episodes whose reasoning is hidden from later turns (user 16, reasoning 32,
  answer 16 tokens per turn) vs one sample per turn;
- ``retry_T2/4/8``: a real `ponder retry` episode (`ponder.retry.episode_tree`): a testbed problem, T attempts
  (a reasoning block and an answer each) with RISE's retry feedback between them, rendered by the model's chat
  template with earlier reasoning stripped, vs one sample per attempt [prompt_t attempt_t];
- ``onepass_d16``: a one-pass conversation of depth 16 (bench/onepass.py's shape, the real chat template).

For each: tokens forwarded by the tree and by the separate sequences (their ratio is the ideal speedup), the
median forward+backward seconds of the tree (the path `ponder.tree.choose` picks, and both paths), of the
separate sequences in padded batches (of at most --batch-tokens) and one at a time (the faster is the
baseline), of one plain causal row of the tree's token count with the head at as many positions (`plain_step`:
its linear layers and head at the tree's matmul sizes; the reachable speedup is min(token ratio, baseline / plain)),
of the LM head alone at the scored positions (`head_step`: a cost both sides pay in full, so the
reachable speedup is the "bound" baseline / ((baseline - head) / ideal + head), not the token ratio), the peak extra RSS of the tree and of the separate batches (the largest batch is the peak), and the
largest log-prob difference. Repeats are interleaved and the speedup is the median over repeats of
(baseline / tree) within a repeat, so both sides of a ratio saw the same machine load. Memory is sampled in a
child process with a small mmap threshold (bench/onepass.py's PeakRSS), which would also tax the timings.

    python bench/tree.py [--models testbed smollm2-135m] [--cases ...] [--repeats 3] [--scales testbed=1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import psutil
import torch
from onepass import PeakRSS, conversation

from ponder import latro, masks, models, retry, rise, testbed, tree
from ponder.chat import pad_id
from ponder.tree import Tree


def grpo(rng, vocab, s):
    """A GRPO/RLOO group as the trainers build it: `ponder.latro.trees` with the G completions as z and no y
    (the LaTRO trainer's ``reward: verifier`` path, plain RLOO/GRPO)."""
    x = ids(rng, vocab, 256 * s)
    (t,) = latro.trees([x] * 8, [ids(rng, vocab, 64 * s) for _ in range(8)], [[]] * 8)
    return t


def latro_trees(rng, vocab, s):
    """LaTRO's K = 8 rationales of one question (`ponder.latro.trees`): the policy tree x -> z_k -> y_k and the
    reference model's tree x -> z_k."""
    x, y = ids(rng, vocab, 128 * s), ids(rng, vocab, 16 * s)
    zs = [ids(rng, vocab, 96 * s) for _ in range(8)]
    (pol,) = latro.trees([x] * 8, zs, [y] * 8)
    (ref,) = latro.trees([x] * 8, zs, [[]] * 8)
    return pol, ref


def episode(rng, vocab, s, turns):
    t = Tree()
    at = None
    for k in range(turns):
        u = t.add(ids(rng, vocab, 16 * s), at, turn=k)
        r = t.add(ids(rng, vocab, 32 * s), u, weight=1.0, group=k, hidden=True)
        at = t.add(ids(rng, vocab, 16 * s), r, weight=1.0, group=k)
    return t


def retry_episode(tok, turns, seed=0):
    """A retry episode of `turns` attempts (wrong ones with an arithmetic slip, then the right one) as
    `ponder retry` trains it: one tree, each attempt weighted 1."""
    rng = random.Random(seed)
    env = rise.Env(history_reasoning="strip")
    p = testbed.sample_problem(rng)
    prob = {"question": p.question, "answer": str(p.answer)}
    msgs = env.reset(prob)
    for k in range(turns):
        reasoning, ans = testbed.solve(p, "split", slip=0 if k == turns - 1 else testbed.slip(rng))
        msgs = env.step(prob, msgs, f"<think>\n{reasoning}\n</think>\n\n{testbed.answer_text(ans)}")[0]
    return retry.episode_tree(tok, msgs[:-1], [1.0] * turns, "strip")


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


def head_step(model, n, n_ref=0):
    """The part of a step that the tree cannot shrink: the final norm, the LM head and the log-softmax at the
    `n` scored positions (forward+backward) and the reference pass's `n_ref` (forward only). Both sides score the
    same positions (`logits_to_keep`), so this time is paid in full by each; for a 49k vocabulary it is a large
    share of a step."""
    head, norm = model.get_output_embeddings(), model.get_decoder().norm
    dtype = next(model.parameters()).dtype
    h = torch.randn(n, head.in_features, dtype=dtype, requires_grad=True)
    lp = torch.log_softmax(head(norm(h)).float(), -1)[:, 0]
    lp.sum().backward()
    if n_ref:
        with torch.no_grad():
            torch.log_softmax(head(norm(torch.randn(n_ref, head.in_features, dtype=dtype))).float(), -1)
    return lp.detach()


def plain_step(model, tokens, n, ref_tokens=0, n_ref=0):
    """One plain causal row of as many tokens as the tree forwards (`is_causal` sdpa, no mask, no padding), with
    the LM head at `n` of its positions (forward+backward), and the reference pass's row (forward only). Its
    linear layers and head run at exactly the tree's matmul sizes, so no layout of these tokens does them
    faster; only attention can be cheaper in the tree (a sparse plan computes fewer pairs than the causal
    square). baseline / plain is the measured bound that folds in the head and the matmul efficiency at the
    tree's size, which the token ratio does not see; the reachable speedup is min(ideal, plain)."""
    def row(t, k, grad):
        ids = torch.randint(0, model.config.vocab_size, (1, t))
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=k).logits[0].float()
            return torch.log_softmax(logits, -1)[:, 0]
    lp = row(tokens, n, True)
    lp.sum().backward()
    if ref_tokens:
        row(ref_tokens, n_ref, False)
    return lp.detach()


def scored(packed):
    """Positions that go through the LM head: the distinct (row, predictor) pairs."""
    return 0 if packed is None else int(torch.unique(packed.pairs[:2], dim=1).shape[1])


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
        return latro_trees(rng, vocab, s)
    if case.startswith("episode_T"):
        return episode(rng, vocab, s, int(case[9:])), None
    if case.startswith("retry_T"):
        return retry_episode(tok, int(case[7:])), None
    if case == "onepass_d16":
        return masks.onepass_tree(tok, conversation(tok, 16, max(1, round(16 * s)), seed=16)), None
    raise ValueError(case)


def batches(seps, budget):
    """Consecutive separate sequences in padded batches of at most `budget` tokens (at least one each)."""
    out: list[list] = []
    for sep in seps:
        if out and (len(out[-1]) + 1) * max(len(x.ids) for x in out[-1] + [sep]) <= budget:
            out[-1].append(sep)
        else:
            out.append([sep])
    return out


def setup(model, tok, case, scale, batch_tokens):
    """The four variants of a case as closures, and what the report needs besides their times."""
    pad = pad_id(tok)
    pol, ref = build(case, tok, model.config.vocab_size, scale)
    packed = tree.pack([tree.flatten(pol)], pad)
    ref_packed = tree.pack([tree.flatten(ref)], pad) if ref is not None else None
    seps = tree.separate(pol)
    ref_seps = tree.separate(ref) if ref is not None else []
    order = [tok_ for sep in seps for tok_ in sep.tokens]
    perm = torch.tensor([order.index(t) for t in tree.flatten(pol).pair_token])  # separate -> tree pair order
    chunks = batches(seps, batch_tokens)
    one = [tree.separate_batch(c, pad) for c in chunks]
    one_w = [torch.tensor([w for sep in c for w in sep.weights], dtype=torch.float64) for c in chunks]
    each = [tree.separate_batch([sep], pad) for sep in seps]
    each_w = [torch.tensor(sep.weights, dtype=torch.float64) for sep in seps]
    ref_one = [tree.separate_batch(c, pad) for c in batches(ref_seps, batch_tokens)] if ref_seps else []
    ref_each = [tree.separate_batch([sep], pad) for sep in ref_seps]
    n_scored, n_ref_scored = scored(packed), scored(ref_packed)  # counted once, outside the timed calls
    runs = {
        "tree_dense": lambda: tree_step(model, packed, "dense", ref_packed),
        "tree_sparse": lambda: tree_step(model, packed, "sparse", ref_packed),
        "separate_batch": lambda: separate_step(model, one, one_w, ref_one),
        "separate_each": lambda: separate_step(model, each, each_w, ref_each),
        "head": lambda: head_step(model, n_scored, n_ref_scored),
        "plain": lambda: plain_step(model, packed.tokens, n_scored,
                                    ref_packed.tokens if ref_packed is not None else 0, n_ref_scored),
    }
    tree_tokens = packed.tokens + (ref_packed.tokens if ref_packed is not None else 0)
    sep_tokens = sum(len(x.ids) for x in seps + ref_seps)
    plan = tree.sparse_plan(packed, next(model.parameters()).dtype, bias=False)  # what tree.logits plans with
    info = {"case": case, "auto": tree.choose(model, packed, plan=plan), "tree_tokens": tree_tokens,
            "separate_tokens": sep_tokens, "ideal": sep_tokens / tree_tokens}
    return runs, perm, info


def measure_time(model, runs, perm, repeats):
    """Median seconds per variant, the per-repeat times, and the largest log-prob difference."""
    times = {k: [] for k in runs}
    diff = 0.0
    for fn in runs.values():  # warm-up: the first call of a shape pays for allocator growth
        model.zero_grad(set_to_none=True)
        fn()
    for _ in range(repeats):
        out = {}
        for k, fn in runs.items():
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            out[k] = fn()
            times[k].append(time.perf_counter() - t)
        for k in ("tree_dense", "tree_sparse"):
            diff = max(diff, (out[k] - out["separate_batch"][perm]).abs().max().item())
    model.zero_grad(set_to_none=True)
    return times, diff


def measure_memory(model, runs):
    """Peak extra RSS of one run of each variant (after a warm-up run)."""
    out = {}
    for k, fn in runs.items():
        if k in ("head", "plain"):
            continue
        model.zero_grad(set_to_none=True)
        fn()
        model.zero_grad(set_to_none=True)
        with PeakRSS() as m:
            fn()
        out[k] = m.peak
    model.zero_grad(set_to_none=True)
    return out, psutil.Process().memory_info().rss


def summarise(info, times, diff, mem, rss):
    auto = info["auto"]
    base = [min(a, b) for a, b in zip(times["separate_batch"], times["separate_each"])]

    def speedup(k):  # per repeat (the runs of one repeat saw the same load), then the median
        return statistics.median(b / t for b, t in zip(base, times[k]))
    # the bound when only the token-proportional part shrinks: separate = body + head, tree = body / ideal + head
    bound = statistics.median(b / ((b - h) / info["ideal"] + h) for b, h in zip(base, times["head"]))
    plain = statistics.median(b / p for b, p in zip(base, times["plain"]))  # baseline / one plain row
    return {**info, **{f"{k}_s": statistics.median(v) for k, v in times.items()}, "bound": bound, "plain": plain,
            "head_share": statistics.median(h / b for b, h in zip(base, times["head"])),
            "speedup": speedup(f"tree_{auto}"), "speedup_dense": speedup("tree_dense"),
            "speedup_sparse": speedup("tree_sparse"),
            "mem_tree": mem[f"tree_{auto}"], "mem_separate": mem["separate_batch"],
            "mem_ratio": mem[f"tree_{auto}"] / max(1, mem["separate_batch"]),
            "mem_ratio_total": (rss + mem[f"tree_{auto}"]) / (rss + mem["separate_batch"]), "maxdiff": diff}


CASES = ["grpo", "latro", "episode_T2", "episode_T4", "episode_T8", "retry_T2", "retry_T4", "retry_T8", "onepass_d16"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["testbed", "smollm2-135m"])
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=2048,
                    help="the separate sequences go in padded batches of at most this many tokens")
    ap.add_argument("--scales", nargs="+", default=["testbed=1", "smollm2-135m=0.5"],
                    help="MODEL=FACTOR: multiply every segment length (SmolLM2's activations: ~1.2 MB/token)")
    ap.add_argument("--memory", action="store_true", help="(internal) only the memory runs, as JSON lines")
    args = ap.parse_args()
    scales = dict(x.split("=") for x in args.scales)
    if args.memory:  # a child process started with a small mmap threshold (see PeakRSS)
        for spec in args.models:
            model, tok = models.load(spec)
            model.train()
            for case in args.cases:
                runs, _, _ = setup(model, tok, case, float(scales.get(spec, 1)), args.batch_tokens)
                mem, rss = measure_memory(model, runs)
                print("MEM " + json.dumps({"model": spec, "case": case, "mem": mem, "rss": rss}), flush=True)
            del model
        return
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), "
          f"threads {torch.get_num_threads()}", flush=True)
    timed = {}
    for spec in args.models:  # timing under the default allocator (the small mmap threshold that makes RSS
        model, tok = models.load(spec)  # sampling reliable also taxes every allocation)
        model.train()
        for case in args.cases:
            runs, perm, info = setup(model, tok, case, float(scales.get(spec, 1)), args.batch_tokens)
            times, diff = measure_time(model, runs, perm, args.repeats)
            timed[(spec, case)] = (info, times, diff)
            print(f"{spec:13s} {case:12s} timed: " + "  ".join(f"{k} {statistics.median(v):.3f}s"
                                                             for k, v in times.items()), flush=True)
        del model
    child = subprocess.run([sys.executable, *sys.argv, "--memory"], capture_output=True, text=True,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, check=True)
    results = []
    for ln in child.stdout.splitlines():
        if ln.startswith("MEM "):
            m = json.loads(ln[4:])
            r = summarise(*timed[(m["model"], m["case"])], m["mem"], m["rss"])
            r["model"] = m["model"]
            results.append(r)
            print(f"{r['model']:13s} {r['case']:12s} tokens {r['tree_tokens']:5d} vs {r['separate_tokens']:6d} "
                  f"(ideal {r['ideal']:.2f}x)  tree dense {r['tree_dense_s']:.3f}s sparse {r['tree_sparse_s']:.3f}s "
                  f"[auto: {r['auto']}]  separate batch {r['separate_batch_s']:.3f}s each "
                  f"{r['separate_each_s']:.3f}s  head {r['head_s']:.3f}s  speedup {r['speedup']:.2f}x "
                  f"({r['speedup'] / r['ideal']:.2f} of ideal, bound {r['bound']:.2f}x, plain row {r['plain']:.2f}x)  peak RSS {r['mem_tree'] / 2**20:.0f} vs {r['mem_separate'] / 2**20:.0f} MiB "
                  f"(x{r['mem_ratio']:.2f}, with the model x{r['mem_ratio_total']:.2f})  max |dlogp| "
                  f"{r['maxdiff']:.1e}", flush=True)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")
    print("\n| model | case | tokens tree / separate | ideal (token ratio) | head share | bound (head fixed) "
          "| plain row of the tree's tokens | time ratio (auto path) | of ideal | of the plain row "
          "| dense / sparse time ratio | peak RSS tree / separate | >= 0.9 of ideal | >= 0.9 of min(ideal, plain) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        of, ofp = r["speedup"] / r["ideal"], r["speedup"] / r["plain"]
        reach = r["speedup"] / min(r["ideal"], r["plain"])
        print(f"| {r['model']} | {r['case']} | {r['tree_tokens']} / {r['separate_tokens']} | {r['ideal']:.2f}x "
              f"| {r['head_share']:.2f} | {r['bound']:.2f}x | {r['plain']:.2f}x | {r['speedup']:.2f}x ({r['auto']}) "
              f"| {of:.2f} | {ofp:.2f} | {r['speedup_dense']:.2f}x / {r['speedup_sparse']:.2f}x "
              f"| {r['mem_tree'] / 2**20:.0f} / {r['mem_separate'] / 2**20:.0f} MiB (x{r['mem_ratio']:.2f}) "
              f"| {'yes' if of >= 0.9 else 'no'} | {'yes' if reach >= 0.9 else 'no'} |")
    print()
    for r in results:
        key = f"{r['case']}_{r['model']}"
        print(f"RATIO tree_ideal_{key}={r['ideal']:.3f}  # tokens forwarded, separate / tree")
        print(f"RATIO tree_speedup_{key}={r['speedup']:.3f}  # auto={r['auto']}, ideal {r['ideal']:.3f}")
        print(f"RATIO tree_of_ideal_{key}={r['speedup'] / r['ideal']:.3f}")
        print(f"RATIO tree_bound_{key}={r['bound']:.3f}  # the ideal with the LM head's time fixed on both sides")
        print(f"RATIO tree_of_bound_{key}={r['speedup'] / r['bound']:.3f}")
        print(f"RATIO tree_plain_{key}={r['plain']:.3f}  # baseline / one plain causal row of the tree's tokens")
        print(f"RATIO tree_of_plain_{key}={r['speedup'] / r['plain']:.3f}")
        print(f"RATIO tree_dense_speedup_{key}={r['speedup_dense']:.3f}")
        print(f"RATIO tree_sparse_speedup_{key}={r['speedup_sparse']:.3f}")
        print(f"RATIO tree_mem_{key}={r['mem_ratio']:.3f}  # peak extra RSS, tree / largest separate batch")
        print(f"RATIO tree_mem_total_{key}={r['mem_ratio_total']:.3f}  # the same with the process's RSS (model)")

if __name__ == "__main__":
    main()
