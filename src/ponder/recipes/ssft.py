"""`ponder ssft` / `ponder gfpo`: global forking tokens (arXiv 2510.05132) — training runs with their matching
statistics, the forking-token evaluation of the final model (Pass@1, pass@k, Cons@k, per-tag accuracy,
length and strategy) with its plots, and the SSFT demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ponder import ui
from ponder.config import load_config
from ponder.engine import data, dist, models
from ponder.engine.chat import THINK_OPEN
from ponder.methods import ssft
from ponder.recipes import report as reports
from ponder.recipes.common import effect_note, pyplot, train, write_json
from ponder.trainers.gfpo import GFPOConfig, GFPOTrainer
from ponder.trainers.ssft import SSFTConfig, SSFTTrainer

#: The recipes read the trainers' configs (their evaluation fields included).
SSFTRunConfig = SSFTConfig
GFPORunConfig = GFPOConfig


def write_matching(trainer: SSFTTrainer, out: Path) -> None:
    """The run's matching statistics: ``matching.json`` (counts per source and tag, purity and stability over
    steps) and ``matching.png``."""
    trainer.flush_matches()  # every process calls it: the assignments of all of them
    stats = trainer.match_stats
    stats.summary(trainer.state.global_step)  # flush the last window
    res = {"tags": trainer.tags, "totals": stats.totals(), "history": stats.history}
    write_json(out / "matching.json", res)
    if res["totals"] and dist.is_main():
        plot_matching(res["history"], res["totals"], out / "matching.png", f"SSFT matching ({trainer.args.assignment})")


#: How report tables name metrics whose definition is not in their key.
LABELS = {"distinct_answers": "distinct answers (among extracted answers; samples without one left out)",
          "no_answer": "samples without an extractable answer"}


def metric_label(key: str) -> str:
    """`distinct_answers@6` -> `distinct_answers@6 — distinct answers (among extracted answers; ...)`."""
    name = key.split("@")[0]
    return f"{key} — {LABELS[name]}" if name in LABELS else key


def evaluate_forking_run(model_dir: Path | str, tags: list[str], out: Path, task: str, n: int, per_tag: int,
                         temperature: float, max_new_tokens: int, title: str, seed: int = 0,
                         extra_sections: list[dict[str, Any]] | None = None,
                         group_size: int | None = None) -> dict[str, Any]:
    """Forking-token evaluation of a saved model -> out/{eval.json, eval_samples.jsonl, forking.png, report.md
    (+ sections.json: `ponder report` re-renders it)}; `extra_sections` go after the evaluation's."""
    model, tok = models.load(str(model_dir))
    probs = data.load_problems(task, n=n, split="test", seed=seed)
    r = ssft.evaluate_forking(model, tok, probs, tags, per_tag=per_tag, temperature=temperature,
                              max_new_tokens=max_new_tokens, seed=seed, group_size=group_size)
    records = r.pop("records")
    # None: undefined (no cases), shown as "—"
    rows = [(k, v) for k, v in r.items() if (v is None or isinstance(v, (int, float))) and k not in ("n", "k", "per_tag")]
    ui.print_table(f"{title}: {n} held-out {task} problems, {len(tags)} tag(s) x {per_tag}", ["metric", "value"], rows)
    if not dist.is_main():  # several processes: every one sampled its share; rank 0 writes the files
        return r
    write_json(out / "eval.json", r)
    data.write_jsonl(out / "eval_samples.jsonl", records)
    plot_forking(r, out / "forking.png", title)
    intro = [f"Model: `{model_dir}`. {n} held-out `{task}` problems; {per_tag} samples per tag at temperature "
             f"{temperature} (k = {r['k']})" + (f", plus {r['k']} samples with a model-sampled tag."
                                                if len(tags) > 1 else ".")]
    sections = [{"title": "Forking evaluation", "columns": ["metric", "value"],
                 "rows": [[metric_label(k), v] for k, v in rows]},
                {"title": "Per tag", "columns": ["tag", "accuracy", "mean tokens", "strategies"],
                 "rows": [[f"`{t}`", f"{row['accuracy']:.3f}", f"{row['mean_tokens']:.1f}",
                           ", ".join(f"{s} {v:.2f}" for s, v in row.get("strategies", {}).items())]
                          for t, row in r["per_tag"].items()],
                 "plots": ["forking.png"]}]
    reports.write(out, title, sections + list(extra_sections or []), intro)
    ui.info(f"report: {out / 'report.md'}")
    return r


