"""How close to the machine is a step? This CPU's matmul rate (fp32 and bf16, 1 and 2 threads, square and the
models' own shapes), then model FLOPs per second of a train step (testbed and SmolLM2, full and LoRA), a
decode step, each as a share of the matmul rate of its dtype, with the decode limit (the run's matmuls alone: the
prefill, shared prefix once, at a prefill-shaped product's rate, each step at the best rate of the model's own
decode-shaped product, plain or packed as the lean loop runs it) next to HF
`generate`; bf16 rollouts' agreement with fp32's
(whole greedy sequences, and teacher-forced per token: same greedy id, KL); and,
from a profile of the SmolLM2 train step, where the time goes (matmuls, attention, optimizer, the rest).

Model FLOPs: 2·N per token forward (N: the parameters that multiply, embeddings excluded, the LM head included)
plus attention's 4·T·d per token per layer (causal: half of it); backward 2× forward for full training, 1×
for LoRA (no weight gradients of frozen weights). A share above 1 is impossible; well below 1 means time spent
outside matmuls.

    python bench/efficiency.py [--quick] [--models testbed smollm2-135m] [--agreement-only] [--decode-only]
    python bench/efficiency.py --loss-curve 20 [--models ...]   # SFT fp32 vs `dtype: auto`, loss per step

Prints `RATE name=GFLOP/s` and `RATIO name=share` lines (bench/run.py collects them), with the CPU named.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch

from ponder.engine import models, runtime


def best_time(fn, repeats: int) -> float:
    fn()  # warm up (allocator, oneDNN primitive cache)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_rate(m: int, k: int, n: int, dtype, threads: int, repeats: int = 5, packed: bool = False) -> float:
    """GFLOP/s of an (m×k)·(k×n) product in `dtype` on `threads` threads; `packed`: as the lean loop's decode
    steps run it (`decode.step_linear`: the weight reordered once into oneDNN's layout)."""
    from ponder.engine import decode
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        if packed:
            lin = torch.nn.Linear(k, n, bias=False).to(dtype)
            lin.weight.data.copy_(b.t())
            f = decode.step_linear(lin, m)
        else:
            def f(x):
                return x @ b
        reps = max(1, int(2e9 / (2 * m * k * n)))  # ~2 GFLOP per timed call
        t = best_time(lambda: [f(a) for _ in range(reps)], repeats)
        return 2 * m * k * n * reps / t / 1e9
    finally:
        torch.set_num_threads(old)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: every Linear weight (the LM head counted once even if tied)."""
    return sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))


def model_flops(model, rows: int, length: int, backward: str) -> float:
    """FLOPs of a forward (+ backward: 'full' 2x, 'lora' 1x, 'none') over rows × length causal tokens."""
    cfg = model.config
    tokens = rows * length
    n = matmul_params(model)
    attn = 2 * cfg.num_hidden_layers * 2 * length * cfg.hidden_size * tokens  # QK^T and AV, causal half of 4·T·d
    fwd = 2 * n * tokens + attn
    return fwd * {"none": 1, "lora": 2, "full": 3}[backward]


def autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()


def train_step(model, rows: int, length: int, dtype, repeats: int):
    """Seconds and loss of one forward + backward + AdamW step (fp32 master weights, `dtype` autocast)."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    losses = []

    def step():
        with autocast(dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return best_time(step, repeats), losses[0]


def decode_prompts(tok, batch: int) -> list[list[int]]:
    from ponder.engine import rollout
    return [rollout.prompt_ids(tok, f"What is {i} + {i + 1}? Think step by step.") for i in range(batch)]


def decode_rate(model, tok, batch: int, new_tokens: int, dtype, repeats: int, backend: str = "lean") -> float:
    """Greedy decoding in tok/s (the lean loop, or `backend`); bf16 as rollouts run it (`rollout_dtype:
    bfloat16`: a bf16 copy of the weights, no autocast)."""
    from ponder.engine import rollout
    prompts = decode_prompts(tok, batch)
    kw = dict(n=1, temperature=0.0, max_new_tokens=new_tokens, batch_size=batch, suppress_eos=True, progress=False,
              dtype="bfloat16" if dtype == torch.bfloat16 else "auto", backend=backend)
    return batch * new_tokens / best_time(lambda: rollout.sample(model, tok, prompts, **kw), repeats)


def greedy_agreement(model, tok, batch: int = 64, new_tokens: int = 64) -> dict[str, float]:
    """bf16 rollouts (`rollout_dtype: bfloat16`) against fp32's, greedy, same prompts: the share of sequences
    whose ids are identical, the mean share of tokens before the first difference, and, teacher-forced on
    fp32's sequences, the share of positions where both pick the same greedy id and the mean KL(fp32 || bf16)
    of the next-token distributions in nats."""
    from ponder.engine import rollout
    prompts = [rollout.prompt_ids(tok, f"What is {i} + {2 * i + 1}? Think step by step.") for i in range(batch)]
    kw = dict(n=1, temperature=0.0, max_new_tokens=new_tokens, batch_size=batch, progress=False)
    ref = [r[0].ids for r in rollout.sample(model, tok, prompts, **kw)]
    got = [r[0].ids for r in rollout.sample(model, tok, prompts, dtype="bfloat16", **kw)]
    shadow = rollout.sampling_copy(model, torch.bfloat16)
    same_tok, kl = [], []
    with torch.no_grad():
        for p, ids in zip(prompts, ref):
            seq = torch.tensor([list(p) + ids])
            a = model(seq).logits[0, len(p) - 1:-1].double().log_softmax(-1)
            b = shadow(seq).logits[0, len(p) - 1:-1].double().log_softmax(-1)
            same_tok.append((a.argmax(-1) == b.argmax(-1)).double().mean().item())
            kl.append((a.exp() * (a - b)).sum(-1).mean().item())
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) / max(len(a), 1)
              for a, b in zip(ref, got)]
    return {"same": sum(a == b for a, b in zip(ref, got)) / batch, "prefix": sum(prefix) / batch,
            "token": sum(same_tok) / batch, "kl": sum(kl) / batch}


