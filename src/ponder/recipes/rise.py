"""`ponder rise`: the RISE loop (arXiv 2407.18219) — evaluate the base model, then per iteration collect
trajectories with the newest model, convert them, train (`RISETrainer`), evaluate — and its report, plot and
demo. The pieces are `ponder.rise` (environment, collection, conversion, evaluation) and
`ponder.trainers.rise` (the reward-weighted trainer)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from ponder import ui
from ponder.config import check_choice, load_config, to_yaml
from ponder.engine import data, dist, models, rollout
from ponder.engine.data import write_jsonl
from ponder.methods import episodes, rise
from ponder.methods.episodes import HEADLINE, Env, evaluate
from ponder.methods.rise import collect, collection_summary
from ponder.recipes import report as reports
from ponder.recipes.common import (
    effect_note,
    episode_eval,
    finish_run,
    resume_arg,
    save_final,
    start_run,
    write_json,
)
from ponder.recipes.report import pct
from ponder.trainers.base import ADAPTER_DIR
from ponder.trainers.configs import check_unit_size, config, option
from ponder.trainers.rise import RISEConfig, RISETrainer


@config
class RISERunConfig(RISEConfig):
    """The recipe's settings on top of the trainer's: collection (arXiv 2407.18219 §4, official
    `workflow_gen.py`), evaluation (§5, `workflow_eval.py`) and the number of iterations."""
    # -- collection
    dataset: str | None = option("testbed", "problems: testbed | rg:<task> | file.jsonl | hf:...")
    n_train: int = option(512, "problems collected per iteration (fresh ones)")
    collect_turns: int = option(2, "turns per collected episode")
    samples: list[int] = option([1, 8], "candidates per turn, best-of-n (last value repeats); [1, 16] = the "
                                        "official self-distillation")
    teacher: str | None = option(None, "distillation: a model spec for teacher turns")
    teacher_turns: list[int] | None = option(None, "0-based turns played by the teacher (default: all after the "
                                                   "first)")
    temperature: float = option(1.0, "collection sampling temperature")
    max_new_tokens: int = option(256, "per attempt")
    rollout_batch_size: int = option(64, "sequences per sampling batch")
    rollout_backend: str = option("auto", "sampler: auto | generate | lean | vllm | vllm-server (docs/methods.md §6)")
    rollout_dtype: str = option("auto", "collection's precision: auto (bfloat16 when training runs under bf16 "
                                        "autocast and the backend is lean or generate, else float32) | float32 | "
                                        "bfloat16 (a bf16 copy of the weights; docs/methods.md §6.5)")
    reward: str = option("verify", "verify (ponder.verify.score) | rise_official (the official GSM8K reward "
                                   "+1/0/-1; alias gsm8k)")
    demo: bool = option(False, "instruction + one-shot demo prefix (math chat models)")
    iterations: int = option(1, "collect -> train rounds, each with the newest model")
    # -- evaluation
    n_eval: int = option(200, "held-out problems")
    eval_split: str = option("test", "split of `dataset` to evaluate on")
    eval_turns: int = option(5, "sequential turns")
    eval_parallel: int = option(5, "parallel first-turn samples (m5@t1)")
    context_window: int = option(2, "sliding window; 0 = full history")
    eval_temperature: float = option(1.0, "the official evaluation samples at 1.0")
    eval_base: bool = option(True, "evaluate the starting model too")
    unit_size: int | None = option(None, "problems per work unit of collection and evaluation (each unit seeded "
                                         "on its own; default one unit per process); set it to get the same "
                                         "results for any number of processes")

    def __post_init__(self):
        check_choice("reward", self.reward, episodes.REWARDS)
        if isinstance(self.samples, int):
            self.samples = [self.samples]
        if not self.samples or any(not isinstance(n, int) or n < 1 for n in self.samples):
            raise ValueError(f"samples must be a list of positive integers, got {self.samples!r}")
        if self.collect_turns < 1 or self.eval_turns < 1 or self.iterations < 0:
            raise ValueError("collect_turns and eval_turns must be >= 1 and iterations >= 0")
        rollout.check_dtype(self.rollout_dtype, self.rollout_backend)
        rollout.check_backend(self.rollout_backend)
        check_unit_size(self.unit_size)
        super().__post_init__()
        self.rollout_dtype = rollout.resolve_dtype(self.rollout_dtype, self.rollout_backend, bool(self.bf16))


def run_rise(config_path, overrides: list[str]) -> dict[str, Any]:
    """`ponder rise -c CONFIG key=value ...`."""
    cfg = load_config(RISERunConfig, config_path, overrides)
    return run(cfg, config_text=to_yaml(cfg))

def run(cfg, config_text: str | None = None) -> dict[str, Any]:
    """`ponder rise`: evaluate the base model, then per iteration collect trajectories with the newest model,
    convert them, train (`RISETrainer`), evaluate; write runs/<name>/{config.yaml, iter-k/trajectories.jsonl,
    iter-k/final/, iter-k/iteration.json, eval/*.jsonl, metrics.json, report.md, accuracy_by_turn.png}.

    Several processes (`accelerate launch`): every process collects and evaluates its share of the problems
    (`unit_size`), all get the gathered trajectories, train data-parallel, and rank 0 writes the files.
    ``resume_from_checkpoint: last`` resumes a run that was stopped: finished evaluations and iterations are
    read back from their files (an iteration is finished once its ``iteration.json`` is written, after its
    ``final/``), collected trajectories are reused, and training resumes from its last checkpoint."""
    t0 = time.time()
    out, resume = start_run(cfg, write_config=config_text is not None), resume_arg(cfg) is True
    model, tok = models.load(cfg.model, dtype=cfg.dtype, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code)
    teacher = models.load(cfg.teacher, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code) if cfg.teacher \
        else None
    env = Env(cfg.reward, cfg.demo, history_reasoning=cfg.history_reasoning)
    test = data.load_problems(cfg.dataset, n=cfg.n_eval, split=cfg.eval_split, seed=cfg.seed)
    results: dict[str, Any] = {"config": {k: getattr(cfg, k) for k in _RUN_FIELDS}, "evals": {}, "iterations": []}

    def do_eval(name):
        r = results["evals"][name] = episode_eval(model, tok, test, cfg, name, out, resume)
        return r

    if cfg.eval_base:
        do_eval("base")
    for it in range(1, cfg.iterations + 1):
        it_dir = out / f"iter-{it}"
        done = it_dir / "iteration.json"
        if resume and done.exists():
            ui.info(f"[bold]iteration {it}/{cfg.iterations}[/]: finished before this resume; its model: "
                    f"{it_dir / 'final'}")
            results["iterations"].append(json.loads(done.read_text()))
            model = load_iteration_model(cfg, it_dir / "final")
            do_eval(f"iter-{it}")
            continue
        t = time.time()
        if resume and (it_dir / "trajectories.jsonl").exists():
            ui.info(f"[bold]iteration {it}/{cfg.iterations}[/]: trajectories collected before this resume")
            trajs = rise.load_trajectories(it_dir / "trajectories.jsonl")
        else:
            ui.info(f"[bold]iteration {it}/{cfg.iterations}[/]: collecting {cfg.n_train} episodes "
                    f"({cfg.collect_turns} turns, samples per turn {cfg.samples})")
            probs = data.load_problems(cfg.dataset, n=cfg.n_train, split="train", seed=cfg.seed + it)
            trajs = collect(model, tok, probs, env, turns=cfg.collect_turns, samples=cfg.samples, teacher=teacher,
                            teacher_turns=cfg.teacher_turns, temperature=cfg.temperature,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7919 * it,
                            batch_size=cfg.rollout_batch_size, unit_size=cfg.unit_size,
                            backend=cfg.rollout_backend, dtype=cfg.rollout_dtype)
            if dist.is_main():
                write_jsonl(it_dir / "trajectories.jsonl", trajs)
        collect_s = time.time() - t
        summary = collection_summary(trajs)
        ui.print_table(f"iteration {it}: collection", ["turn", "episodes", "chosen attempt correct",
                                                       "candidates correct"],
                       [(b["turn"], b["episodes"], b["success"], b["candidate_success"]) for b in summary["by_turn"]])
        # the model already carries its LoRA adapters (loaded above): the trainer must not add another set
        args = dataclasses.replace(cfg, output_dir=str(it_dir / "train"), dataset=None, lora=None)
        trainer = RISETrainer(model=model, args=args, train_dataset=trajs, processing_class=tok)
        t = time.time()
        ckpt = resume and os.path.isdir(args.output_dir) and get_last_checkpoint(args.output_dir) is not None
        res = trainer.train(resume_from_checkpoint=True if ckpt else None)
        train_s = time.time() - t
        model = trainer.model
        save_final(trainer, it_dir / "final")
        results["iterations"].append({"iteration": it, "collection": summary, "collect_seconds": collect_s,
                                      "train_seconds": train_s, "train_loss": res.training_loss,
                                      "steps": res.global_step,
                                      "data": {k: dict(v) for k, v in trainer.data_stats.items()}})
        write_json(done, results["iterations"][-1])
        do_eval(f"iter-{it}")
    return finish_run(out, results, t0, lambda: write_report(out, results, cfg))


def load_iteration_model(cfg, final: Path):
    """The model an earlier iteration trained, to go on from after a resume: its saved weights, or with LoRA the
    base model with the adapter saved beside the merged model (``final/adapter``), so training goes on on the
    adapters as in an uninterrupted run. (Runs from before the merged save hold the adapter in ``final`` itself.)"""
    adapter = next((d for d in (final / ADAPTER_DIR, final) if (d / "adapter_config.json").exists()), None)
    if adapter is None:
        return models.load(str(final), dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)[0]
    model = models.load(cfg.model, dtype=cfg.dtype, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code)[0]
    set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
    return model


_RUN_FIELDS = ("model", "dataset", "reward", "demo", "history_reasoning", "iterations", "n_train", "collect_turns", "samples",
               "teacher", "temperature", "tau", "criteria", "remove_duplicates", "only_success", "mode",
               "max_steps", "learning_rate", "per_device_train_batch_size", "n_eval", "eval_turns",
               "eval_parallel", "context_window", "eval_temperature", "max_new_tokens", "seed")


def write_report(out: Path, results: dict[str, Any], cfg) -> Path:
    """report.md (and sections.json, so `ponder report` re-renders it with these tables) and
    accuracy_by_turn.png. Percentages; a rate with no cases (e.g. accuracy after a correct turn when no turn was
    correct) is "—"."""
    evals = results["evals"]
    T, k = cfg.eval_turns, cfg.eval_parallel
    keys = list(dict.fromkeys(h.format(k=k, T=T) for h in HEADLINE))  # k = 1: m1@t1 once
    intro = [f"{cfg.iterations} iteration(s); collection: {cfg.n_train} problems, {cfg.collect_turns} turns, "
             f"samples per turn {cfg.samples}" + (f", teacher {cfg.teacher}" if cfg.teacher else "") +
             f"; weights exp(r/{cfg.tau}), criteria {cfg.criteria}; training {cfg.max_steps} steps per iteration "
             f"({cfg.mode}).", "",
             f"Evaluation on {cfg.n_eval} {cfg.eval_split} problems: {T} sequential turns (feedback always "
             f"\"incorrect\", context window {cfg.context_window}) and {k} parallel first-turn samples, "
             f"temperature {cfg.eval_temperature}. m1@t{T}: majority over the turns' answers (ties: earliest "
             f"turn); p1@t{T}: some turn correct (oracle). \"{ui.UNDEFINED}\": no cases to take a rate over."]
    if evals:
        reports.plot_by_turn(evals, out / "accuracy_by_turn.png")
    diag = [("right_after_wrong", "accuracy after a wrong turn"), ("right_after_right", "accuracy after a correct turn"),
            ("repeats_shown_wrong", "repeats the wrong answer it was shown"),
            ("fresh_gives_shown_wrong", "a fresh sample gives that wrong answer")]
    sections = [
        {"title": "Evaluation (%)", "columns": ["model", *keys, "answer changed between turns"],
         "rows": [[name, *(pct(r[x]) if x in r else "-" for x in keys), pct(r.get("changed_answer_rate"))]
                  for name, r in evals.items()]},
        {"title": "Accuracy (%) at each turn", "columns": ["model", *(f"t{j + 1}" for j in range(T))],
         "rows": [[name, *(pct(a) for a in r["accuracy_by_turn"])] for name, r in evals.items()],
         "plots": ["accuracy_by_turn.png"] if evals else []},
        {"title": "Self-correction diagnostics (%, over turns 2..T)", "columns": ["model", *(d for _, d in diag)],
         "rows": [[name, *(pct(r.get(x)) if x in r else "-" for x, _ in diag)] for name, r in evals.items()]}]
    for itr in results["iterations"]:
        c = itr["collection"]
        d = itr["data"].get("train", {})
        sections.append({
            "title": f"Iteration {itr['iteration']}",
            "text": [f"Collection ({itr['collect_seconds']:.0f} s): {c['episodes']} episodes, {pct(c['success'])}% "
                     f"solved within {cfg.collect_turns} turns. Training ({itr['train_seconds']:.0f} s): "
                     f"{itr['steps']} steps, loss {ui.fmt(itr['train_loss'])}."],
            "columns": ["turn", "episodes", "chosen attempt correct (%)", "candidates correct (%)"],
            "rows": [[b["turn"], b["episodes"], pct(b["success"]), pct(b["candidate_success"])] for b in c["by_turn"]],
            "notes": ["Training data: " + ", ".join(f"{key} {ui.fmt(v)}" for key, v in sorted(d.items()))]})
    return reports.write(out, f"RISE: {cfg.model} on {cfg.dataset}", sections, intro)


# ----------------------------------------------------------------------------------------------------------
# `ponder demo` hook
# ----------------------------------------------------------------------------------------------------------


def demo(run_dir: Path, base: str, problems: list, quick: bool = False, *, n_train: int = 320, steps: int = 60,
         lr: float = 1e-4, criteria: str = "better", seed: int = 0) -> dict[str, Any]:
    """A short RISE run for `ponder demo`: one iteration of collection (2-turn episodes, best of n at the second
    turn) with the `base` model, reward-weighted SFT on the trajectories, then the sequential (5 turns, feedback
    always "incorrect") and parallel (5 samples) evaluation of base and RISE on `problems`. Writes
    ``rise_accuracy_by_turn.png`` into `run_dir` and returns the demo table (base vs RISE: m1@t1, m5@t1, m1@t5,
    p1@t5). ``quick``: a few problems, 2 turns and a few steps — a structural check, not a result.

    The full mode is a reduced `configs/rise/testbed.yaml` (320 instead of 2x1024 collected episodes, 60 steps of 8
    instead of 2x100 of 16) sized to about a minute on two cores; docs/results/rise.md has the full run and why
    the demo collects 320 episodes (with 160 and 30 steps turn 1 fell 2-5 points on one seed)."""
    t0 = time.time()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        problems = list(problems)[:6]
        n_train, samples, steps, T, k, new = 6, [1, 2], 2, 2, 2, 32
    else:
        samples, T, k, new = [1, 8], 5, 5, 64
    env = Env()
    model, tok = models.load(str(base))
    eval_kw = dict(env=env, turns=T, parallel=k, context_window=2, temperature=0.5, max_new_tokens=new,
                   seed=0, batch_size=256, progress=not quick)
    evals: dict[str, dict[str, Any]] = {}
    ui.info(f"[bold]rise[/]: evaluating the base model on {len(problems)} problems ({T} turns, {k} parallel)")
    evals["base"] = evaluate(model, tok, problems, **eval_kw)
    train = data.load_problems("testbed", n=n_train, split="train", seed=1)
    ui.info(f"[bold]rise[/]: collecting {n_train} 2-turn episodes (samples per turn {samples})")
    t = time.time()
    trajs = collect(model, tok, train, env, turns=2, samples=samples, temperature=1.0, max_new_tokens=new,
                    seed=7919, batch_size=256, progress=not quick)
    collect_s = time.time() - t
    args = RISEConfig(output_dir=str(run_dir / "rise-train"), criteria=criteria, max_steps=steps,
                      per_device_train_batch_size=8, learning_rate=lr, lr_scheduler_type="cosine",
                      warmup_steps=0.04, weight_decay=0.0, logging_steps=max(steps // 4, 1), save_strategy="no",
                      report_to="none", disable_tqdm=quick, seed=seed)
    trainer = RISETrainer(model=model, args=args, train_dataset=trajs, processing_class=tok)
    t = time.time()
    trainer.train()
    train_s = time.time() - t
    model = trainer.model
    ui.info(f"[bold]rise[/]: evaluating the RISE model on {len(problems)} problems")
    evals["RISE"] = evaluate(model, tok, problems, **eval_kw)
    for r in evals.values():
        r.pop("records")
    plot = "rise_accuracy_by_turn.png"
    reports.plot_by_turn(evals, run_dir / plot)

    keys = [h.format(k=k, T=T) for h in HEADLINE[:4]]
    columns = ["model"] + keys + [f"acc t{j + 1}" for j in range(T)]
    rows = [[name] + [round(100 * r[x], 1) for x in keys] + [round(100 * a, 1) for a in r["accuracy_by_turn"]]
            for name, r in evals.items()]
    b, r = evals["base"]["per_problem"], evals["RISE"]["per_problem"]
    md = "docs/results/rise.md"
    notes = [effect_note(f"RISE m1@t{T} − m1@t1 (the paper: later turns beat the first)", r[f"m1@t{T}"],
                         r["m1@t1"], md),
             effect_note("RISE m1@t1 − base m1@t1 (the paper: turn 1 is not hurt)", r["m1@t1"], b["m1@t1"], md, ">="),
             effect_note(f"RISE m1@t{T} − m{k}@t1 (sequential vs parallel at equal samples)", r[f"m1@t{T}"],
                         r[f"m{k}@t1"], md),
             f"One iteration: {n_train} episodes collected in {collect_s:.0f} s (best of {samples[-1]} at turn 2), "
             f"{steps} reward-weighted SFT steps (exp(r/0.4), criteria {criteria}) in {train_s:.0f} s; evaluation at "
             f"temperature 0.5, feedback always \"incorrect\", context window 2; % of {len(problems)} problems.",
             f"Accuracy by turn, base: {_pct(evals['base']['accuracy_by_turn'])}; RISE: "
             f"{_pct(evals['RISE']['accuracy_by_turn'])}."]
    metrics = {name: {x: r[x] for x in keys + ["accuracy_by_turn", "majority_by_turn", "pass_by_turn",
                                               "changed_answer_rate"]} for name, r in evals.items()}
    metrics["seconds"] = time.time() - t0
    return {"title": f"RISE: multi-turn self-correction ({len(problems)} held-out problems, %)",
            "columns": columns, "rows": rows, "plots": [plot], "notes": notes, "metrics": metrics,
            "vs_start": {"metric": "m1@t1 %", "start": b["m1@t1"], "end": r["m1@t1"]}}


def _pct(xs) -> str:
    return " -> ".join(f"{100 * x:.1f}" for x in xs)
