"""LaTRO scoring and training-step time, side by side in one run.

1. Scoring: Σlog π(z|x) and Σlog π(y|x⊕z) from ONE pass over the trees x -> z -> y (`ponder.latro.score_ids`;
   here one rationale per question, so nothing is shared but the pass) vs the official code's two passes over
   [x z] and [x z y] (`score_separate`), on the same batch, interleaved repeats; bench/tree.py measures K = 8
   rationales sharing their question;
   both without grad (reward computation) and with forward+backward (the loss). The two must give the same
   numbers (checked in the run).
2. Training step: `LaTROTrainer` vs TRL's `RLOOTrainer` on the same model, questions per step, K, max length,
   temperature and KL (β, reference model); TRL gets a plain exact-match reward (it has no self-reward). Both
   generate with HF `generate`; ours stops rationales at the answer template and scores y with the policy,
   TRL generates the answer itself and calls the reward function. Median seconds per optimizer step
   (the first step of each run dropped), runs interleaved.

    python bench/latro.py [--models testbed smollm2-135m] [--batch 32] [--rationale 128] [--repeats 5]
                          [--trl-steps 6] [--trl-repeats 3] [--skip-trl]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

WORDS = ["so", "we", "add", "the", "two", "numbers", "and", "carry", "one", "then", "multiply", "by", "seven",
         "which", "gives", "twelve", "minus", "three", "is", "nine", "."]


def text_of(tok, rng, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tok(" " + rng.choice(WORDS), add_special_tokens=False)["input_ids"]
    return ids[:n_tokens]


def batch(tok, n: int, rationale: int, seed: int = 0):
    """n LaTRO samples: a chat-templated question, a rationale of L/2..L tokens, y = answer + end of turn."""
    from ponder import latro
    from ponder.data import load_problems
    rng = random.Random(seed)
    probs = load_problems("testbed", n=n, split="train", seed=seed)
    xs = [latro.prompt_ids(tok, latro.PROMPT_TEMPLATE.format(question=p.question)) for p in probs]
    zs = [text_of(tok, rng, rng.randint(rationale // 2, rationale)) for _ in probs]
    ys = [latro.answer_ids(tok, latro.ANSWER_TEMPLATE.format(answer=p.answer)) for p in probs]
    return xs, zs, ys


def bench_scoring(spec: str, n: int, rationale: int, repeats: int) -> dict[str, float]:
    from ponder import latro, models
    from ponder.chat import pad_id
    model, tok = models.load(spec)
    pad = pad_id(tok)
    xs, zs, ys = batch(tok, n, rationale)
    tokens = sum(len(x) + len(z) + len(y) for x, z, y in zip(xs, zs, ys))
    tokens_sep = tokens + sum(len(x) + len(z) for x, z in zip(xs, zs))

    def fused():
        return latro.score_ids(model, xs, zs, ys, pad)

    def separate():
        return latro.score_separate(model, xs, zs, ys, pad)

    def timed(fn, grad: bool) -> float:
        t = time.perf_counter()
        if grad:
            model.zero_grad(set_to_none=True)
            lz, ly = fn()
            (lz.sum() + ly.sum()).backward()
        else:
            with torch.no_grad():
                fn()
        return time.perf_counter() - t

    with torch.no_grad():
        (fz, fy), (sz, sy) = fused(), separate()
    diff = max((fz - sz).abs().max().item(), (fy - sy).abs().max().item())
    out = {"tokens_fused": tokens, "tokens_separate": tokens_sep, "max_abs_diff": diff}
    for grad in (False, True):
        timed(fused, grad), timed(separate, grad)  # warm-up
        tf, ts = [], []
        for _ in range(repeats):
            tf.append(timed(fused, grad))
            ts.append(timed(separate, grad))
        key = "fwd_bwd" if grad else "no_grad"
        out[f"{key}_fused_s"], out[f"{key}_separate_s"] = statistics.median(tf), statistics.median(ts)
        out[f"{key}_ratio"] = out[f"{key}_separate_s"] / out[f"{key}_fused_s"]
    return out


# ----------------------------------------------------------------------------------------------------------


class StepTimer:
    """Wall time from one optimizer step's end to the next (LaTROTrainer samples an update's rollouts before
    `on_step_begin`, when the Trainer fetches the update's micro-batches, so begin-to-end would miss them); the
    first step is timed from `on_train_begin`."""

    def __init__(self):
        from transformers import TrainerCallback
        self.times: list[float] = []
        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                outer.times.append(now - outer.t)
                outer.t = now
        self.callback = CB()


def run_ours(spec, problems, k, per_step, length, steps, seed):
    from ponder import models
    from ponder.trainers.latro import LaTROConfig, LaTROTrainer
    model, tok = models.load(spec)
    args = LaTROConfig(output_dir="/tmp/ponder-bench-latro", report_to=[], disable_tqdm=True, num_generations=k,
                       per_device_train_batch_size=per_step, max_new_tokens=length, max_steps=steps,
                       prompt_template="{question}", stop=["The answer is"], learning_rate=1e-5, beta=0.05,
                       sft_weight=0.0, save_strategy="no", logging_steps=10_000, seed=seed,
                       rollout_batch_size=per_step, use_cpu=True)
    timer = StepTimer()
    tr = LaTROTrainer(model=model, args=args, train_dataset=problems, processing_class=tok, callbacks=[timer.callback])
    tr.train()
    lengths = [h["rationale_length"] for h in tr.state.log_history if "rationale_length" in h]
    return timer.times[1:], lengths


def run_trl(spec, problems, k, per_step, length, steps, seed):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from ponder import models, verify
    model, tok = models.load(spec)
    lengths: list[float] = []

    def exact_match(completions, answer, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        lengths.append(sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts))
        return [float(verify.is_correct({"question": "", "answer": a, "meta": {"task": "testbed"}}, t))
                for t, a in zip(texts, answer)]

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["question"]}], "answer": p["answer"]}
                            for p in problems])
    args = RLOOConfig(output_dir="/tmp/ponder-bench-trl", report_to=[], disable_tqdm=True, num_generations=k,
                      per_device_train_batch_size=per_step, max_completion_length=length + 8, max_steps=steps,
                      learning_rate=1e-5, beta=0.05, temperature=1.0, save_strategy="no", logging_steps=10_000,
                      seed=seed, use_cpu=True, bf16=False, disable_dropout=True)
    timer = StepTimer()
    tr = RLOOTrainer(model=model, reward_funcs=[exact_match], args=args, train_dataset=ds, processing_class=tok,
                     callbacks=[timer.callback])
    tr.train()
    return timer.times[1:], lengths


def bench_step(spec: str, k: int, per_step: int, length: int, steps: int, repeats: int) -> dict[str, float]:
    from ponder.data import load_problems
    problems = [{"question": p.question, "answer": p.answer} for p in load_problems("testbed", n=500, split="train")]
    ours, trl = [], []
    ours_len, trl_len = [], []
    for r in range(repeats):
        t, n = run_ours(spec, problems, k, per_step, length, steps, seed=r)
        ours += t
        ours_len += n
        t, n = run_trl(spec, problems, k, per_step, length, steps, seed=r)
        trl += t
        trl_len += n
    return {"ours_s": statistics.median(ours), "trl_s": statistics.median(trl),
            "ratio": statistics.median(ours) / statistics.median(trl), "steps_timed": len(ours),
            "ours_rationale_tokens": statistics.mean(ours_len) if ours_len else float("nan"),
            "trl_completion_tokens": statistics.mean(trl_len) if trl_len else float("nan")}


SHAPES = {"testbed": (32, 128), "smollm2-135m": (8, 64)}  # samples scored per call, rationale length L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["testbed", "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=None, help="samples scored per call (default: per model)")
    ap.add_argument("--rationale", type=int, default=None,
                    help="rationale tokens: uniform in [L/2, L] (default: per model)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--trl-model", default="testbed")
    ap.add_argument("--trl-k", type=int, default=8)
    ap.add_argument("--trl-batch", type=int, default=32, help="rollouts per step")
    ap.add_argument("--trl-length", type=int, default=64)
    ap.add_argument("--trl-steps", type=int, default=6)
    ap.add_argument("--trl-repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    from ponder import ui
    rows, ratios = [], []
    for spec in a.models:
        # SmolLM2's 49k-token vocabulary makes [batch, length, vocab] logits the memory peak: smaller default shape
        batch, length = SHAPES.get(spec, SHAPES["testbed"])
        batch, length = a.batch or batch, a.rationale or length
        r = bench_scoring(spec, batch, length, a.repeats)
        rows.append((f"{spec} ({batch} x L={length})", r["tokens_fused"], r["tokens_separate"], r["no_grad_fused_s"], r["no_grad_separate_s"],
                     r["no_grad_ratio"], r["fwd_bwd_fused_s"], r["fwd_bwd_separate_s"], r["fwd_bwd_ratio"],
                     r["max_abs_diff"]))
        ratios.append((f"latro_score_{spec}", r["no_grad_ratio"]))
        ratios.append((f"latro_score_fwd_bwd_{spec}", r["fwd_bwd_ratio"]))
    ui.print_table("LaTRO scoring: fused \\[x z y] vs separate \\[x z] + \\[x z y] (samples x rationale length)",
                   ["model", "tokens fused", "tokens separate", "no-grad fused s", "no-grad separate s", "ratio",
                    "fwd+bwd fused s", "fwd+bwd separate s", "ratio", "max |diff|"], rows)
    if not a.skip_trl:
        s = bench_step(a.trl_model, a.trl_k, a.trl_batch, a.trl_length, a.trl_steps, a.trl_repeats)
        ui.print_table(f"training step: LaTROTrainer vs trl RLOOTrainer ({a.trl_model}, K={a.trl_k}, "
                       f"{a.trl_batch} rollouts/step, L={a.trl_length})",
                       ["ours s/step", "trl s/step", "ours / trl", "steps timed", "ours rationale tokens",
                        "trl completion tokens"],
                       [(s["ours_s"], s["trl_s"], s["ratio"], s["steps_timed"], s["ours_rationale_tokens"],
                         s["trl_completion_tokens"])])
        ratios.append(("latro_step_vs_trl_rloo", s["ratio"]))
    for name, v in ratios:
        print(f"RATIO {name}={v:.3f}")


if __name__ == "__main__":
    main()
