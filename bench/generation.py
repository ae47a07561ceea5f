"""Generation throughput: ponder.rollout.sample (backend `auto`, i.e. the lean decode loop on CPU) vs a plain HF
`generate` call, side by side in one run, interleaved repeats.

Equal work: both generate exactly `--new-tokens` tokens per sequence from the same prompts (neither stops at
end-of-turn), greedy, and the outputs must be identical. Prints `RATIO generation_<model>_bs<B>=ours/plain`
(new tokens per second). `--eos` adds realistic rollouts on the testbed: both stop rows at end-of-turn
(`generate` keeps padding finished rows until the last one ends, the lean loop compacts them out); outputs
are again identical, the work differs: `RATIO generation_eos_testbed_bs<B>`.

The vLLM backend (the real engine, `ponder.vllm_engine`, in-process on CPU, eager, weights pushed first) runs
in the same interleaved loop at `VLLM_BATCHES` (or `--batch-sizes`) when vLLM can run here: `TOKS
generation_vllm_<model>_bs<B>` and `RATIO generation_vllm_<model>_bs<B>=vllm/plain`, greedy ids again equal.

The lean loop prefills the prefix all prompts of a batch share (here the chat template's system prompt and
opening, 27 of SmolLM2's 40-43 prompt tokens) once; vLLM caches prefixes too. `--no-shared-prefix` turns that off.

bf16 rollouts (`rollout_dtype: bfloat16`: the lean loop on a bf16 copy of the weights) run in the same loop from
batch 16 up: `TOKS generation_lean_bf16_<model>_bs<B>`, `RATIO generation_lean_bf16_<model>_bs<B>=bf16/plain`
and `RATIO generation_lean_bf16_same_<model>_bs<B>`, the share of sequences whose greedy ids equal fp32's (bf16
is a slightly different policy; bench/efficiency.py gives the per-token agreement and KL).

    python bench/generation.py [--models testbed smollm2-135m] [--new-tokens 64] [--repeats 3] [--no-vllm] [--no-bf16]
                               [--no-shared-prefix]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

DEFAULT_BATCHES = {"testbed": [1, 16, 64, 256], "smollm2-135m": [1, 16, 64]}
VLLM_BATCHES = {"testbed": [64, 256], "smollm2-135m": [16, 64]}


def plain_generate(model, tok, prompts_ids, new_tokens, stop_at_eos=False):
    width = max(len(p) for p in prompts_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(prompts_ids), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for r, p in enumerate(prompts_ids):
        ids[r, width - len(p):] = torch.tensor(p)
        att[r, width - len(p):] = 1
    # eos_token_id=None: run on through end-of-turn tokens, exactly as rollout.sample(suppress_eos=True)
    eos = None
    if stop_at_eos:
        from ponder import rollout
        eos = rollout.stop_ids(model, tok)
    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=new_tokens, eos_token_id=eos,
                         do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    rows = out[:, width:].tolist()
    if stop_at_eos:  # up to and including the first end token, as rollout keeps it
        rows = [r[:next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in rows]
    return rows


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def compare(name, model, tok, pids, new_tokens, repeats, eos, vllm=False, bf16=False):
    from ponder import rollout
    walls = {"ours": [], "plain": [], "vllm": [], "bf16": []}
    cpus = {"ours": [], "plain": [], "vllm": [], "bf16": []}
    same, same_vllm, tokens, bf16_ids = True, True, 0, None
    for _ in range(repeats):  # interleaved, so every side sees the same machine load
        if bf16:
            bf16_ids, w, c = timed(lambda: rollout.sample(model, tok, pids, temperature=0.0, max_new_tokens=new_tokens,
                                                          batch_size=len(pids), progress=False, suppress_eos=not eos,
                                                          backend="lean", dtype="bfloat16"))
            walls["bf16"].append(w)
            cpus["bf16"].append(c)
        if vllm:
            got, w, c = timed(lambda: rollout.sample(model, tok, pids, temperature=0.0, max_new_tokens=new_tokens,
                                                     progress=False, suppress_eos=not eos, backend="vllm"))
            walls["vllm"].append(w)
            cpus["vllm"].append(c)
        ours, w, c = timed(lambda: rollout.sample(model, tok, pids, temperature=0.0, max_new_tokens=new_tokens,
                                                  batch_size=len(pids), progress=False, suppress_eos=not eos))
        walls["ours"].append(w)
        cpus["ours"].append(c)
        ref, w, c = timed(lambda: plain_generate(model, tok, pids, new_tokens, stop_at_eos=eos))
        walls["plain"].append(w)
        cpus["plain"].append(c)
        same &= [r[0].ids for r in ours] == ref
        if vllm:
            same_vllm &= [r[0].ids for r in got] == ref
        tokens = sum(len(r) for r in ref)
    med = {k: statistics.median(v) for k, v in walls.items() if v}
    cpu = {k: statistics.median(v) for k, v in cpus.items() if v}
    if vllm:  # vLLM's CPU time counts only this process's threads (its worker is in-process here)
        print(f"{name + ' vllm':26s}: vllm {tokens / med['vllm']:8.1f} tok/s   plain generate "
              f"{tokens / med['plain']:8.1f} tok/s   (wall x{med['plain'] / med['vllm']:.2f})   identical greedy "
              f"output: {same_vllm}", flush=True)
        compare.vllm = (med["plain"] / med["vllm"], tokens / med["vllm"], same_vllm)
    if bf16:
        agree = sum(r[0].ids == x for r, x in zip(bf16_ids, ref)) / len(ref)
        print(f"{name + ' lean bf16':26s}: bf16 {tokens / med['bf16']:8.1f} tok/s   plain generate "
              f"{tokens / med['plain']:8.1f} tok/s   (wall x{med['plain'] / med['bf16']:.2f})   greedy sequences "
              f"equal to fp32's: {agree:.1%}", flush=True)
        compare.bf16 = (med["plain"] / med["bf16"], tokens / med["bf16"], agree)
    print(f"{name:26s}: ponder {tokens / med['ours']:8.1f} tok/s   plain generate {tokens / med['plain']:8.1f} tok/s"
          f"   (wall x{med['plain'] / med['ours']:.2f}, cpu time x{cpu['plain'] / cpu['ours']:.2f})"
          f"   identical greedy output: {same}", flush=True)
    return med["plain"] / med["ours"], tokens / med["ours"], same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["testbed", "smollm2-135m"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: " + str(DEFAULT_BATCHES))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-eos", dest="eos", action="store_false", help="skip the stop-at-end-of-turn comparison")
    ap.add_argument("--no-vllm", dest="vllm", action="store_false", help="skip the vLLM backend")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 lean rollouts")
    ap.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                    help="the lean loop prefills each prompt whole (no shared-prefix prefill), for comparison")
    args = ap.parse_args()

    from ponder import chat, decode, models, rollout, vllm_engine
    if not args.shared_prefix:
        decode.SHARED_PREFIX_MIN_SAVED = 10 ** 9
    if args.vllm and vllm_engine.unavailable_reason():
        print(f"vllm backend skipped: {vllm_engine.unavailable_reason()}")
        args.vllm = False
    print(f"torch threads {torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}; backend "
          f"auto -> {rollout.resolve_backend('auto', models.load('tiny-random')[0])} on this machine; lean loop: "
          f"shared-prefix prefill {'on' if args.shared_prefix else 'off'}, packed projections from "
          f"{decode.PACK_MIN_TOKENS} rows x new tokens", flush=True)
    rows, agreement = [], []
    for spec in args.models:
        model, tok = models.load(spec)
        vllm_bs = set(args.batch_sizes or VLLM_BATCHES.get(spec, [])) if args.vllm else set()
        if vllm_bs:
            t = time.perf_counter()
            vllm_engine.set_engine(None)
            engine = vllm_engine.engine_for(model, tok)
            print(f"{spec}: vLLM engine started in {time.perf_counter() - t:.1f} s", flush=True)
            t = time.perf_counter()
            engine.sync_weights(model)
            print(f"{spec}: weight push + probe {time.perf_counter() - t:.2f} s (probe error "
                  f"{engine.last_probe_error:.1e})", flush=True)
        for bs in args.batch_sizes or DEFAULT_BATCHES.get(spec, [1, 16]):
            questions = [f"What is {17 + i}+{23 * i}*{i % 7 + 2}?" for i in range(bs)]
            pids = [chat.generation_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
            bf16 = args.bf16 and bs >= 16 and rollout.resolve_backend("lean", model) == "lean"
            r, tps, same = compare(f"{spec} batch {bs}", model, tok, pids, args.new_tokens, args.repeats, eos=False,
                                   vllm=bs in vllm_bs, bf16=bf16)
            rows.append((f"generation_{spec}_bs{bs}", r, tps, same))
            if bs in vllm_bs:
                rows.append((f"generation_vllm_{spec}_bs{bs}", *compare.vllm))
            if bf16:
                r, tps, agree = compare.bf16
                rows.append((f"generation_lean_bf16_{spec}_bs{bs}", r, tps, True))
                agreement.append((f"generation_lean_bf16_same_{spec}_bs{bs}", agree))
            if args.eos and spec == "testbed" and bs >= 64:
                r, tps, same = compare(f"{spec} batch {bs} (stop at eos)", model, tok, pids, args.new_tokens,
                                       args.repeats, eos=True)
                rows.append((f"generation_eos_{spec}_bs{bs}", r, tps, same))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    for key, r, tps, _same in rows:
        print(f"RATIO {key}={r:.3f}")
        print(f"TOKS {key}={tps:.1f}")
    for key, agree in agreement:
        print(f"RATIO {key}={agree:.3f}  # greedy sequences equal to fp32's")
    bad = [key for key, _, _, same in rows if not same]
    vllm_engine.set_engine(None)
    assert not bad, f"ponder's greedy output differs from plain generate: {bad}"


if __name__ == "__main__":
    main()
