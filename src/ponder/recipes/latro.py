"""`ponder latro`: LaTRO (arXiv 2411.04282) training with periodic held-out evaluation, its report (reward, KL,
advantage spread and accuracy over steps) and its demo (base vs SFT on gold rationales vs LaTRO)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ponder import ui
from ponder.config import check_choice, load_config
from ponder.engine import data, dist, models, testbed
from ponder.methods import metrics
from ponder.recipes import report as reports
from ponder.recipes.common import effect_note, pyplot, resume_arg, save_final, start_run, write_json
from ponder.recipes.report import flatten, pct
from ponder.trainers.latro import LaTROConfig, LaTROTrainer
from ponder.trainers.sft import SFTConfig, SFTTrainer


def run_latro(config_path, overrides: list[str]):
    """`ponder latro -c CONFIG key=value ...`: see `run`."""
    return run(load_config(LaTROConfig, config_path, overrides))


def run(cfg: LaTROConfig) -> dict[str, Any]:
    """LaTRO: train with periodic held-out evaluation, evaluate the final model, write metrics.json and
    report.md with the training-curve PNG (reward, KL, advantage spread, accuracy)."""
    out = start_run(cfg)
    trainer = LaTROTrainer(args=cfg)
    t = time.time()
    result = trainer.train(resume_from_checkpoint=resume_arg(cfg))
    seconds = time.time() - t
    if not any("eval_greedy_accuracy" in h and h["step"] == result.global_step for h in trainer.state.log_history):
        trainer.evaluate()
    save_final(trainer, out / "final")
    final = next(h for h in reversed(trainer.state.log_history) if "eval_greedy_accuracy" in h)
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "seconds": seconds,
               "data": trainer.data_stats, "final_eval": final, "log_history": trainer.state.log_history}
    write_json(out / "metrics.json", metrics)
    report = out / "report.md"
    if dist.is_main():  # several processes: rank 0 writes the report and its plot
        write_report(out, cfg, trainer.state.log_history, {k: v for k, v in metrics.items() if k != "log_history"})
    rows = [("steps", result.global_step), ("seconds", seconds)] + [
        (k.removeprefix("eval_"), v) for k, v in final.items() if k.startswith("eval_")]
    ui.print_table(f"latro: {cfg.model} on {cfg.dataset} (held-out, step {final['step']})", ["metric", "value"], rows)
    ui.info(f"model: {out / 'final'}   metrics: {out / 'metrics.json'}   report: {report}")
    return metrics


PLOTS = (("reward", "self-reward Σ log π(y|x⊕z)"), ("kl", "KL estimate log π − log π₀"),
         ("advantage_std", "advantage spread (std within group)"), ("eval_greedy_accuracy", "held-out accuracy"))


YLABELS = {"reward": "nats (higher is better)", "kl": "nats per rationale", "advantage_std": "nats",
           "eval_greedy_accuracy": "% of held-out problems"}


def series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in log_history if key in h and h[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def figure(log_history: list[dict[str, Any]], title: str = "LaTRO", baselines: dict[str, float] | None = None):
    """The 2x2 figure of `plot` (returned open; `plot` saves and closes it)."""
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, PLOTS):
        xs, ys = series(log_history, key)
        if key == "eval_greedy_accuracy":
            maj = next((k for h in log_history for k in h if k.startswith("eval_maj@")), None)
            if maj:  # hollow and larger, under greedy's filled markers: equal values show both
                mx, my = series(log_history, maj)
                ax.plot(mx, [100 * y for y in my], marker="s", ms=10, mfc="none", color="C1",
                        label=maj.removeprefix("eval_"), zorder=2)
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=5, color="C0", label="greedy", zorder=3)
            for i, (name, v) in enumerate((baselines or {}).items()):  # same colour as the metric it compares to
                ax.axhline(100 * v, linestyle="--", color=f"C{i % 2}", alpha=0.8, label=name)
            ax.set_ylim(-2, 102)  # fixed percentages, whatever the data
            ax.legend()
        elif len(xs) < 20:
            ax.plot(xs, ys, marker="o", label=key)
        else:  # per-log values are noisy (a few questions each): show them faintly under a running mean
            w = max(5, len(xs) // 15)
            ax.plot(xs, ys, alpha=0.3, color="C0")
            ax.plot(xs, [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))],
                    color="C0", label=f"running mean ({w} logs)")
            ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_title(label)
        ax.set_ylabel(YLABELS[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(log_history: list[dict[str, Any]], path: Path, title: str = "LaTRO",
         baselines: dict[str, float] | None = None) -> Path:
    """A 2x2 PNG: self-reward, KL, advantage spread, held-out greedy accuracy and maj@k (%) over steps
    (`baselines`: other models' accuracies, drawn as dashed horizontal lines in the accuracy panel)."""
    fig = figure(log_history, title, baselines)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def write_report(out: Path, cfg: LaTROConfig, log_history: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """runs/<name>/report.md (and sections.json, so `ponder report` re-renders it): the configuration that
    matters, evaluation over steps, the PNG and the run's numbers."""
    png = plot(log_history, out / "latro.png", f"LaTRO: {cfg.model} on {cfg.dataset}")
    evals = [h for h in log_history if "eval_greedy_accuracy" in h]
    maj = next((k for h in evals for k in h if k.startswith("eval_maj@")), None)
    intro = [f"K = {cfg.num_generations}, L = {cfg.max_new_tokens}, β = {cfg.beta}, γ = {cfg.nonstop_penalty}, "
             f"sft_weight = {cfg.sft_weight}, lr = {cfg.learning_rate}, rollouts per step = "
             f"{cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * max(1, cfg.world_size)}, "
             f"steps = {summary.get('steps')}, {summary.get('seconds', 0):.0f} s."]
    n_eval = (summary.get("data") or {}).get("eval", {}).get("problems")
    sections = [
        {"title": "Training curves", "plots": [png.name]},
        {"title": "Held-out evaluation (%)" + (f", {n_eval} problems" if n_eval else ""),
         "columns": ["step", "greedy accuracy", *([maj.removeprefix("eval_")] if maj else []), "sample accuracy"],
         "rows": [[h["step"], pct(h["eval_greedy_accuracy"]), *([pct(h.get(maj))] if maj else []),
                   pct(h.get("eval_sample_accuracy"))] for h in evals]},
        {"title": "Summary", "columns": ["metric", "value"],
         "rows": [list(r) for r in flatten(summary)]}]
    return reports.write(out, f"LaTRO: {cfg.model} on {cfg.dataset}", sections, intro)


# ----------------------------------------------------------------------------------------------------------
# pieces of `ponder experiment` runs (docs/results/latro.md, docs/results/likelihood-rewards.md)
# ----------------------------------------------------------------------------------------------------------

CURVES = ("eval_greedy_accuracy", "rationale_length", "reward", "kl", "rollout_tokens")


def curves(log_history: list[dict[str, Any]], keys=CURVES) -> dict[str, list[list[float]]]:
    """{key: [[step, value], ...]} over training, for plots of several seeds."""
    return {k: [list(p) for p in zip(*series(log_history, k))] for k in keys}


def training_summary(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Rationale length at the start, end (first / last 10% of the logged updates) and on average over
    training, and the rollout tokens sampled in all (the budget the arms of an experiment share)."""
    _, lens = series(log_history, "rationale_length")
    out: dict[str, float] = {}
    if lens:
        w = max(1, len(lens) // 10)
        out.update(rationale_length_start=sum(lens[:w]) / w, rationale_length_end=sum(lens[-w:]) / w,
                   rationale_length_mean=sum(lens) / len(lens))
    steps, toks = series(log_history, "rollout_tokens")
    if toks:  # each log holds the mean over the updates since the previous log
        out["rollout_tokens"] = sum(v * (s - p) for v, s, p in zip(toks, steps, [0] + steps[:-1]))
    return out


def rg_rationale(problem) -> str | None:
    """A worked gold rationale for a reasoning-gym problem whose entry carries the facts it needs, else None:
    ``basic_arithmetic`` / ``chain_sum`` (the expression, summed term by term from the left — the tasks' own
    order when there are no parentheses or ``*``), ``leg_counting`` (each animal's legs, from the package's
    own table) and ``family_relationships`` (the story, restated). Read from the entry,
    never evaluated."""
    entry, task = problem.meta.get("entry") or {}, str(problem.meta.get("task", ""))
    meta = entry.get("metadata") or {}
    if task in ("rg:basic_arithmetic", "rg:chain_sum"):
        parts = str(meta.get("expression", "")).split()
        if len(parts) == 3 and parts[0].lstrip("-").isdigit() and parts[2].lstrip("-").isdigit():
            return f"{' '.join(parts)} = {problem.answer}."
        if len(parts) >= 3 and len(parts) % 2 and set(parts[1::2]) <= {"+", "-"}:
            total, steps = int(parts[0]), []
            for op, x in zip(parts[1::2], parts[2::2]):
                new = total + int(x) if op == "+" else total - int(x)
                steps.append(f"{total} {op} {x} = {new}")
                total = new
            return ". ".join(steps) + "."
        return None
    if task == "rg:family_relationships":
        # the story restated, then "X to Y:" — the relation itself is left to the answer (a rationale that does not
        # spell it out). Not "X is Y's <relation>": reasoning-gym names in-law relations the other way round ("What
        # relation is Patricia to Jack?" -> father-in-law when Patricia married Jack's son).
        p1, p2 = str(meta.get("person1", "")), str(meta.get("person2", ""))
        story = problem.question.split("\n\n")[0].strip()
        return f"{story} We want {p1} to {p2}." if p1 and p2 and story else None
    if task == "rg:leg_counting":
        from reasoning_gym.arithmetic.leg_counting import ANIMALS
        animals = meta.get("animals") or {}
        lines, totals = [], []
        for name, count in animals.items():
            legs = ANIMALS[name]
            lines.append(f"A {name} has {legs} legs, so {count} × {legs} = {count * legs}.")
            totals.append(str(count * legs))
        return " ".join(lines) + (f" In total {' + '.join(totals)} = {problem.answer}." if len(totals) > 1 else "")
    return None


def gold_conversations(problems, strategy: str = "direct", prompt_template: str = "{question}",
                       answer_template: str = "The answer is {answer}.") -> list[list[dict[str, Any]]]:
    """SFT on gold rationales for exactly the given problems (LaTRO's baseline: the same questions).

    Testbed problems (`testbed:words`: the answer in words): strategy is the rationale's format, ``direct`` (the
    one the testbed was pre-trained on) or another of `ponder.testbed.STRATEGIES` (gold rationales written
    differently from the model's own, as human-written GSM8K solutions are for an LLM). Other problems:
    ``direct`` is the worked rationale of `rg_rationale` followed by `answer_template` in the user message
    `prompt_template` (the format LaTRO samples in); ``answer`` is the answer alone (SFT on gold answers, for
    tasks with no gold rationale)."""
    out = []
    for i, p in enumerate(problems):
        if "a" in p.meta:  # a testbed problem
            check_choice("strategy", strategy, testbed.STRATEGIES)
            arith = testbed.Arith(*(int(p.meta[k]) for k in "abc"))
            reasoning, ans = testbed.solve(arith, strategy)
            answer = testbed.number_words(ans) if p.meta.get("task") == testbed.WORDS_TASK else ans
            out.append([{"role": "user", "content": arith.question},
                        {"role": "assistant", "reasoning": reasoning, "content": testbed.answer_text(answer)}])
            continue
        check_choice("strategy", strategy, ("direct", "answer"))
        rationale = rg_rationale(p) if strategy == "direct" else ""
        if rationale is None:
            raise ValueError(f"problems[{i}] ({p.meta.get('task', 'no task')}): no gold rationale for this task; "
                             "use gold_strategy: answer (the gold answer alone)")
        reply = " ".join(x for x in (rationale, answer_template.format(answer=p.answer)) if x)
        out.append([{"role": "user", "content": prompt_template.format(question=p.question)},
                    {"role": "assistant", "content": reply}])
    return out


def demo(run_dir, base: str, problems: list, quick: bool = False, *, steps: int | None = None,
         questions: int | None = None, k: int = 8, lr: float | None = None, sft_weight: float = 0.0,
         sft_lr: float | None = None, samples: int = 8, seed: int = 0) -> dict:
    """A short version of the testbed experiment for ``ponder demo``: base model vs plain SFT on gold rationales
    vs LaTRO, the two SFT/LaTRO runs with the same data budget (the same number of training questions), greedy
    accuracy and maj@k on the given held-out `problems`. Writes ``latro_demo.png`` (training curves and the
    accuracies) into `run_dir`. quick=True: a few steps on at most 8 problems (checks the plumbing only).
    The keyword arguments make it the full testbed experiment of docs/results/latro.md (e.g. steps=150)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Full mode: DEMO_STEPS updates of DEMO_QUESTIONS questions x K rationales (the testbed config's recipe,
    # shortened); sft_weight = 0 (the official default; see docs/results/latro.md for Eq. 4's sft_weight = 1).
    if quick:
        steps, questions, k, samples, problems = 2, 2, 2, 2, list(problems)[:8]
    steps, questions = steps or DEMO_STEPS, questions or DEMO_QUESTIONS
    lr, sft_lr = lr or DEMO_LR, sft_lr or DEMO_SFT_LR
    n_train = steps * questions
    common = dict(report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=1 if quick else 5,
                  lr_scheduler_type="constant", seed=seed)
    timings, evals, per = {}, {}, {}

    def evaluate(model, tok, name):
        """Greedy accuracy and maj@k of `model` -> evals[name], per-problem results, its time."""
        t = time.time()
        model.eval()
        r = metrics.evaluate(model, tok, problems, samples=samples, max_new_tokens=96, batch_size=128, seed=seed)
        per[name] = {"greedy": [float(x["greedy_correct"]) for x in r["records"]],
                     "maj": [float(metrics.maj_correct(x["answers"], x["correct"])) for x in r["records"]]}
        evals[name] = {"greedy": r["greedy_accuracy"], "maj": r[f"maj@{samples}"]}
        timings[f"eval_{name}"] = time.time() - t

    model, tok = models.load(str(base))
    evaluate(model, tok, "base")

    # LaTRO: K self-sampled rationales per question, self-reward log p("The answer is {gold}." | x, z).
    t = time.time()
    cfg = LaTROConfig(output_dir=str(run_dir / "latro"), model=str(base), num_generations=k,
                      per_device_train_batch_size=questions * k, max_new_tokens=64, max_steps=steps,
                      learning_rate=lr, beta=0.05, sft_weight=sft_weight, prompt_template="{question}",
                      stop=["The answer is"], rollout_batch_size=128, **common)
    train = data.load_problems("testbed", n=n_train, split="train", seed=seed + 1)
    tr = LaTROTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok)
    tr.train()
    timings["train_latro"] = time.time() - t
    evaluate(tr.model, tok, "latro")
    history = tr.state.log_history

    # SFT on gold rationales: the same questions, one gold rationale each, batches of `questions`.
    t = time.time()
    sft_model, _ = models.load(str(base))
    scfg = SFTConfig(output_dir=str(run_dir / "sft"), model=str(base), per_device_train_batch_size=questions,
                     max_steps=steps, learning_rate=sft_lr, **common)
    conv = [testbed.gold_conversation(p) for p in train]
    st = SFTTrainer(model=sft_model, args=scfg, train_dataset=conv, processing_class=tok)
    st.train()
    timings["train_sft"] = time.time() - t
    evaluate(st.model, tok, "sft")

    maj = f"maj@{samples}"
    curve = history + [{"step": 0, "eval_greedy_accuracy": evals["base"]["greedy"], f"eval_{maj}": evals["base"]["maj"]},
                       {"step": steps, "eval_greedy_accuracy": evals["latro"]["greedy"],
                        f"eval_{maj}": evals["latro"]["maj"]}]
    png = plot(curve, run_dir / "latro_demo.png",
               f"LaTRO on the testbed: {steps} steps x {questions} questions x K={k}",
               baselines={"SFT greedy": evals["sft"]["greedy"], f"SFT {maj}": evals["sft"]["maj"]})
    names = {"base": "testbed (base)", "sft": f"SFT on gold rationales ({n_train} questions)",
             "latro": f"LaTRO ({n_train} questions x K={k})"}
    rows = [[names[m], evals[m]["greedy"], evals[m]["maj"]] for m in ("base", "sft", "latro")]
    md = "docs/results/latro-testbed.md"
    notes = [effect_note(f"LaTRO − base, {key} (the paper: above)", per["latro"][key], per["base"][key], md)
             for key in ("greedy", "maj")]
    notes += [effect_note(f"LaTRO − SFT on gold rationales, {key} (the paper: above)", per["latro"][key],
                          per["sft"][key], md) for key in ("greedy", "maj")]
    notes += [f"LaTRO here uses sft_weight = {sft_weight:g} (the official code's default is 0, the paper's Eq. 4 is "
              "1; on the testbed weight 1 makes the model hedge its answers and accuracy drops, docs/results/latro.md).",
              "SFT and LaTRO train on the same questions; SFT gets one gold rationale per question (the testbed's "
              "own 'direct' format), "
              f"LaTRO samples K = {k} of its own and is rewarded by log p(gold answer | rationale)."]
    final = next((h for h in reversed(history) if "reward" in h), {})
    return {"title": "LaTRO: self-rewarding latent reasoning (testbed)",
            "columns": ["model", "greedy accuracy", maj], "rows": rows, "plots": [png.name], "notes": notes,
            "vs_start": {"metric": "greedy accuracy %", "start": per["base"]["greedy"], "end": per["latro"]["greedy"]},
            "metrics": {"evals": evals, "seconds": timings, "steps": steps, "train_questions": n_train, "k": k,
                        "lr": lr, "sft_lr": sft_lr, "sft_weight": sft_weight, "final_reward": final.get("reward"),
                        "final_kl": final.get("kl")}}


# LaTRO's lr: 1e-5 kept the testbed's accuracy and improved it a little; 5e-5 and 2e-4 drifted (KL of several
# nats) and lost accuracy. SFT on gold rationales gets its best of 1e-5, 5e-5, 2e-4 (docs/results/latro.md).
DEMO_STEPS, DEMO_QUESTIONS, DEMO_LR, DEMO_SFT_LR = 30, 4, 1e-5, 5e-5
