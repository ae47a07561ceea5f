"""One-pass attention on CPU: the block-sparse path vs the dense-mask path per shape, side by side (interleaved
repeats, forward+backward of one conversation), and what `ponder.tree.choose_attention` picks with the built-in
costs (`tree.DEFAULT_COSTS`) and with this machine's measured ones (`tree.attention_costs`: cached, measured at
first use).

For each model and conversation depth: tokens, the shape numbers the rule reads (`tree.attention_shape`),
the measured time of both paths, the faster one, the rule's picks and the time lost by the pick relative to
the faster path. Prints `RATIO attention_pick_<model>_d<depth>=t(faster)/t(picked)` (1.0 = the rule picked
the faster path; the pick with the costs named by --costs, default: measured, as `attention: auto` does) and
`RATIO attention_sparse_over_dense_<model>_d<depth>`.

    python bench/attention.py [--models testbed smollm2-135m] [--depths 2 4 8 16] [--repeats 3]
                              [--costs measured|default]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["testbed", "smollm2-135m"])
    ap.add_argument("--depths", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--answer-tokens", nargs="+", type=int, default=[16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--costs", choices=["measured", "default"], default="measured",
                    help="the costs whose pick the RATIO lines score (both picks are printed)")
    args = ap.parse_args()
    import torch
    from onepass import conversation

    from ponder import masks, models, onepass, tree
    from ponder.chat import pad_id
    print(f"torch threads {torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for spec in args.models:
        model, tok = models.load(spec)
        model.train()
        costs = {"default": tree.DEFAULT_COSTS,
                 "measured": tree.attention_costs(*tree.attention_dims(model), mode="measured")}
        print(f"{spec}: measured costs {costs['measured']} (default {costs['default']})", flush=True)
        for a in args.answer_tokens:
            for depth in args.depths:
                msgs = conversation(tok, depth, a, seed=depth)
                batch = masks.collate([masks.onepass_layout(tok, msgs)], pad_id(tok))
                shape = tree.attention_shape(model, batch, tree.sparse_plan(batch, torch.float32))
                picks = {k: tree.choose_attention(**shape, costs=c) for k, c in costs.items()}
                pick = picks[args.costs]
                times = {"sparse": [], "dense": []}
                for mode in times:  # warm-up
                    onepass.onepass_step(model, batch, mode)
                for _ in range(args.repeats):
                    for mode in times:
                        model.zero_grad(set_to_none=True)
                        t = time.perf_counter()
                        onepass.onepass_step(model, batch, mode)
                        times[mode].append(time.perf_counter() - t)
                model.zero_grad(set_to_none=True)
                med = {k: statistics.median(v) for k, v in times.items()}
                best = min(med, key=med.get)
                rows.append((spec, depth, a, shape, med, best, pick))
                print(f"{spec:13s} depth {depth:2d} answer {a:3d}: tokens {shape['tokens']:5d}  sparse {med['sparse']:7.3f}s"
                      f"  dense {med['dense']:7.3f}s  (sparse/dense {med['sparse'] / med['dense']:.3f})  faster "
                      f"{best:6s} rule {picks['default']:6s} (default costs) {picks['measured']:6s} (measured)  "
                      f"shape {shape}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    for spec, depth, a, _shape, med, best, pick in rows:
        key = f"{spec}_d{depth}" + (f"_a{a}" if len(args.answer_tokens) > 1 else "")
        print(f"RATIO attention_pick_{key}={med[best] / med[pick]:.3f}")
        print(f"RATIO attention_sparse_over_dense_{key}={med['sparse'] / med['dense']:.3f}")


if __name__ == "__main__":
    main()
