"""Recipes: what the CLI sub-commands run. Each reads a config, trains, evaluates and writes `runs/<name>/`
(config.yaml, metrics.json, the final model in `save_pretrained` format, TensorBoard logs)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: Any) -> None:
    import os
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _resume_arg(cfg):
    r = cfg.resume_from_checkpoint
    return True if r in ("last", "true", "True") else r


def run_training(config_cls, trainer_cls, config_path, overrides: list[str], title: str):
    """Config -> trainer -> train -> runs/<name>/{config.yaml, final/, metrics.json} and a summary table."""
    from ponder import ui
    from ponder.config import load_config, to_yaml
    cfg = load_config(config_cls, config_path, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    trainer = trainer_cls(args=cfg)
    t = time.time()
    result = trainer.train(resume_from_checkpoint=_resume_arg(cfg))
    trainer.save_model(str(out / "final"))
    stats = {k: dict(v) for k, v in trainer.data_stats.items()}
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "seconds": time.time() - t,
               "data": stats, "log_history": trainer.state.log_history}
    write_json(out / "metrics.json", metrics)
    rows = [("steps", result.global_step), ("train loss", result.training_loss),
            ("seconds", metrics["seconds"])] + [(f"data: {k}", v) for k, v in sorted(stats["train"].items())]
    ui.print_table(f"{title}: {cfg.model} on {cfg.dataset}", ["metric", "value"], rows)
    ui.info(f"model: {out / 'final'}   metrics: {out / 'metrics.json'}")
    return metrics


def run_sft(config_path, overrides: list[str]):
    from ponder.trainers.sft import SFTConfig, SFTTrainer
    return run_training(SFTConfig, SFTTrainer, config_path, overrides, "sft")


def run_onepass(config_path, overrides: list[str]):
    from ponder.trainers.onepass import OnePassConfig, OnePassTrainer
    return run_training(OnePassConfig, OnePassTrainer, config_path, overrides, "onepass")


def run_rise(config_path, overrides: list[str]):
    """Collect -> train -> evaluate for `iterations` rounds (`ponder.rise.run`)."""
    from ponder.config import load_config, to_yaml
    from ponder.rise import run
    from ponder.trainers.rise import RISEConfig
    cfg = load_config(RISEConfig, config_path, overrides)
    return run(cfg, config_text=to_yaml(cfg))


def run_latro(config_path, overrides: list[str]):
    """LaTRO: train with periodic held-out evaluation, evaluate the final model, write metrics.json and
    report.md with the training-curve PNG (reward, KL, advantage spread, accuracy)."""
    from ponder import ui
    from ponder.config import load_config, to_yaml
    from ponder.trainers.latro import LaTROConfig, LaTROTrainer, write_report
    cfg = load_config(LaTROConfig, config_path, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    trainer = LaTROTrainer(args=cfg)
    t = time.time()
    result = trainer.train(resume_from_checkpoint=_resume_arg(cfg))
    seconds = time.time() - t
    if not any("eval_greedy_accuracy" in h and h["step"] == result.global_step for h in trainer.state.log_history):
        trainer.evaluate()
    trainer.save_model(str(out / "final"))
    final = next(h for h in reversed(trainer.state.log_history) if "eval_greedy_accuracy" in h)
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "seconds": seconds,
               "data": trainer.data_stats, "final_eval": final, "log_history": trainer.state.log_history}
    write_json(out / "metrics.json", metrics)
    report = write_report(out, cfg, trainer.state.log_history, {k: v for k, v in metrics.items()
                                                                   if k != "log_history"})
    rows = [("steps", result.global_step), ("seconds", seconds)] + [
        (k.removeprefix("eval_"), v) for k, v in final.items() if k.startswith("eval_")]
    ui.print_table(f"latro: {cfg.model} on {cfg.dataset} (held-out, step {final['step']})", ["metric", "value"], rows)
    ui.info(f"model: {out / 'final'}   metrics: {out / 'metrics.json'}   report: {report}")
    return metrics


def evaluate_forking_run(model_dir: Path | str, tags: list[str], out: Path, task: str, n: int, per_tag: int,
                         temperature: float, max_new_tokens: int, title: str, seed: int = 0,
                         extra_lines: list[str] | None = None, group_size: int | None = None) -> dict[str, Any]:
    """Forking-token evaluation of a saved model -> out/{eval.json, eval_samples.jsonl, forking.png, report.md}."""
    from ponder import data, models, ssft, ui
    model, tok = models.load(str(model_dir))
    probs = data.load_problems(task, n=n, split="test", seed=seed)
    r = ssft.evaluate_forking(model, tok, probs, tags, per_tag=per_tag, temperature=temperature,
                              max_new_tokens=max_new_tokens, seed=seed, group_size=group_size)
    records = r.pop("records")
    write_json(out / "eval.json", r)
    data.write_jsonl(out / "eval_samples.jsonl", records)
    ssft.plot_forking(r, out / "forking.png", title)
    rows = ssft.summary_rows(r)
    ui.print_table(f"{title}: {n} held-out {task} problems, {len(tags)} tag(s) x {per_tag}", ["metric", "value"], rows)
    lines = [f"# {title}", "", f"Model: `{model_dir}`. {n} held-out `{task}` problems; {per_tag} samples per tag "
             f"at temperature {temperature} (k = {r['k']})" + (f", plus {r['k']} samples with a model-sampled tag."
                                                  if len(tags) > 1 else "."), "",
             "| metric | value |", "|---|---|"] + [f"| {k} | {ui.fmt(v)} |" for k, v in rows]
    lines += ["", "## Per tag", "", "| tag | accuracy | mean tokens | strategies |", "|---|---|---|---|"]
    for t, row in r["per_tag"].items():
        strat = ", ".join(f"{s} {v:.2f}" for s, v in row.get("strategies", {}).items())
        lines.append(f"| `{t}` | {row['accuracy']:.3f} | {row['mean_tokens']:.1f} | {strat} |")
    lines += ["", "![per-tag accuracy, length and strategies](forking.png)", ""] + (extra_lines or [])
    (out / "report.md").write_text("\n".join(lines) + "\n")
    ui.info(f"report: {out / 'report.md'}")
    return r


def run_ssft(config_path, overrides: list[str]):
    """SSFT (or the SFT-mixed / random-assignment baselines) + forking evaluation of the final model."""
    from ponder.config import load_config
    from ponder.trainers.ssft import SSFTConfig, SSFTTrainer
    metrics = run_training(SSFTConfig, SSFTTrainer, config_path, overrides, "ssft")
    cfg = load_config(SSFTConfig, config_path, overrides)
    out = Path(cfg.output_dir)
    if cfg.eval_problems:
        extra = ["## Matching statistics", "", "![matching](matching.png)", ""] if (out / "matching.png").exists() \
            else []
        # SFT-mixed has one tag: k = N·per_tag samples of <think>, voted in groups of N like the tagged runs
        per_tag = cfg.eval_per_tag * (cfg.num_tags if cfg.assignment == "mixed" else 1)
        metrics["eval"] = evaluate_forking_run(out / "final", cfg.tags, out, cfg.eval_task, cfg.eval_problems,
                                               per_tag, cfg.eval_temperature, cfg.eval_max_new_tokens,
                                               f"SSFT ({cfg.assignment})", extra_lines=extra, group_size=cfg.num_tags)
        write_json(out / "metrics.json", metrics)
    return metrics


def run_gfpo(config_path, overrides: list[str]):
    """GFPO from an SSFT model + the tag distribution before/after + forking evaluation of the final model."""
    from ponder import data, models, ui
    from ponder.config import load_config
    from ponder.ssft import forking_tags
    from ponder.trainers.gfpo import GFPOConfig, GFPOTrainer, tag_distribution
    cfg = load_config(GFPOConfig, config_path, overrides)
    probe = data.load_problems(cfg.eval_task, n=100, split="test")

    def dist(spec):
        m, tok = models.load(spec)
        if any(t not in tok.get_vocab() for t in forking_tags(cfg.num_tags)):
            return None  # a model without forking tokens (GFPO adds them)
        return [round(float(x), 4) for x in tag_distribution(m, tok, probe, cfg.num_tags)]

    before = dist(cfg.model)
    metrics = run_training(GFPOConfig, GFPOTrainer, config_path, overrides, "gfpo")
    out = Path(cfg.output_dir)
    after = dist(str(out / "final"))
    metrics["tag_distribution"] = {"before": before, "after": after}
    before = before or [float("nan")] * len(after)
    ui.print_table("mean π(g|x) over 100 held-out problems", ["tag", "before", "after"],
                   [(f"<think{i + 1}>", b, a) for i, (b, a) in enumerate(zip(before, after))])
    if cfg.eval_problems:
        extra = ["## Tag distribution π(g|x) (mean over 100 held-out problems)", "", "| tag | before | after |",
                 "|---|---|---|"] + [f"| `<think{i + 1}>` | {b:.3f} | {a:.3f} |" for i, (b, a) in
                                     enumerate(zip(before, after))]
        metrics["eval"] = evaluate_forking_run(out / "final", forking_tags(cfg.num_tags), out, cfg.eval_task,
                                               cfg.eval_problems, cfg.eval_per_tag, cfg.eval_temperature,
                                               cfg.eval_max_new_tokens, "GFPO", extra_lines=extra)
    write_json(out / "metrics.json", metrics)
    return metrics


def parse_ratios(stdout: str) -> tuple[dict[str, float], list[str]]:
    """`RATIO name=value [# comment]` lines -> {name: value}; lines that do not parse are returned, not fatal."""
    ratios, bad = {}, []
    for ln in stdout.splitlines():
        if ln.startswith("RATIO "):
            name, _, rest = ln[6:].partition("=")
            try:
                ratios[name.strip()] = float(rest.split("#")[0].split()[0])
            except (ValueError, IndexError):
                bad.append(ln)
    return ratios, bad


def run_benchmarks(only: list[str], out: Path) -> dict[str, float]:
    """Run bench/*.py one after another (never in parallel: they time things), keep their output and the
    `RATIO name=value` lines, and write a Markdown summary with the machine, date and commands — rewritten after
    every script, so a failure later on loses nothing."""
    import datetime
    import os
    import platform
    import subprocess
    import sys

    from ponder import ui
    scripts = sorted(Path("bench").glob("*.py"))
    if only:
        scripts = [s for s in scripts if s.stem in only]
    sections: dict[str, str] = {}
    if only and out.exists():  # --only: replace those scripts' sections, keep the others
        for part in out.read_text().split("\n## ")[1:]:
            sections[part.split("\n", 1)[0].strip()] = "## " + part.rstrip() + "\n"
    failed = []
    head = [f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  ",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}  ",
            f"Command: `make bench` (or `ponder bench{''.join(' --only ' + o for o in only)}`)\n"]
    for script in scripts:
        cmd = [sys.executable, str(script)]
        ui.info(f"[bold]bench[/] {' '.join(cmd)}")
        t = time.time()
        # wide enough that rich tables are not squeezed into 80 columns when captured
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        _, bad = parse_ratios(proc.stdout)
        if proc.returncode:
            failed.append(script.stem)
        body = proc.stdout.strip() if proc.returncode == 0 else (proc.stdout + proc.stderr)[-4000:]
        warn = "".join(f"\nUnparsed: `{ln}`" for ln in bad)
        sections[script.stem] = (f"## {script.stem}\n\n`{' '.join(cmd)}` — {time.time() - t:.0f} s, exit "
                                 f"{proc.returncode}{warn}\n\n```\n{body}\n```\n")
        ratios: dict[str, float] = {}
        for sec in sections.values():
            ratios.update(parse_ratios(sec)[0])
        table = ["| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
        status = [f"Failed: {', '.join(failed)}\n"] if failed else []
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(["# Benchmarks\n", *head, *status, *table]) + "\n\n" + "\n".join(sections.values()))
        os.replace(tmp, out)
    ui.info(f"wrote {out}" + (f"   [red]failed: {', '.join(failed)}[/]" if failed else ""))
    return {k: v for sec in sections.values() for k, v in parse_ratios(sec)[0].items()}