def print_agreement(spec: str, model, tok) -> None:
    g = greedy_agreement(model, tok)
    print(f"RATIO greedy_same_bf16_{spec}={g['same']:.3f}  # sequences identical to fp32's (64 x 64 tokens)")
    print(f"RATIO greedy_prefix_bf16_{spec}={g['prefix']:.3f}  # share of tokens before the first difference")
    print(f"RATIO greedy_token_bf16_{spec}={g['token']:.3f}  # teacher-forced: same greedy id at a position")
    print(f"RATIO kl_bf16_{spec}={g['kl']:.2e}  # teacher-forced: mean KL(fp32 || bf16) per token, nats")


def profile_breakdown(model, rows: int, length: int) -> dict[str, float]:
    """Shares of a full train step's CPU time by kind of op (self time of the profiler's ATen ops)."""
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - t
    kinds = {"loss": ("cross_entropy", "log_softmax", "nll_loss"),  # before attention's "softmax"
             "matmul": ("addmm", "mm", "bmm", "matmul", "linear"),
             "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax"),
             "optimizer": ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt")}
    out = dict.fromkeys([*kinds, "other"], 0.0)
    for ev in prof.key_averages():
        name = ev.key.lower()
        us = ev.self_cpu_time_total
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), "other")
        out[kind] += us
    total = sum(out.values()) or 1.0
    shares = {k: v / total for k, v in out.items()}
    shares["profiled_over_wall"] = total / 1e6 / wall  # < 1: time outside ATen ops (Python, dispatch)
    return shares


CURVE_TASKS = {"testbed": "testbed",
               "smollm2-135m": "rg:basic_arithmetic:min_terms=2,max_terms=2,max_digits=1,allow_parentheses=false,"
                               "allow_negation=false,operators=+-*"}


