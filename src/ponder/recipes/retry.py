"""`ponder retry`: multi-turn retry RL with earlier reasoning hidden, each episode trained as one tree
(`ponder.trainers.retry.RetryTrainer`, docs/methods.md §7) — evaluate the starting model, train, evaluate the
trained model with RISE's sequential + parallel evaluation (`ponder.episodes.evaluate`: m1@t1, m{k}@t1, m1@t{T},
p1@t{T}, accuracy by turn), and write runs/<name>/{config.yaml, final/, eval/*.jsonl, metrics.json, report.md,
accuracy_by_turn.png}. The report puts the trained model's single-turn accuracy (m1@t1) next to the base
model's: multi-turn training can trade turn-1 accuracy for later turns."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ponder.config import load_config, to_yaml
from ponder.engine import data, models
from ponder.methods.episodes import HEADLINE
from ponder.recipes import report as reports
from ponder.recipes.common import episode_eval, finish_run, resume_arg, save_final, start_run
from ponder.recipes.report import pct
from ponder.trainers.retry import RetryConfig, RetryTrainer

#: The recipe reads the trainer's config (its evaluation fields included).
RetryRunConfig = RetryConfig


_RUN_FIELDS = ("model", "dataset", "n_train", "num_generations", "max_turns", "history_reasoning", "context_window",
               "reward", "advantage", "credit", "gamma", "beta", "loss_normalization", "layout", "temperature",
               "max_new_tokens", "max_steps", "learning_rate", "per_device_train_batch_size", "lora", "eval_dataset",
               "n_eval", "eval_turns", "eval_parallel", "eval_temperature", "seed")


def run_retry(config_path, overrides: list[str]) -> dict[str, Any]:
    """`ponder retry -c CONFIG key=value ...`."""
    cfg = load_config(RetryConfig, config_path, overrides)
    return run(cfg, config_text=to_yaml(cfg))


def run(cfg: RetryConfig, config_text: str | None = None) -> dict[str, Any]:
    """Evaluate the base model, train, evaluate the trained model; metrics.json, report.md and the plot.
    ``resume_from_checkpoint: last`` reads a finished base evaluation back and resumes training."""
    t0 = time.time()
    out, resume = start_run(cfg, write_config=config_text is not None), resume_arg(cfg) is True
    model, tok = models.load(cfg.model, dtype=cfg.dtype, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code)
    test = data.load_problems(cfg.eval_dataset or cfg.dataset, n=cfg.n_eval, split=cfg.eval_split,
                              seed=cfg.problem_seed())
    results: dict[str, Any] = {"config": {k: getattr(cfg, k) for k in _RUN_FIELDS}, "evals": {}}

    def do_eval(name):
        t = time.time()
        results["evals"][name] = episode_eval(model, tok, test, cfg, name, out, resume, progress=False)
        results[f"{name}_eval_seconds"] = time.time() - t

    if cfg.eval_base:
        do_eval("base")
    # the model already carries the config's LoRA adapters (loaded above): the trainer must not add another set
    trainer = RetryTrainer(model=model, args=dataclasses.replace(cfg, lora=None), processing_class=tok)
    t = time.time()
    res = trainer.train(resume_from_checkpoint=resume_arg(cfg))
    results["train"] = {"seconds": time.time() - t, "steps": res.global_step, "train_loss": res.training_loss,
                        "log_history": trainer.state.log_history,
                        "sampled_attempts": trainer.sampled["attempts"], "sampled_tokens": trainer.sampled["tokens"]}
    model = trainer.model
    save_final(trainer, out / "final")
    do_eval("trained")
    return finish_run(out, results, t0, lambda: write_report(out, results, cfg))


def _train_means(history: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    vals = [h[key] for h in history if key in h]
    if not vals:
        return None
    k = max(1, len(vals) // 4)
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def write_report(out: Path, results: dict[str, Any], cfg: RetryConfig) -> Path:
    """report.md (and sections.json, so `ponder report` re-renders it with these tables) and
    accuracy_by_turn.png; percentages."""
    evals = results["evals"]
    T, k = cfg.eval_turns, cfg.eval_parallel
    keys = list(dict.fromkeys(h.format(k=k, T=T) for h in HEADLINE))  # k = 1: m1@t1 once
    tr = results["train"]
    intro = [f"Training: {tr['steps']} steps ({tr['seconds']:.0f} s), {cfg.per_device_train_batch_size} problems per "
             f"step x G = {cfg.num_generations} episodes of up to T = {cfg.max_turns} attempts; history reasoning "
             f"{cfg.history_reasoning}; advantages {cfg.advantage} per turn, credit {cfg.credit}"
             + (f" (gamma {cfg.gamma})" if cfg.credit == "return" else "") + f"; beta {cfg.beta}; layout "
             f"{cfg.layout}; lr {cfg.learning_rate}.", "",
             f"Evaluation on {len(evals.get('trained', {}).get('per_problem', {}).get('m1@t1', [])) or cfg.n_eval} "
             f"{cfg.eval_split} problems: {T} sequential turns (feedback always \"incorrect\", context window "
             f"{cfg.context_window or 'all'}) and {k} parallel first-turn samples, temperature "
             f"{cfg.eval_temperature}. m1@t1 is single-turn accuracy: the guard against multi-turn training "
             "trading it away.", "", f"Wall time {results['seconds']:.0f} s."]
    notes = []
    if "base" in evals and "trained" in evals:
        d = 100 * (evals["trained"]["m1@t1"] - evals["base"]["m1@t1"])
        notes.append(f"Single-turn accuracy (m1@t1): base {pct(evals['base']['m1@t1'])}%, trained "
                     f"{pct(evals['trained']['m1@t1'])}% ({d:+.1f} points; one seed — see the lead's multi-seed runs "
                     "before reading an effect into it).")
    if evals:
        reports.plot_by_turn(evals, out / "accuracy_by_turn.png")
    sections = [
        {"title": "Evaluation (%)", "columns": ["model", *keys],
         "rows": [[name, *(pct(r[x]) if x in r else "-" for x in keys)] for name, r in evals.items()],
         "notes": notes},
        {"title": "Accuracy (%) at each turn", "columns": ["model", *(f"t{j + 1}" for j in range(T))],
         "rows": [[name, *(pct(a) for a in r["accuracy_by_turn"])] for name, r in evals.items()],
         "plots": ["accuracy_by_turn.png"] if evals else []}]
    hist = tr["log_history"]
    rows = [(key, _train_means(hist, key)) for key in
            [f"reward/turn{t + 1}" for t in range(cfg.max_turns)] + [f"solved_by_turn{cfg.max_turns}",
                                                                    "attempts_per_episode", "kl", "tokens_ratio"]]
    rows = [[key, *v] for key, v in rows if v is not None]
    if rows:
        tok = _train_means(hist, "tokens_forwarded")
        per = _train_means(hist, "tokens_per_turn_samples")
        sections.append({
            "title": "Training episodes (mean of the first and the last quarter of logged steps)",
            "columns": ["quantity", "first", "last"], "rows": rows,
            "notes": [f"Tokens forwarded per micro-batch: {tok[1]:.0f} as one tree per episode vs {per[1]:.0f} as "
                      "per-turn samples (the same loss and gradient)."] if tok and per else []})
    return reports.write(out, f"Multi-turn retry RL: {cfg.model} on {cfg.dataset}", sections, intro)
