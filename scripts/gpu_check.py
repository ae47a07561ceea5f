"""GPU checks for ponder: what this CPU-only project cannot test on its own machine. Run by
scripts/gpu-check.sh (`make test-gpu`) after it installs the `gpu` extra; about 8 minutes on one GPU.

(a) flex     one-pass with FlexAttention (BlockMask) equals the dense-mask path on SmolLM2-135M, forward
             (per-token log-probs) AND backward (every parameter's gradient), in fp32 and bf16.
(b) greedy   the vLLM backend's greedy text equals `generate`'s on SmolLM2 (a mismatch is accepted only where
             the two continuations' logits tie to within the dtype's noise at the first differing token).
(c) train    3 optimizer steps each of LaTRO, GFPO (PEFT tag rows: the merged push) and RISE (collect ->
             train, 3 rounds) with vLLM rollouts; after every step the engine's weights are checked: vLLM's
             log-probs of a probe continuation equal the HF model's AFTER the step (and the step moved them).
(d) speed    new tokens per second of vLLM vs `generate` at batch 64 (128 new tokens, no early stop).

    python scripts/gpu_check.py [--only flex greedy latro gfpo rise speed] [--cpu-smoke]

--cpu-smoke runs the same plumbing on CPU with the testbed model (lean backend instead of vLLM, the sparse
path instead of flex, probes skipped): it checks this script, not the GPU. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PONDER_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from ponder import chat, data, masks, models, onepass, rollout, ssft, vllm_engine  # noqa: E402
from ponder.rise import Env, collect  # noqa: E402
from ponder.trainers.gfpo import GFPOConfig, GFPOTrainer  # noqa: E402
from ponder.trainers.latro import LaTROConfig, LaTROTrainer  # noqa: E402
from ponder.trainers.rise import RISEConfig, RISETrainer  # noqa: E402

ALL = ("flex", "greedy", "latro", "gfpo", "rise", "speed")
PROBES = ["What is 12+30*3?", "Name a prime number larger than 20.", "Continue: 1, 2, 4, 8,"]
QUESTIONS = [f"What is {17 + i}+{23 * i}*{i % 7 + 2}?" for i in range(64)]
TOL = {torch.float32: 2e-3, torch.bfloat16: 6e-2}   # |log-prob| agreement between two kernels' fp noise
RESULTS: list[tuple[str, bool, str, float]] = []
SMOKE = False


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def backend() -> str:
    return "lean" if SMOKE else "vllm"


def report(name: str, ok: bool, detail: str, t0: float) -> None:
    RESULTS.append((name, ok, detail, time.time() - t0))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail} ({time.time() - t0:.0f} s)", flush=True)


def spec() -> str:
    return "testbed" if SMOKE else "smollm2-135m"   # the smoke run checks plumbing: the small model will do


def smollm2(dtype="float32", **kw):
    model, tok = models.load(spec(), dtype=dtype, **kw)
    return model.to(device()), tok


# ------------------------------------------------------------------------------------------------- (a)

def conversation(depth: int) -> list[dict]:
    words = "the sum of twelve and seven is nineteen so we carry one then add it to the next digit".split()
    say = lambda n, k: " ".join(words[(k + i) % len(words)] for i in range(n))  # noqa: E731
    msgs = []
    for k in range(depth):
        msgs += [{"role": "user", "content": say(12, k)},
                 {"role": "assistant", "reasoning": say(24, k + 3), "content": say(12, k + 7)}]
    return msgs


def on_device(batch: masks.Batch, dev: str) -> masks.Batch:
    return masks.Batch(*[getattr(batch, f.name).to(dev) if isinstance(getattr(batch, f.name), torch.Tensor)
                         else getattr(batch, f.name) for f in dataclasses.fields(batch)])


def check_flex() -> None:
    for dtype in ("float32", "bfloat16"):
        t0 = time.time()
        impl = "sdpa" if SMOKE else "flex_attention"
        ref, tok = smollm2(dtype, attn_implementation="sdpa")
        flex, _ = smollm2(dtype, attn_implementation=impl)
        flex.load_state_dict(ref.state_dict())
        ref.train()
        flex.train()
        batch = on_device(masks.collate([masks.onepass_layout(tok, conversation(8))], chat.pad_id(tok)), device())
        lp_ref = onepass.onepass_step(ref, batch, "dense")
        lp_flex = onepass.onepass_step(flex, batch, "sparse" if SMOKE else "flex")
        diffs = torch.cat([(a.float() - b.float()).abs() for a, b in zip(lp_ref, lp_flex)])
        g_ref = torch.cat([p.grad.float().flatten() for p in ref.parameters() if p.grad is not None])
        g_flex = torch.cat([p.grad.float().flatten() for p in flex.parameters() if p.grad is not None])
        rel = ((g_ref - g_flex).norm() / g_ref.norm()).item()
        # bf16 rounds log-probs of magnitude ~10 to ~0.05: two exact kernels differ by that much per token
        max_tol, mean_tol, g_tol = (2e-3, 2e-4, 1e-3) if dtype == "float32" else (0.25, 2e-2, 3e-2)
        ok = diffs.max() < max_tol and diffs.mean() < mean_tol and rel < g_tol and g_ref.numel() == g_flex.numel()
        report(f"flex {dtype}", bool(ok), f"|dlogp| max {diffs.max():.2e} mean {diffs.mean():.2e} (tol {max_tol:g}, "
                                          f"{mean_tol:g}), gradient relative L2 difference {rel:.2e} (tol {g_tol:g}) "
                                          f"over {g_ref.numel()} values", t0)
        del ref, flex


# ------------------------------------------------------------------------------------------------- (b)

def logits_after(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=device())).logits[0, -1].float()


def check_greedy() -> None:
    t0 = time.time()
    model, tok = smollm2()
    kw = dict(temperature=0.0, max_new_tokens=64, batch_size=64, progress=False)
    hf = rollout.sample(model, tok, QUESTIONS[:32], backend="generate", **kw)
    vl = rollout.sample(model, tok, QUESTIONS[:32], backend=backend(), **kw)
    same, ties, bad = 0, 0, []
    for q, a, b in zip(QUESTIONS, hf, vl):
        a, b = a[0], b[0]
        if a.text == b.text:
            same += 1
            continue
        k = next((i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y), min(len(a.ids), len(b.ids)))
        if k < min(len(a.ids), len(b.ids)):
            lg = logits_after(model, a.prompt_ids + a.ids[:k])
            margin = abs(lg[a.ids[k]] - lg[b.ids[k]]).item()
            if margin < 1e-3 * max(1.0, lg.abs().max().item()):
                ties += 1
                continue
        bad.append(q)
    report("greedy vllm == generate", not bad, f"{same}/32 identical texts, {ties} differ after a logit tie, "
                                               f"{len(bad)} real mismatches {bad[:3]}", t0)


# ------------------------------------------------------------------------------------------------- (c)

def continuation_logprobs(model, prompt: list[int], ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids], device=device())).logits[0].float().log_softmax(-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(ids) - 1, device=logits.device)
    return logits[pos, torch.tensor(ids, device=logits.device)].cpu()


def engine_logprobs(model, tok, prompts):
    """The engine's greedy continuation of each probe and the log-probs it computed for those tokens."""
    from vllm import SamplingParams
    engine = vllm_engine.engine_for(model)
    engine.ensure_synced(model)
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0)
    outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        ids = list(c.token_ids)
        res.append((ids, torch.tensor([c.logprobs[i][t].logprob for i, t in enumerate(ids)])))
    return res


