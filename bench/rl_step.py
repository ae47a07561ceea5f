"""One RL step on SmolLM2-135M with vLLM rollouts, split into its three parts: rollout (the engine samples G
completions for each prompt), train (one policy-gradient update: group-normalised rewards, -A·log π summed
over the completion tokens, AdamW step on every weight) and push (the full state into the engine in one
`reload_weights` call, plus the probe that checks it). The same step with the `lean` backend for the rollout,
for comparison. Several steps; medians. The reward is a stand-in (the completion's length mod 3: varied
within every group, so every step moves the weights and the next rollout must wait for a push).

    python bench/rl_step.py [--steps 3] [--prompts 8] [--generations 4] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    from ponder import models, rollout, vllm_engine
    reason = vllm_engine.unavailable_reason()
    backends = ["lean"] + ([] if reason else ["vllm"])
    if reason:
        print(f"vllm skipped: {reason}")
    print(f"torch threads {torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    qs = [f"What is {17 + i}+{23 * i}*{i % 7 + 2}?" for i in range(args.prompts)]
    for backend in backends:
        model, tok = models.load("smollm2-135m")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)   # fused on CPU as transformers' default
        times = {"rollout": [], "push": [], "train": []}
        if backend == "vllm":
            t = time.perf_counter()
            engine = vllm_engine.engine_for(model, tok)
            engine.sync_weights(model)
            print(f"vllm engine start + first push {time.perf_counter() - t:.1f} s", flush=True)
        for step in range(args.steps):
            if backend == "vllm":
                t = time.perf_counter()
                pushed = engine.ensure_synced(model)
                times["push"].append(time.perf_counter() - t)
                assert pushed or step == 0
            t = time.perf_counter()
            rows = rollout.sample(model, tok, qs, n=args.generations, temperature=1.0, max_new_tokens=args.new_tokens,
                                  seed=step, batch_size=64, progress=False, backend=backend)
            times["rollout"].append(time.perf_counter() - t)
            t = time.perf_counter()
            model.train()
            loss = 0.0
            for r in rows:
                rew = torch.tensor([float(len(s.ids) % 3) for s in r])
                adv = (rew - rew.mean()) / (rew.std() + 1e-4)
                for s, a in zip(r, adv):
                    if not s.ids:
                        continue
                    ids = torch.tensor([s.prompt_ids + s.ids])
                    lp = model(ids).logits[0, len(s.prompt_ids) - 1:-1].log_softmax(-1)
                    loss = loss - a * lp.gather(1, torch.tensor(s.ids)[:, None]).sum() / len(rows)
            loss.backward()
            opt.step()
            opt.zero_grad()
            times["train"].append(time.perf_counter() - t)
        med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items() if v}
        total = sum(med.values())
        print(f"{backend}: " + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in med.items())
              + f"; step {total:.2f} s", flush=True)
        for k, v in med.items():
            print(f"TIME rl_step_{backend}_{k}={v:.3f}")
        vllm_engine.set_engine(None)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