def loss_curve(spec: str, steps: int, dtype: str, out: str) -> tuple[list[float], float]:
    """`steps` steps of ponder's SFTTrainer (LoRA r 16, 8 gold conversations per step, lr 2e-4: the SFT arm of
    the SmolLM2 experiments) with ``dtype`` fp32 or ``auto`` (bf16 autocast, fp32 master weights, where
    `runtime.bf16_pays`); the loss of every step and the seconds per step."""
    from ponder.config import load_config
    from ponder.engine import data
    from ponder.recipes.latro import gold_conversations
    from ponder.trainers.sft import SFTConfig, SFTTrainer
    task = CURVE_TASKS.get(spec, "testbed")
    problems = data.resolve_problems(task, 8 * steps, "train", "dataset", 0)
    convs = gold_conversations(problems, "direct", "{question} Let's think step by step.", "The answer is {answer}.")
    with tempfile.TemporaryDirectory() as tmp:
        gold = f"{tmp}/gold.jsonl"
        data.write_jsonl(gold, [{"messages": m} for m in convs])
        ov = {"model": spec, "dataset": gold, "dtype": dtype, "lora": '{"r": 16, "alpha": 32}', "max_steps": steps,
              "per_device_train_batch_size": 8, "learning_rate": 2e-4, "lr_scheduler_type": "constant",
              "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0,
              "output_dir": out}
        cfg = load_config(SFTConfig, None, [f"{k}={v}" for k, v in ov.items()])
        tr = SFTTrainer(args=cfg)
        t = time.perf_counter()
        tr.train()
        sec = (time.perf_counter() - t) / steps
    return [h["loss"] for h in tr.state.log_history if "loss" in h], sec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["testbed", "smollm2-135m"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and shapes (a smoke run)")
    ap.add_argument("--agreement-only", action="store_true", help="only the bf16 vs fp32 greedy agreement")
    ap.add_argument("--decode-only", action="store_true", help="the matmul rates and the decode rows only")
    ap.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                    help="only SFT with dtype fp32 vs auto for STEPS steps: the loss per step and its difference")
    a = ap.parse_args()
    if a.loss_curve:
        print(f"# {runtime.describe(runtime.machine())}; dtype auto -> "
              f"{'bf16 autocast' if runtime.bf16_pays() else 'fp32 (bf16 does not pay on this CPU)'}", flush=True)
        for spec in a.models:
            with tempfile.TemporaryDirectory() as tmp:
                ref, t32 = loss_curve(spec, a.loss_curve, "float32", tmp)
                got, tauto = loss_curve(spec, a.loss_curve, "auto", tmp)
            print(f"{spec}: step  " + " ".join(f"{i + 1:7d}" for i in range(len(ref))))
            print(f"{spec}: fp32  " + " ".join(f"{x:7.4f}" for x in ref))
            print(f"{spec}: auto  " + " ".join(f"{x:7.4f}" for x in got))
            rel = [abs(x - y) / abs(x) for x, y in zip(ref, got)]
            print(f"RATIO curve_max_rel_diff_{spec}={max(rel):.4f}  # |auto - fp32| / fp32, worst step of "
                  f"{len(ref)}; the loss fell {ref[0]:.3f} -> {ref[-1]:.3f}")
            print(f"RATIO curve_last_rel_diff_{spec}={rel[-1]:.4f}")
            print(f"RATIO curve_step_speedup_{spec}={t32 / tauto:.3f}  # {t32:.2f} s/step fp32, {tauto:.2f} auto")
        return
    if a.agreement_only:
        for spec in a.models:
            model, tok = models.load(spec)
            print_agreement(spec, model.eval(), tok)
        return
    reps = 1 if a.quick else 3
    m = runtime.machine()
    print(f"# {runtime.describe(m)}", flush=True)
    threads = sorted({1, torch.get_num_threads()})
    peak = {}
    for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for th in threads:
            for n in ((1024,) if a.quick else (1024, 2048)):
                r = matmul_rate(n, n, n, dt, th)
                print(f"RATE matmul_{dt_name}_{th}t_n{n}={r:.0f}", flush=True)
                peak[dt_name] = max(peak.get(dt_name, 0.0), r)
        # SmolLM2's shapes: a training batch (2048 rows) and a decode step (64 rows) through the MLP; the decode
        # step also packed, as the lean loop runs it
        for rows in (2048, 64):
            r = matmul_rate(rows, 576, 1536, dt, threads[-1])
            print(f"RATE matmul_{dt_name}_{threads[-1]}t_{rows}x576x1536={r:.0f}", flush=True)
        r = matmul_rate(64, 576, 1536, dt, threads[-1], packed=True)
        print(f"RATE matmul_{dt_name}_{threads[-1]}t_64x576x1536_packed={r:.0f}", flush=True)
    print(f"RATIO matmul_bf16_over_fp32={peak['bf16'] / peak['fp32']:.3f}", flush=True)

    for spec in a.models:
        rows, length = (8, 256) if spec != "testbed" else (16, 256)
        for lora in () if a.decode_only else (False, True):
            for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                model, tok = models.load(spec, lora={"r": 16, "alpha": 32} if lora else None)
                model.train()
                sec, loss = train_step(model, rows, length, dt, reps)
                fl = model_flops(model, rows, length, "lora" if lora else "full")
                kind = "lora" if lora else "full"
                print(f"RATE train_{kind}_{dt_name}_{spec}={fl / sec / 1e9:.0f}  # {sec:.2f} s/step, loss {loss:.4f}",
                      flush=True)
                print(f"RATIO share_train_{kind}_{dt_name}_{spec}={fl / sec / 1e9 / peak[dt_name]:.3f}", flush=True)
        model, tok = models.load(spec)
        model.eval()
        batch, new = 64, 32 if a.quick else 64
        # the tokens the lean loop prefills: the prompts' shared prefix once, then each prompt's rest
        from ponder.engine import decode
        prompts = decode_prompts(tok, batch)
        shared = decode.shared_prefix(prompts)
        prompt_tokens = shared + sum(len(p) - shared for p in prompts)
        gen = decode_rate(model, tok, batch, new, torch.float32, reps, backend="generate")
        print(f"RATE decode_generate_fp32_{spec}_bs{batch}={gen:.0f}  # tok/s, HF generate", flush=True)
        cfg = model.config
        for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            tps = decode_rate(model, tok, batch, new, dt, reps)
            fl = 2 * matmul_params(model) * tps
            print(f"RATE decode_{dt_name}_{spec}_bs{batch}={tps:.0f}  # tok/s, lean loop", flush=True)
            print(f"RATIO share_decode_{dt_name}_{spec}_bs{batch}={fl / 1e9 / peak[dt_name]:.3f}", flush=True)
            # the limit if the run were its matmuls alone: the prompts' prefill (shared prefix once) at the rate of
            # a prefill-shaped product and every decode step at the best rate of the model's own decode-shaped one
            # (batch x hidden x intermediate, plain or packed); tok/s counts new tokens only, as above. No loop in
            # this dtype beats it on this CPU.
            flop = 2 * matmul_params(model) / 1e9  # GFLOP per token
            step_rate = max(matmul_rate(batch, cfg.hidden_size, cfg.intermediate_size, dt, threads[-1], packed=p)
                            for p in (False, True))
            seconds = (flop * batch * new / step_rate
                       + flop * prompt_tokens / matmul_rate(prompt_tokens, cfg.hidden_size, cfg.intermediate_size, dt,
                                                            threads[-1]))
            limit = batch * new / seconds
            print(f"RATE decode_limit_{dt_name}_{spec}_bs{batch}={limit:.0f}  # tok/s: matmuls only", flush=True)
            print(f"RATIO decode_{dt_name}_over_generate_{spec}_bs{batch}={tps / gen:.3f}", flush=True)
            print(f"RATIO decode_limit_{dt_name}_over_generate_{spec}_bs{batch}={limit / gen:.3f}", flush=True)
        print_agreement(spec, model, tok)
        if not a.decode_only and (spec != "testbed" or len(a.models) == 1):
            model.train()
            shares = profile_breakdown(model, rows, length)
            for k, v in shares.items():
                print(f"RATIO profile_{k}_{spec}={v:.3f}", flush=True)


if __name__ == "__main__":
    main()