class WeightProbe(TrainerCallback):
    """After every optimizer step: push the weights (as the next rollout would) and check that the engine's
    log-probs of its own greedy probe continuations equal the HF model's after the step, and that the step
    moved them (so equality is not stale weights that happen to agree)."""

    def __init__(self, tok, name: str, prompts: list[list[int]] | None = None):
        self.tok, self.name, self.errors, self.steps = tok, name, [], 0
        self.prompts = prompts or [chat.generation_prompt(tok, [{"role": "user", "content": p}]) for p in PROBES]
        self.before = None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if not SMOKE:  # the engine's greedy probe ids before the step, and the model's log-probs of them
            self.before = [(ids, continuation_logprobs(model, p, ids))
                           for p, (ids, _) in zip(self.prompts, engine_logprobs(model, self.tok, self.prompts))]

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps += 1
        if SMOKE:
            return
        pushes = vllm_engine.current().pushes
        probe = engine_logprobs(model, self.tok, self.prompts)
        if vllm_engine.current().pushes != pushes + 1:
            self.errors.append(f"step {state.global_step}: no weight push after the optimizer step")
        tol = TOL[next(model.parameters()).dtype]
        moved = 0.0
        for p, (ids, lp_engine), (ids_before, lp_before) in zip(self.prompts, probe, self.before):
            off = (lp_engine - continuation_logprobs(model, p, ids)).abs().max().item()
            moved = max(moved, (continuation_logprobs(model, p, ids_before) - lp_before).abs().max().item())
            if off > tol:
                self.errors.append(f"step {state.global_step}: engine log-probs differ from the updated model by "
                                   f"{off:.2e} (stale weights?)")
        if moved < 5 * tol:
            self.errors.append(f"step {state.global_step}: the step moved the probe log-probs by only {moved:.2e}: "
                               "inconclusive (raise the check's learning rate)")