def tag_distribution_rows(before: list[float] | None, after: list[float], names: list[str]) -> list[list[str]]:
    """The tag-distribution table: every tag's mean π(g|x) in 3 significant digits (under the full softmax a tag's
    mass can be ~1e-6: fixed decimals showed it as 0), and the mass of all tags together."""
    def cell(v):
        return ui.UNDEFINED if v is None else f"{v:.3g}"
    before = before or [None] * len(after)
    rows = [[f"`{t}`", cell(b), cell(a)] for t, b, a in zip(names, before, after)]
    return rows + [["all tags", cell(sum(before) if None not in before else None), cell(sum(after))]]


def run_ssft(config_path, overrides: list[str]):
    """`ponder ssft -c CONFIG key=value ...`: see `ssft_run`."""
    return ssft_run(load_config(SSFTConfig, config_path, overrides))


def ssft_run(cfg: SSFTConfig) -> dict[str, Any]:
    """SSFT (or the SFT-mixed / random-assignment baselines), its matching statistics, and the forking
    evaluation of the final model."""
    metrics, trainer = train(cfg, SSFTTrainer, "ssft")
    out = Path(cfg.output_dir)
    if cfg.assignment != "mixed":
        write_matching(trainer, out)
    if cfg.n_eval:
        extra = [{"title": "Matching statistics", "plots": ["matching.png"]}] if (out / "matching.png").exists() \
            else []
        # SFT-mixed has one tag: k = N·per_tag samples of <think>, voted in groups of N like the tagged runs
        per_tag = cfg.eval_per_tag * (cfg.num_tags if cfg.assignment == "mixed" else 1)
        metrics["eval"] = evaluate_forking_run(out / "final", cfg.tags, out, cfg.eval_dataset, cfg.n_eval,
                                               per_tag, cfg.eval_temperature, cfg.eval_max_new_tokens,
                                               f"SSFT ({cfg.assignment})", extra_sections=extra,
                                               group_size=cfg.num_tags)
        write_json(out / "metrics.json", metrics)
    return metrics


def run_gfpo(config_path, overrides: list[str]):
    """`ponder gfpo -c CONFIG key=value ...`: see `gfpo_run`."""
    return gfpo_run(load_config(GFPOConfig, config_path, overrides))


def gfpo_run(cfg: GFPOConfig) -> dict[str, Any]:
    """GFPO from an SSFT model + the tag distribution before/after + forking evaluation of the final model."""
    probe = data.load_problems(cfg.eval_dataset, n=100, split="test")

    def dist(spec):
        m, tok = models.load(spec, trust_remote_code=cfg.trust_remote_code)
        if any(t not in tok.get_vocab() for t in ssft.forking_tags(cfg.num_tags)):
            return None  # a model without forking tokens (GFPO adds them)
        return [float(x) for x in ssft.tag_distribution(m, tok, probe, cfg.num_tags, policy=cfg.tag_policy)]

    before = dist(cfg.model)
    metrics = train(cfg, GFPOTrainer, "gfpo")[0]
    out = Path(cfg.output_dir)
    after = dist(str(out / "final"))
    metrics["tag_distribution"] = {"policy": cfg.tag_policy, "before": before, "after": after}
    names = ssft.forking_tags(cfg.num_tags)
    title = f"mean π(g|x) over {len(probe)} held-out problems (tag policy {cfg.tag_policy})"
    rows = tag_distribution_rows(before, after, names)
    ui.print_table(title, ["tag", "before", "after"], rows)
    if cfg.n_eval:
        extra = [{"title": f"Tag distribution: {title}", "columns": ["tag", "before", "after"], "rows": rows,
                  "notes": ["Under the full policy a tag's probability is its share of the whole vocabulary's "
                            "softmax at the first answer token, so the tags need not sum to one."]
                  if cfg.tag_policy == "full" else []}]
        metrics["eval"] = evaluate_forking_run(out / "final", names, out, cfg.eval_dataset,
                                               cfg.n_eval, cfg.eval_per_tag, cfg.eval_temperature,
                                               cfg.eval_max_new_tokens, "GFPO", extra_sections=extra)
    write_json(out / "metrics.json", metrics)
    return metrics


