"""Generation throughput: ponder.rollout.sample vs a plain HF `generate` call, side by side in one run.

For each model (testbed, smollm2-135m) and batch size (1, 16): new tokens per second of both paths,
generating exactly `--new-tokens` tokens per sequence (neither stops at end-of-turn, so both do the same work),
and a check that greedy outputs are identical. Prints `RATIO name=value` lines (ponder / plain).

    python bench/generation.py [--models testbed smollm2-135m] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def plain_generate(model, tok, prompts_ids, new_tokens):
    width = max(len(p) for p in prompts_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(prompts_ids), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for r, p in enumerate(prompts_ids):
        ids[r, width - len(p):] = torch.tensor(p)
        att[r, width - len(p):] = 1
    # eos_token_id=None: run on through end-of-turn tokens, exactly as rollout.sample(suppress_eos=True)
    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=new_tokens, eos_token_id=None,
                         do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    return out[:, width:].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["testbed", "smollm2-135m"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from ponder import chat, models, rollout
    rows = []
    for spec in args.models:
        model, tok = models.load(spec)
        for bs in args.batch_sizes:
            questions = [f"What is {17 + i}+{23 * i}*{i % 7 + 2}?" for i in range(bs)]
            pids = [chat.generation_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
            t_ours, t_plain, same = [], [], True
            for _ in range(args.repeats):  # interleaved, so both sides see the same machine load
                t = time.perf_counter()
                ours = rollout.sample(model, tok, pids, temperature=0.0, max_new_tokens=args.new_tokens,
                                      batch_size=bs, progress=False, suppress_eos=True)
                t_ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                ref = plain_generate(model, tok, pids, args.new_tokens)
                t_plain.append(time.perf_counter() - t)
                same &= [r[0].ids for r in ours] == ref
            n = bs * args.new_tokens
            ours_tps, plain_tps = n / statistics.median(t_ours), n / statistics.median(t_plain)
            rows.append((spec, bs, ours_tps, plain_tps, same))
            print(f"{spec:14s} batch {bs:3d}: ponder {ours_tps:8.1f} tok/s   plain generate {plain_tps:8.1f} tok/s"
                  f"   identical greedy output: {same}", flush=True)
    for spec, bs, o, p, same in rows:
        print(f"RATIO generation_{spec}_bs{bs}={o / p:.3f}")
        print(f"TOKS generation_{spec}_bs{bs}={o:.1f}")
        assert same, f"{spec} batch {bs}: ponder's greedy output differs from plain generate"


if __name__ == "__main__":
    main()