def run_trainer(name: str, trainer, probe: WeightProbe, t0: float) -> None:
    trainer.add_callback(probe)
    trainer.train()
    ok = probe.steps == 3 and not probe.errors
    report(f"{name} 3 steps with {backend()} rollouts", ok,
           f"{probe.steps} steps, {vllm_engine.current().pushes if vllm_engine.current() else 0} weight pushes; "
           + ("; ".join(probe.errors[:3]) or "engine weights equal the updated model after every step"), t0)


def common(out: Path) -> dict:
    return dict(output_dir=str(out), max_steps=3, logging_steps=1, save_strategy="no", report_to="none",
                lr_scheduler_type="constant", seed=0, use_cpu=SMOKE)


def check_latro(tmp: Path) -> None:
    t0 = time.time()
    model, tok = smollm2()
    cfg = LaTROConfig(**common(tmp / "latro"), model=spec(), dataset="testbed", n_train=16,
                      num_generations=4, per_device_train_batch_size=8, max_rationale_length=32, beta=0.05,
                      learning_rate=1e-3, rollout_batch_size=64, rollout_backend=backend())
    run_trainer("latro", LaTROTrainer(model=model, args=cfg, processing_class=tok), WeightProbe(tok, "latro"), t0)


def check_gfpo(tmp: Path) -> None:
    """GFPO from an 'SSFT' model: SmolLM2 with <think1..4> added and saved (vLLM starts from a directory whose
    vocabulary matches), tags_only: the pushed weights are PEFT TrainableTokens merged."""
    t0 = time.time()
    tags = ssft.forking_tags(4)
    base, tok = models.load(spec(), add_tokens=tags)
    path = tmp / "smollm2-tags"
    base.save_pretrained(path)
    tok.save_pretrained(path)
    model, tok = models.load(str(path))
    cfg = GFPOConfig(**common(tmp / "gfpo"), model=str(path), dataset="testbed", dataset_size=16, num_tags=4,
                     num_generations=4, per_device_train_batch_size=4, max_new_tokens=32, tags_only=True,
                     learning_rate=5e-1, generation_batch_size=64, rollout_backend=backend())
    # a reward that varies within every group, so the advantages (and the tag-row updates) are never all zero
    trainer = GFPOTrainer(model=model.to(device()), args=cfg, processing_class=tok,
                          reward_fn=lambda problem, text: float(len(text) % 3))
    # only the tag rows move: probe continuations after a tag, where they matter
    prompts = [chat.generation_prompt(tok, [{"role": "user", "content": p}]) + [t]
               for p, t in zip(PROBES, trainer.tag_ids)]
    run_trainer("gfpo", trainer, WeightProbe(tok, "gfpo", prompts), t0)


