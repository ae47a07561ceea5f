"""RISE training: a trajectory as ONE sequence (one-pass layout, a weight per attempt) vs the official layout
(one truncated example per attempt), side by side in one run.

For each model and number of turns T: the same batch of T-attempt trajectories (testbed-style attempts: a
reasoning block and an answer; the retry feedback between attempts; with --demo the instruction + one-shot demo
prefix), tokens forwarded (real tokens, and with padding as batched), wall time of one forward+backward of the
RISE loss, their ratios, and the loss difference between the two (they must agree: same loss, tests prove it in
fp64). Interleaved repeats, median.

    python bench/rise.py [--models testbed smollm2-135m] [--turns 2 5] [--trajectories 16] [--repeats 5]
                         [--demo] [--plain]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch


def trajectories(n: int, turns: int, demo: bool, plain: bool = False, seed: int = 0):
    """n trajectories with `turns` attempts: wrong attempts (an arithmetic slip) then a correct one. plain: the
    worked solution is the message content (no <think> block), so later turns see every earlier attempt in
    full — the paper's GSM8K/MATH setting, where the per-turn layout re-forwards the whole history."""
    from ponder import rise, testbed
    rng = random.Random(seed)
    env = rise.Env(demo=demo)
    out = []
    for _ in range(n):
        p = testbed.sample_problem(rng)
        prob = {"question": p.question, "answer": str(p.answer)}
        atts = []
        for k in range(turns):
            last = k == turns - 1
            reasoning, ans = testbed.solve(p, "split", slip=0 if last else testbed.slip(rng))
            text = (f"{reasoning}\n{testbed.answer_text(ans)}" if plain else
                    f"<think>\n{reasoning}\n</think>\n\n{testbed.answer_text(ans)}")
            atts.append({"turn": k, "text": text, "reward": 1.0 if last else 0.0,
                         "feedback": rise.SUCCESS_PROMPT if last else rise.RETRY_PROMPT.format(query=p.question)})
        out.append({"id": str(len(out)), "prompt": env.reset(prob), "attempts": atts})
    return out


def make_trainer(model, tok, trajs, mode, out):
    from ponder.trainers.rise import RISEConfig, RISETrainer
    args = RISEConfig(output_dir=out, mode=mode, report_to=[], disable_tqdm=True, max_length=100_000)
    return RISETrainer(model=model, args=args, train_dataset=trajs, processing_class=tok)


def step(trainer, model, batch):
    t = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=batch["units"].sum())
    loss.backward()
    return time.perf_counter() - t, loss.item()


def run(model_spec: str, turns: int, n: int, repeats: int, demo: bool, plain: bool = False):
    from ponder import models
    model, tok = models.load(model_spec, attn_implementation="sdpa")
    model.train()
    trajs = trajectories(n, turns, demo, plain)
    with tempfile.TemporaryDirectory() as d:
        one = make_trainer(model, tok, trajs, "onepass", d + "/one")
        ref = make_trainer(model, tok, trajs, "npass", d + "/ref")
        b1 = one.data_collator([one.train_dataset[i] for i in range(len(one.train_dataset))])
        b2 = ref.data_collator([ref.train_dataset[i] for i in range(len(ref.train_dataset))])
        tok1, tok2 = one.data_stats["train"]["dataset_tokens"], ref.data_stats["train"]["dataset_tokens"]
        pad1, pad2 = b1["input_ids"].numel(), b2["input_ids"].numel()
        step(one, model, b1)  # warm-up
        step(ref, model, b2)
        t1, t2 = [], []
        for _ in range(repeats):  # interleaved: CPU steal hits both sides alike
            dt, l1 = step(one, model, b1)
            t1.append(dt)
            dt, l2 = step(ref, model, b2)
            t2.append(dt)
    return {"model": model_spec, "turns": turns, "trajectories": n, "examples_per_turn_layout": int(b2["units"].sum()),
            "tokens_one": tok1, "tokens_per_turn": tok2, "padded_one": pad1, "padded_per_turn": pad2,
            "time_one": statistics.median(t1), "time_per_turn": statistics.median(t2), "loss_diff": abs(l1 - l2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["testbed"])
    ap.add_argument("--turns", nargs="+", type=int, default=[2, 5])
    ap.add_argument("--trajectories", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--demo", action="store_true", help="instruction + one-shot demo prefix (long shared prompt)")
    ap.add_argument("--plain", action="store_true", help="attempts without a <think> block: history shows them in "
                    "full (the paper's setting)")
    a = ap.parse_args()
    torch.manual_seed(0)
    from ponder import ui
    rows, ratios = [], {}
    for spec in a.models:
        for T in a.turns:
            r = run(spec, T, a.trajectories, a.repeats, a.demo, a.plain)
            tr, pr, sr = r["tokens_per_turn"] / r["tokens_one"], r["padded_per_turn"] / r["padded_one"], \
                r["time_per_turn"] / r["time_one"]
            rows.append((spec, T, r["examples_per_turn_layout"], r["tokens_one"], r["tokens_per_turn"], tr,
                         (T + 1) / 2, pr, r["time_one"], r["time_per_turn"], sr, r["loss_diff"]))
            ratios[f"{spec}_T{T}"] = (tr, sr)
    ui.print_table("RISE loss: one sequence per trajectory vs one example per attempt (forward+backward)",
                   ["model", "T", "examples", "tokens 1-seq", "tokens per-turn", "token ratio", "(T+1)/2",
                    "padded ratio", "s 1-seq", "s per-turn", "time ratio", "|loss diff|"], rows)
    tag = ("_plain" if a.plain else "") + ("_demo" if a.demo else "")
    for name, (tr, sr) in ratios.items():
        print(f"RATIO rise_tokens_{name}{tag}={tr:.3f}")
        print(f"RATIO rise_time_{name}{tag}={sr:.3f}")


if __name__ == "__main__":
    main()