def plot_forking(res: dict[str, Any], path, title: str = "") -> None:
    """PNG: per-tag accuracy, per-tag mean length, and (testbed) the strategy mix of each tag."""
    plt = pyplot()
    per = res["per_tag"]
    tags = list(per)
    strat = all("strategies" in per[t] for t in tags)
    fig, axes = plt.subplots(1, 3 if strat else 2, figsize=(13 if strat else 9, 3.6))
    axes[0].bar(tags, [per[t]["accuracy"] for t in tags], color="tab:blue")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("accuracy per tag")
    axes[0].set_ylabel("accuracy")
    axes[1].bar(tags, [per[t]["mean_tokens"] for t in tags], color="tab:orange")
    axes[1].set_title("mean completion length per tag")
    axes[1].set_ylabel("tokens")
    if strat:
        names = sorted({s for t in tags for s in per[t]["strategies"]})
        bottom = [0.0] * len(tags)
        for s in names:
            vals = [per[t]["strategies"].get(s, 0.0) for t in tags]
            axes[2].bar(tags, vals, bottom=bottom, label=s)
            bottom = [b + v for b, v in zip(bottom, vals)]
        axes[2].set_ylim(0, 1)
        axes[2].set_title("strategy share per tag")
        axes[2].set_ylabel("share of samples")
        axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach 1.0
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matching(history: list[dict[str, Any]], totals: dict[str, list[int]], path, title: str = "") -> None:
    """PNG: the source x tag count matrix over the whole run, and purity / stability over steps."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sources = list(totals)
    mat = [[c / max(sum(totals[s]), 1) for c in totals[s]] for s in sources]
    im = axes[0].imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes[0].set_yticks(range(len(sources)), sources)
    n = len(next(iter(totals.values()))) if totals else 0
    axes[0].set_xticks(range(n), [ssft.TAG_FORMAT.format(i + 1) for i in range(n)], rotation=45, fontsize=8)
    axes[0].set_title("share of each source's matches per tag")
    axes[0].set_ylabel("trace source")
    fig.colorbar(im, ax=axes[0])
    steps = [h["step"] for h in history]
    for key in ("match/purity", "match/agree_prev", "match/revisit_same"):
        pts = [(s, h[key]) for s, h in zip(steps, history) if key in h]
        if pts:
            axes[1].plot(*zip(*pts), marker=".", label=key.split("/")[1])
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("fraction (10-step window)")
    axes[1].legend(fontsize=8)
    axes[1].set_title("matching purity and stability")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo(run_dir, base: str, problems: list, quick: bool = False, *, steps: int | None = None,
         batch: int | None = None, lr: float = 1e-4, scheduler: str = "constant",
         dataset: str = "testbed:traces:direct,split", num_tags: int = 2, per_tag: int = 3) -> dict[str, Any]:
    """A short SSFT testbed experiment for ``ponder demo``: from the testbed model at `base`, train SSFT
    (Hungarian matching to N forking tokens) and the SFT-mixed baseline (all traces under ``<think>``) for the
    same number of steps, then evaluate the starting model, SFT-mixed and SSFT on `problems` with k = N x
    `per_tag` samples each (`per_tag` per tag for SSFT, k under ``<think>`` otherwise).

    The data are the paper's setting in small: the starting model can already reason in several ways (the testbed
    was pre-trained on two strategies, untagged: ``testbed:traces:direct,split``) and SSFT binds them to tags.
    Measured on two CPUs' worth of settings (docs/results/ssft.md, "The demo's settings"): with all four
    strategies (two of them new to the testbed) both fine-tuned models fell from ~27% to 0-5% pass@1 within
    the demo's budget at lr 1e-4 to 3e-3; with the two known strategies, lr 3e-3 still collapsed it, lr 1e-4
    for 128 steps kept both above the start. The full experiment (600 steps, k = 12, random-assignment
    ablation) is ``ponder ssft -c configs/ssft/testbed.yaml``. Writes ``ssft_forking.png`` and
    ``ssft_matching.png``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    steps = steps or (2 if quick else 128)
    batch = batch or (2 if quick else 8)
    n_data = 8 if quick else steps * batch  # each trace set seen once
    per_tag, max_new = (1, 40) if quick else (per_tag, 64)
    common = dict(model=str(base), dataset=dataset, n_train=n_data, num_tags=num_tags, prefix_len=16,
                  max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                  lr_scheduler_type=scheduler, warmup_steps=0, logging_steps=max(steps // 5, 1),
                  save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False, seed=0)

    def train(assignment):
        cfg = SSFTConfig(output_dir=str(run_dir / f"ssft-{assignment}"), assignment=assignment, **common)
        tr = SSFTTrainer(args=cfg)
        tr.train()
        return tr

    def ev(model, tok, tags, k_per_tag):
        model.eval()
        r = ssft.evaluate_forking(model, tok, problems, tags, per_tag=k_per_tag, sampled=0, group_size=num_tags,
                             temperature=0.7, max_new_tokens=max_new, batch_size=128, seed=0)
        r.pop("records")
        return r

    k = num_tags * per_tag
    start, start_tok = models.load(str(base))  # the same k samples at the same temperature, under <think>
    res = {"testbed (start)": ev(start, start_tok, [THINK_OPEN], k)}
    del start
    mixed = train("mixed")
    res["SFT-mixed"] = ev(mixed.model, mixed.processing_class, [THINK_OPEN], k)
    hung = train("hungarian")
    res["SSFT"] = ev(hung.model, hung.processing_class, hung.tags, per_tag)

    plot_forking(res["SSFT"], run_dir / "ssft_forking.png", f"SSFT after {steps} steps: per-tag statistics")
    hung.flush_matches()
    hung.match_stats.summary(hung.state.global_step)
    plot_matching(hung.match_stats.history, hung.match_stats.totals(), run_dir / "ssft_matching.png",
                  f"SSFT matching over {steps} steps")

    def modal(r):  # the most frequent strategy of each tag's samples
        return {max(v["strategies"], key=v["strategies"].get) for v in r["per_tag"].values()}

    def row(name, r):
        tag1 = r[f"pass@1/{r['tags'][0]}"]
        return [name, round(tag1, 3), round(r[f"pass@{k}"], 3), round(r[f"cons@{k}"], 3),
                round(r[f"distinct_strategies@{k}"], 2), ui.fmt(r[f"distinct_answers@{k}"]), len(modal(r))]

    rows = [row(n, r) for n, r in res.items()]
    s, m = res["SSFT"]["per_problem"], res["SFT-mixed"]["per_problem"]
    known = dataset.count(":") == 2
    md = "docs/results/ssft.md"
    specialised = len(modal(res["SSFT"]))
    notes = [effect_note(f"SSFT Cons@{k} − SFT-mixed Cons@{k} (the paper: above)", s[f"cons@{k}"], m[f"cons@{k}"], md),
             effect_note(f"SSFT pass@{k} − SFT-mixed pass@{k} (the paper: not below)", s[f"pass@{k}"], m[f"pass@{k}"],
                         md, ">="),
             effect_note("SSFT Pass@1 <think1> − SFT-mixed <think>", s["pass@1/<think1>"], m["pass@1/<think>"], md),
             f"Tags specialise: {specialised} different modal strategies over the {num_tags} tags. {steps} training "
             f"steps x {batch} questions ({len(data.load_tracesets(dataset, n=1)[0].traces)} traces each, "
             f"`{dataset}`) per run, the same for SSFT and SFT-mixed; k = {k} samples at temperature 0.7 on "
             f"{len(problems)} held-out problems (SSFT: {per_tag} per forking tag)."]
    notes.append("As in the paper, the starting model already reasons in these ways (the testbed was pre-trained on "
                 "these two strategies, untagged); SSFT binds them to tags." if known else
                 "The starting model knows two of the four strategies; at this budget the fine-tuned models are "
                 "still learning the other two, so compare them with each other, not with the starting model.")
    metrics = {name: {kk: v for kk, v in r.items() if kk != "tags"} for name, r in res.items()}
    metrics["seconds"] = time.time() - t0
    metrics["steps"] = steps
    return {"title": f"SSFT (global forking tokens) vs SFT-mixed, {steps} steps each",
            "columns": ["model", "pass@1 (<think1> / <think>)", f"pass@{k}", f"cons@{k}",
                        f"distinct strategies@{k}", f"distinct answers@{k} (among extracted answers)",
                        "tags' modal strategies"],
            "rows": rows, "plots": ["ssft_forking.png", "ssft_matching.png"], "notes": notes, "metrics": metrics,
            "vs_start": {"metric": f"accuracy of {k} samples % (T 0.7)",
                         "start": res["testbed (start)"]["per_problem"]["pass@1/tags"], "end": s["pass@1/tags"]}}
