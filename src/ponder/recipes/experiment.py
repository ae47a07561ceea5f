"""`ponder experiment SPEC.yaml`: run each arm of an experiment over several seeds, then write the table of mean ±
standard error, the paired difference of every claim with its 95% interval and a verdict, and a plot.

A spec (configs/experiments/*.yaml):

    name: rise-testbed                      # docs/results/<name>.md and runs/experiments/<name>/
    title: RISE on the testbed
    seeds: [0, 1, 2]
    arms:                                   # arm name -> a run kind and its config
      rise: {run: rise, config: configs/rise/testbed.yaml, overrides: {iterations: 1, n_eval: 400}}
    metrics: [m1@t1, m5@t1, m1@t5, p1@t5]   # the table's columns
    claims:                                 # "row:metric > row:metric" (or >=); a row is arm/model
      - {claim: "turn 5 beats turn 1", left: "rise/iter-1:m1@t5", op: ">", right: "rise/iter-1:m1@t1"}
      - {claim: "turn 1 not below base", left: "rise/iter-1:m1@t1", op: ">=", right: "rise/base:m1@t1", margin: 2.0}

A ">=" (not below) claim is a non-inferiority test and needs `margin`: δ in the table's units (points for
accuracies); it holds when the interval's lower end is above −δ (`ponder.stats.verdict`).

Every (arm, seed) writes its rows to runs/experiments/<name>/<arm>/seed-<s>/rows.json when it finishes; a re-run
skips finished ones (`--force` redoes them), so an interrupted experiment loses at most the run in progress.
An arm may start from another arm's output of the same seed (`after: <arm>`; its model is `{after}` in the
overrides). An arm with `once: true` runs for the spec's first seed only and every seed's `after` uses that
run (a shared starting model). Run kinds are the functions in `RUNS`; each returns {row name: {metric:
value}}; a run that also writes ``curves.json`` ({key: [[step, value], ...]}) is drawn over training for the
spec's `curves` keys (mean ± s.e. over seeds; `curve_groups` puts arms in separate rows of panels;
`curve_baselines: {group: {curve key: "arm/row:metric"}}` draws a row's mean as a dashed line). `scales`
sets a metric's display factor (default `scale`, 100: accuracies in %; e.g. 1 for token counts).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ponder import ui
from ponder.config import ConfigError, load_config, note_renamed
from ponder.engine import data, models
from ponder.methods import metrics, stats
from ponder.recipes import latro as latro_recipe
from ponder.recipes import retry as retry_recipe
from ponder.recipes import rise as rise_recipe
from ponder.recipes import ssft as ssft_recipe
from ponder.recipes.common import pyplot, resume_arg, write_json
from ponder.recipes.rise import RISERunConfig
from ponder.trainers.gfpo import GFPOConfig
from ponder.trainers.latro import LaTROConfig
from ponder.trainers.onepass import OnePassConfig, OnePassTrainer
from ponder.trainers.retry import RetryConfig
from ponder.trainers.sft import SFTConfig, SFTTrainer
from ponder.trainers.ssft import SSFTConfig

SPEC_KEYS = {"name", "title", "seeds", "arms", "metrics", "claims", "notes", "scale", "scales", "curves",
             "curve_groups", "curve_baselines"}
ARM_KEYS = {"run", "config", "overrides", "after", "label", "once"}


# ----------------------------------------------------------------------------------------------------------
# run kinds: (config path, overrides, seed, out dir, the `after` arm's result) -> rows
# ----------------------------------------------------------------------------------------------------------


def _overrides(d: dict[str, Any], seed: int, out: Path) -> list[str]:
    ov = {**d, "seed": seed, "output_dir": str(out), "report_to": "none"}
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in ov.items()]


def _scalars(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        k = k.removeprefix("eval_")
        if isinstance(v, bool):
            out[prefix + k] = float(v)
        elif isinstance(v, (int, float)):
            out[prefix + k] = float(v)
        elif k == "accuracy_by_turn":
            out.update({f"acc@t{i + 1}": float(a) for i, a in enumerate(v)})
    return out


def run_rise(config, overrides, seed, out, after):
    cfg = load_config(RISERunConfig, config, _overrides(overrides, seed, out))
    res = rise_recipe.run(cfg)
    out_ = {name: _scalars(ev) for name, ev in res["evals"].items()}
    sampled = sum(it["collection"].get("sampled_attempts", 0) for it in res["iterations"])
    for name in out_:
        if name != "base":
            out_[name]["sampled_attempts"] = float(sampled)  # candidates sampled in collection (all iterations)
    return out_


def run_retry(config, overrides, seed, out, after):
    """`ponder retry`: the base and the trained model under RISE's evaluation, and the attempts and tokens the
    training sampled (the rollout budget compared with RISE's collection)."""
    cfg = load_config(RetryConfig, config, _overrides(overrides, seed, out))
    res = retry_recipe.run(cfg)
    evs = {name: _scalars(ev) for name, ev in res["evals"].items()}
    evs["trained"].update(sampled_attempts=float(res["train"]["sampled_attempts"]),
                          sampled_tokens=float(res["train"]["sampled_tokens"]))
    return evs


def run_eval(config, overrides, seed, out, after):
    """Evaluate a model: greedy accuracy, sample accuracy, pass@k and maj@k (`ponder.metrics.evaluate`)."""
    o = dict(overrides)
    model_spec = after["model"] if after else o.pop("model", "testbed")
    for old, new in (("task", "dataset"), ("eval_problems", "n_eval")):  # the names before the configs' ones
        if old in o:
            note_renamed(old, new)
            o.setdefault(new, o.pop(old))
    problems = data.load_problems(o.pop("dataset", "testbed"), n=o.pop("n_eval", 400), split="test")
    model, tok = models.load(str(model_spec))
    r = metrics.evaluate(model, tok, problems, seed=seed, **o)
    r.pop("records")
    return {"eval": _scalars(r)}


def run_sft(config, overrides, seed, out, after):
    """SFT, then `metrics.evaluate` of the final model (`eval` overrides: dataset, n_eval, samples, ...)."""
    o = dict(overrides)
    ev = o.pop("eval", {})
    cfg = load_config(SFTConfig, config, _overrides(o, seed, out))
    tr = SFTTrainer(args=cfg)
    tr.train(resume_from_checkpoint=resume_arg(cfg))
    tr.save_model(str(out / "final"))
    return {"sft": run_eval(None, ev, seed, out, {"model": out / "final"})["eval"]}


def run_latro(config, overrides, seed, out, after):
    """LaTRO (any `reward`): the final held-out evaluation, the rationale length over training and the rollout
    tokens sampled; curves.json holds accuracy, rationale length, reward and KL over the updates."""
    o = dict(overrides)
    if after:
        o["model"] = str(after["model"])
    cfg = load_config(LaTROConfig, config, _overrides(o, seed, out))
    res = latro_recipe.run(cfg)
    write_json(out / "curves.json", latro_recipe.curves(res["log_history"]))
    return {"latro": {**_scalars(res["final_eval"]), **latro_recipe.training_summary(res["log_history"])}}


def run_sft_gold(config, overrides, seed, out, after):
    """SFT on gold rationales of exactly the questions a LaTRO config trains on (its dataset, n_train,
    dataset_split, data_seed: the same problems), then `metrics.evaluate`. overrides: the LaTRO
    config's overrides, plus `sft:` (SFTConfig fields), `eval:` (as for `eval` runs) and `gold_strategy` (the
    rationales' format, default ``direct``; ``answer``: the gold answer alone; problems other than the testbed's are
    written in the LaTRO config's prompt and answer templates: `ponder.recipes.latro.gold_conversations`)."""
    o = dict(overrides)
    sft, ev, strategy = dict(o.pop("sft", {})), o.pop("eval", {}), o.pop("gold_strategy", "direct")
    if after:
        o["model"] = str(after["model"])
    lcfg = load_config(LaTROConfig, config, _overrides(o, seed, out))
    problems = data.resolve_problems(lcfg.dataset, lcfg.n_train, lcfg.dataset_split, "dataset", lcfg.problem_seed())
    gold = out / "gold.jsonl"
    try:
        convs = latro_recipe.gold_conversations(problems, strategy, lcfg.prompt_template, lcfg.answer_template)
    except ValueError as e:  # a task without gold rationales, an unknown gold_strategy: one line, not a traceback
        raise ConfigError(f"gold_strategy: {e}") from None
    data.write_jsonl(gold, [{"messages": m} for m in convs])
    sft = {"model": lcfg.model, "dataset": str(gold), "lr_scheduler_type": "constant", "save_strategy": "no",
           "disable_tqdm": True, **sft}
    cfg = load_config(SFTConfig, None, _overrides(sft, seed, out))
    tr = SFTTrainer(args=cfg)
    tr.train()
    tr.save_model(str(out / "final"))
    return {"sft": run_eval(None, ev, seed, out, {"model": out / "final"})["eval"]}


def _forking(cfg_cls, name, config, overrides, seed, out, after):
    o = dict(overrides)
    if after:
        o["model"] = str(after["model"])
    cfg = load_config(cfg_cls, config, _overrides(o, seed, out))
    res = (ssft_recipe.ssft_run if cfg_cls is SSFTConfig else ssft_recipe.gfpo_run)(cfg)
    ev = dict(res.get("eval", {}))
    ev.pop("per_tag", None)
    return {name: _scalars(ev)}


def run_ssft(config, overrides, seed, out, after):
    return _forking(SSFTConfig, "ssft", config, overrides, seed, out, after)


def run_gfpo(config, overrides, seed, out, after):
    return _forking(GFPOConfig, "gfpo", config, overrides, seed, out, after)


def run_onepass(config, overrides, seed, out, after):
    """The same SFT run in one-pass and N-pass mode from the same seed: final losses and the largest weight
    difference between the two trained models (equal up to fp32 noise: the losses are identical)."""
    finals, models_ = {}, {}
    for mode in ("onepass", "npass"):
        cfg = load_config(OnePassConfig, config, _overrides({**overrides, "mode": mode}, seed, out / mode))
        tr = OnePassTrainer(args=cfg)
        res = tr.train()
        finals[mode] = {"train_loss": res.training_loss, "seconds": res.metrics["train_runtime"]}
        models_[mode] = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    diff = max((models_["onepass"][k] - models_["npass"][k]).abs().max().item() for k in models_["onepass"])
    loss_diff = abs(finals["onepass"]["train_loss"] - finals["npass"]["train_loss"])
    return {"onepass": {**finals["onepass"], "max_weight_diff": diff, "loss_diff": loss_diff},
            "npass": finals["npass"]}


RUNS: dict[str, Callable] = {"rise": run_rise, "eval": run_eval, "sft": run_sft, "latro": run_latro,
                             "sft_gold": run_sft_gold, "ssft": run_ssft, "gfpo": run_gfpo, "onepass": run_onepass,
                             "retry": run_retry}


# ----------------------------------------------------------------------------------------------------------
# the spec, running, and the write-up
# ----------------------------------------------------------------------------------------------------------


def load_spec(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such experiment spec")
    spec = yaml.safe_load(path.read_text()) or {}
    bad = set(spec) - SPEC_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} (allowed: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("name", "seeds", "arms", "metrics"):
        if key not in spec:
            raise ConfigError(f"{path}: missing key '{key}'")
    for arm, a in spec["arms"].items():
        if not isinstance(a, dict) or a.get("run") not in RUNS:
            raise ConfigError(f"{path}: arms.{arm}.run must be one of {', '.join(RUNS)}")
        if set(a) - ARM_KEYS:
            raise ConfigError(f"{path}: arms.{arm}: unknown key(s) {sorted(set(a) - ARM_KEYS)}")
        if a.get("after") and a["after"] not in spec["arms"]:
            raise ConfigError(f"{path}: arms.{arm}.after names no arm: {a['after']!r}")
    for c in spec.get("claims", []):
        for side in ("left", "right"):
            if ":" not in c.get(side, ""):
                raise ConfigError(f"{path}: claim {c.get('claim')!r}: '{side}' must be 'arm/row:metric'")
        if c.get("op", ">") not in (">", ">="):
            raise ConfigError(f"{path}: claim {c.get('claim')!r}: op must be '>' or '>='")
        m = c.get("margin")
        if c.get("op", ">") == ">=":
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
                raise ConfigError(f"{path}: claim {c.get('claim')!r}: a '>=' (not below) claim needs margin: δ > 0 in "
                                  f"the table's units (e.g. margin: 2.0 points; it holds when the 95% interval's "
                                  f"lower end is above −δ), got {m!r}")
        elif m is not None:
            raise ConfigError(f"{path}: claim {c.get('claim')!r}: margin applies to '>=' claims only")
    return spec


def _order(arms: dict[str, Any]) -> list[str]:
    done: list[str] = []
    while len(done) < len(arms):
        ready = [a for a in arms if a not in done and (not arms[a].get("after") or arms[a]["after"] in done)]
        if not ready:
            raise ConfigError(f"arms form a cycle through 'after': {sorted(set(arms) - set(done))}")
        done += ready
    return done


def run_experiment(spec_path: Path, seeds: list[int] | None = None, only: list[str] | None = None,
                   force: bool = False, root: Path = Path("runs/experiments"),
                   results_dir: Path = Path("docs/results")) -> dict[str, Any]:
    spec = load_spec(spec_path)
    seeds = seeds or list(spec["seeds"])
    base = root / spec["name"]
    for arm in _order(spec["arms"]):
        if only and arm not in only:
            continue
        a = spec["arms"][arm]
        for seed in _arm_seeds(spec, arm, seeds):
            out = base / arm / f"seed-{seed}"
            done = out / "rows.json"
            if done.exists() and not force:
                continue
            after = None
            if a.get("after"):
                prev = base / a["after"] / f"seed-{_arm_seeds(spec, a['after'], [seed])[0]}"
                if not (prev / "rows.json").exists():
                    raise ConfigError(f"arm {arm} starts after {a['after']}, which has no finished seed {seed}")
                after = {"model": prev / "final", "dir": prev}
            ui.info(f"[bold]experiment {spec['name']}[/]: arm {arm}, seed {seed}")
            t = time.time()
            rows = RUNS[a["run"]](a.get("config"), a.get("overrides", {}), seed, out, after)
            write_json(done, {"rows": rows, "seconds": time.time() - t, "seed": seed, "arm": arm})
    return write_results(spec, base, seeds, results_dir, spec_path)


def _arm_seeds(spec: dict[str, Any], arm: str, seeds: list[int]) -> list[int]:
    """The seeds an arm runs: all of them, or the spec's first for a `once` arm."""
    return [spec["seeds"][0]] if spec["arms"][arm].get("once") else seeds


def collect(base: Path, spec: dict[str, Any], seeds: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    """{"arm/row": {seed: {metric: value}}} from the finished runs."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for arm in spec["arms"]:
        for seed in _arm_seeds(spec, arm, seeds):
            f = base / arm / f"seed-{seed}" / "rows.json"
            if f.exists():
                for row, vals in json.loads(f.read_text())["rows"].items():
                    out.setdefault(f"{arm}/{row}", {})[seed] = vals
    return out


def _ref(ref: str) -> tuple[str, str]:
    row, _, metric = ref.rpartition(":")
    return row, metric


def write_results(spec, base: Path, seeds: list[int], results_dir: Path, spec_path: Path) -> dict[str, Any]:
    data_ = collect(base, spec, seeds)
    scale = float(spec.get("scale", 100))
    scales = {m: float((spec.get("scales") or {}).get(m, scale)) for m in spec["metrics"]}
    table = []
    for row, by_seed in data_.items():
        cells = {}
        for m in spec["metrics"]:
            # a rate undefined in a seed (None: no cases) does not count as 0
            vals = [by_seed[s][m] for s in sorted(by_seed) if by_seed[s].get(m) is not None]
            cells[m] = (*stats.mean_se(vals), len(vals))
        table.append((row, cells))
    claims = []
    for c in spec.get("claims", []):
        (lr, lm), (rr, rm) = _ref(c["left"]), _ref(c["right"])
        common = sorted(set(data_.get(lr, {})) & set(data_.get(rr, {})))
        a = [data_[lr][s][lm] for s in common if lm in data_[lr][s] and rm in data_[rr][s]]
        b = [data_[rr][s][rm] for s in common if lm in data_[lr][s] and rm in data_[rr][s]]
        d = stats.paired_difference(a, b) if a else {"mean": math.nan, "se": math.nan, "lo": math.nan,
                                                     "hi": math.nan, "n": 0}
        sc = scales.get(lm, scale)
        margin = c["margin"] / sc if c.get("op", ">") == ">=" else None  # the spec states δ in table units
        claims.append({**c, "diff": d, "verdict": stats.verdict(d, c.get("op", ">"), margin) if a else "not run",
                       "scale": sc})
    result = {"name": spec["name"], "seeds": seeds, "rows": {r: {m: list(v) for m, v in cells.items()}
                                                            for r, cells in table},
              "per_seed": data_, "claims": claims}
    write_json(base / "results.json", result)
    png = results_dir / f"{spec['name']}.png"
    _plot(table, [m for m in spec["metrics"] if scales[m] == scale], png, spec.get("title", spec["name"]), scale)
    extra = []
    if spec.get("curves"):
        extra.append(_plot_curves(spec, base, seeds, results_dir / f"{spec['name']}-curves.png", data_).name)
    _markdown(spec, seeds, table, claims, data_, results_dir / f"{spec['name']}.md", [png.name, *extra], spec_path,
              scales)
    ui.print_table(f"{spec['name']}: claims ({len(seeds)} seeds)", ["claim", "difference", "95% interval",
                                                                   "verdict"],
                   [(c["claim"], stats.fmt_pm(c["diff"]["mean"], c["diff"]["se"], c["scale"]),
                     _interval(c["diff"], c["scale"]), c["verdict"]) for c in claims])
    return result


def _interval(d: dict[str, float], scale: float) -> str:
    return "-" if math.isnan(d["lo"]) else f"[{scale * d['lo']:+.1f}, {scale * d['hi']:+.1f}]"


def _markdown(spec, seeds, table, claims, data_, path: Path, pngs: list[str], spec_path: Path,
              scales: dict[str, float]) -> None:
    unit = " (accuracies in %)" if 100.0 in scales.values() else ""
    metrics_ = spec["metrics"]
    lines = [f"# {spec.get('title', spec['name'])}", "",
             f"Written by `ponder experiment {spec_path}` ({len(seeds)} seeds: {', '.join(map(str, seeds))}). "
             f"Cells are mean ± standard error over seeds{unit}; claims are paired differences over seeds with a "
             "95% Student-t interval. Raw per-seed numbers: runs/experiments/"
             f"{spec['name']}/results.json and the per-seed table below.", ""]
    lines += [f"- {n}" for n in spec.get("notes", [])] + ([""] if spec.get("notes") else [])
    lines += ["| row | " + " | ".join(metrics_) + " |", "|---|" + "---|" * len(metrics_)]
    for row, cells in table:
        label = spec["arms"].get(row.split("/")[0], {}).get("label")  # what the arm is (e.g. whose reward)
        name = f"{row} ({label})" if label else row
        lines.append(f"| {name} | " + " | ".join(stats.fmt_pm(cells[m][0], cells[m][1], scales[m]) for m in metrics_)
                     + " |")
    if claims:
        lines += ["", "| claim | left | right | difference ± s.e. | 95% interval | n | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in claims:
            d = c["diff"]
            op = c.get("op", ">") + (f" (δ {c['margin']:g})" if c.get("op") == ">=" else "")
            lines.append(f"| {c['claim']} | `{c['left']}` | `{c['right']}` {op} | "
                         f"{stats.fmt_pm(d['mean'], d['se'], c['scale'])} | {_interval(d, c['scale'])} | {d['n']} | "
                         f"**{c['verdict']}** |")
    lines += [""] + [f"![{spec['name']}]({png})" for png in pngs]
    lines += ["", "Per seed:", "", "| row | seed | " + " | ".join(metrics_) + " |", "|---|---|" + "---|" * len(metrics_)]
    for row, by_seed in data_.items():
        for s in sorted(by_seed):
            lines.append(f"| {row} | {s} | " + " | ".join(
                stats.fmt_num(scales[m] * by_seed[s][m]) if by_seed[s].get(m) is not None else "-"
                for m in metrics_) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def curve_stats(base: Path, arm: str, seeds: list[int], key: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, mean, s.e.) of one curve over the seeds that logged it, at the steps all of them logged."""
    runs = []
    for seed in seeds:
        f = base / arm / f"seed-{seed}" / "curves.json"
        if f.exists():
            runs.append({int(st): v for st, v in json.loads(f.read_text()).get(key, [])})
    if not runs:
        return [], [], []
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    ms = [stats.mean_se([r[st] for r in runs]) for st in steps]
    return [float(st) for st in steps], [m for m, _ in ms], [0.0 if math.isnan(e) else e for _, e in ms]


def _plot_curves(spec, base: Path, seeds: list[int], path: Path, data_=None) -> Path:
    """One panel per (group of arms, curve key): mean over seeds with a ± s.e. band."""
    plt = pyplot()
    lines = spec.get("curve_baselines") or {}
    keys = spec["curves"]
    groups = spec.get("curve_groups") or {"": list(spec["arms"])}
    fig, axes = plt.subplots(len(groups), len(keys), figsize=(4.6 * len(keys), 3.4 * len(groups)), squeeze=False)
    for gi, (gname, arms) in enumerate(groups.items()):
        for ki, key in enumerate(keys):
            ax = axes[gi][ki]
            for i, arm in enumerate(arms):
                xs, ms, es = curve_stats(base, arm, _arm_seeds(spec, arm, seeds), key)
                if not xs:
                    continue
                ax.plot(xs, ms, marker="o" if len(xs) < 12 else None, ms=3, color=f"C{i}",
                        label=spec["arms"][arm].get("label", arm))
                ax.fill_between(xs, [m - e for m, e in zip(ms, es)], [m + e for m, e in zip(ms, es)],
                                color=f"C{i}", alpha=0.2)
            ref = lines.get(gname, {}).get(key)
            if ref and data_:
                row, _, metric = ref.rpartition(":")
                vals = [v[metric] for v in (data_.get(row) or {}).values() if metric in v]
                if vals:
                    ax.axhline(sum(vals) / len(vals), color="k", ls="--", lw=1, label=f"start ({row})")
            ax.set_title(f"{gname}: {key}" if gname else key, fontsize=9)
            ax.set_xlabel("update")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"{spec.get('title', spec['name'])} (mean ± s.e. over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot(table, metric_names, path: Path, title: str, scale: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metric_names) * max(1, len(table)) / 2), 3.8))
    width = 0.8 / max(1, len(table))
    for i, (row, cells) in enumerate(table):
        xs = [j + i * width for j in range(len(metric_names))]
        ms = [scale * cells[m][0] for m in metric_names]
        es = [0 if math.isnan(cells[m][1]) else scale * cells[m][1] for m in metric_names]
        ax.bar(xs, ms, width, yerr=es, capsize=3, label=row)
    ax.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(metric_names))], metric_names)
    ax.set_ylabel("%" if scale == 100 else "value")
    ax.set_title(f"{title} (mean ± s.e. over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