def check_rise(tmp: Path) -> None:
    """The recipe's loop, 3 rounds of: collect 2-turn episodes with vLLM rollouts -> one RISE training step;
    each round's collection must push the weights the previous round trained."""
    t0 = time.time()
    model, tok = smollm2()
    env, probs = Env("verify", False), data.load_problems("testbed", n=8, split="train", seed=0)
    probe = WeightProbe(tok, "rise")
    for it in range(3):  # the probe after each step pushed the new weights: collection samples from them
        trajs = collect(model, tok, probs, env, turns=2, samples=[1, 4], temperature=1.0, max_new_tokens=48,
                        seed=it, batch_size=64, progress=False, backend=backend())
        args = RISEConfig(**{**common(tmp / f"rise-{it}"), "max_steps": 1}, per_device_train_batch_size=4,
                          learning_rate=1e-3)
        trainer = RISETrainer(model=model, args=args, train_dataset=trajs, processing_class=tok)
        trainer.add_callback(probe)
        trainer.train()
        model = trainer.model
    ok = probe.steps == 3 and not probe.errors
    report(f"rise 3 collect/train rounds with {backend()} rollouts", ok,
           "; ".join(probe.errors[:3]) or "every collection after a training step used the new weights", t0)


# ------------------------------------------------------------------------------------------------- (d)

def check_speed() -> None:
    t0 = time.time()
    model, tok = smollm2()
    kw = dict(temperature=0.0, max_new_tokens=128, batch_size=64, progress=False, suppress_eos=True)
    rollout.sample(model, tok, QUESTIONS[:4], backend=backend(), **{**kw, "max_new_tokens": 8})  # warm-up/push
    rate = {}
    for b in (backend(), "generate"):
        if device() == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = rollout.sample(model, tok, QUESTIONS, backend=b, **kw)
        if device() == "cuda":
            torch.cuda.synchronize()
        rate[b] = sum(len(r[0].ids) for r in out) / (time.perf_counter() - t)
    print(f"RATIO gpu_{backend()}_over_generate_bs64={rate[backend()] / rate['generate']:.2f}")
    report("speed batch 64", True, f"{backend()} {rate[backend()]:.0f} tok/s, generate {rate['generate']:.0f} tok/s "
                                   f"(x{rate[backend()] / rate['generate']:.1f})", t0)


def main() -> int:
    global SMOKE
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=ALL, default=list(ALL))
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    SMOKE = args.cpu_smoke
    if not SMOKE:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible to torch (is the CUDA build of torch installed?)")
            return 2
        try:
            vllm_engine.check_available()
        except vllm_engine.BackendUnavailable as e:
            print(f"gpu_check: {e}")
            return 2
        os.environ.setdefault("PONDER_VLLM_GPU_MEMORY", "0.25")
        os.environ.setdefault("PONDER_VLLM_MAX_MODEL_LEN", "2048")
        print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.only:
            if name == "gfpo" and not SMOKE and len(args.only) > 1:
                # GFPO starts its engine from another directory (the model with tags): a process of its own,
                # so the first engine's GPU memory is not held twice
                t0 = time.time()
                proc = subprocess.run([sys.executable, __file__, "--only", "gfpo"], env={
                    **os.environ, "PONDER_VLLM_ENFORCE_EAGER": "1"})
                report("gfpo (subprocess)", proc.returncode == 0, f"exit status {proc.returncode}", t0)
                continue
            try:
                {"flex": check_flex, "greedy": check_greedy, "speed": check_speed,
                 "latro": lambda: check_latro(tmp), "gfpo": lambda: check_gfpo(tmp),
                 "rise": lambda: check_rise(tmp)}[name]()
            except Exception as e:  # one failing check must not hide the others
                traceback.print_exc()
                report(name, False, f"{type(e).__name__}: {e}".splitlines()[0], time.time())
    failed = [n for n, ok, _, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in {time.time() - start:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
