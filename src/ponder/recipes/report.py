"""Reports: a run's numbers as Markdown tables and PNG plots (`ponder report RUN_DIR`, `ponder demo`).

A report is a list of sections, each ``{"title", "text", "columns", "rows", "plots", "notes"}`` (text: paragraphs
before the table; notes: a list after it); they are kept in ``sections.json`` next to ``report.md`` so the report
can be re-rendered: every method recipe writes its report this way, so ``ponder report`` rebuilds it with the
method's own tables. A training run without sections
(``metrics.json`` with HF ``log_history``, or a ``trainer_state.json``) gets a summary table of its final
numbers and one plot per logged curve.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ponder import ui
from ponder.recipes.common import pyplot

SKIP_CURVES = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second",
               "train_steps_per_second", "train_loss"}


def pct(v: Any) -> str:
    """A rate as a percentage with one decimal; undefined (None, NaN: no cases) as "—", never 0."""
    return ui.UNDEFINED if v is None or isinstance(v, float) and math.isnan(v) else f"{100 * v:.1f}"


def table_md(columns: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return ui.fmt(v).replace("|", "\\|")  # a bare | would end the cell
    out = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def section_md(sec: dict[str, Any]) -> str:
    lines = [f"## {sec['title']}", ""]
    if sec.get("text"):  # paragraphs before the table, as written
        lines += [*sec["text"], ""]
    if sec.get("rows"):
        lines += table_md(sec["columns"], sec["rows"]) + [""]
    lines += [f"- {n}" for n in sec.get("notes", [])]
    if sec.get("notes"):
        lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in sec.get("plots", [])]
    return "\n".join(lines).rstrip() + "\n"


def write(run_dir: Path, title: str, sections: list[dict[str, Any]], intro: list[str] = (),
          name: str = "report.md") -> Path:
    """Write ``report.md`` (and ``sections.json``, to re-render) into `run_dir`; plot paths are relative to it.
    Another `name` (`render`'s summary beside a report it must keep) is written without sections.json."""

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join([f"# {title}", "", *intro, ""]) + "\n" + "\n".join(section_md(s) for s in sections)
    files = [(name, text)]
    if name == "report.md":
        files.insert(0, ("sections.json", json.dumps({"title": title, "intro": list(intro), "sections": sections},
                                                     indent=2, default=str)))
    for fname, body in files:
        tmp = run_dir / (fname + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, run_dir / fname)
    return run_dir / name


def plot_curves(series: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str = "step") -> Path:
    """One small panel per named curve (x, y), in a grid; saved as PNG."""
    plt = pyplot()
    names = [k for k, v in series.items() if v]
    cols = min(3, len(names)) or 1
    rows = math.ceil(len(names) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = zip(*series[name])
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3, label=name)
        ax.set(xlabel=xlabel, ylabel=name, title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def history_curves(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """HF Trainer's log_history -> {key: [(step, value), ...]} for every numeric key logged over steps."""
    out: dict[str, list[tuple[float, float]]] = {}
    for h in log_history:
        for k, v in h.items():
            if k not in SKIP_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in h:
                out.setdefault(k, []).append((h["step"], float(v)))
    return {k: v for k, v in out.items() if len(v) > 1}


def _log_history(run_dir: Path, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    if metrics.get("log_history"):
        return metrics["log_history"]
    states = sorted(run_dir.glob("**/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(states[-1].read_text()).get("log_history", []) if states else []


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if k in ("log_history", "records"):
            continue
        if isinstance(v, dict):
            out += flatten(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((prefix + k, v))
    return out


def render(run_dir: Path) -> Path:
    """(Re-)render `run_dir`'s report: from its saved sections if it has them (every method recipe saves its
    report's sections, so its own tables come back), else a summary of metrics.json and the trainer's log history
    — into report.md, or into summary.md when a report.md not written from sections is already there (a run from
    an older ponder), which is never overwritten."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory (a folder a ponder run wrote, e.g. runs/sft)")
    if (run_dir / "sections.json").exists():
        saved = json.loads((run_dir / "sections.json").read_text())
        return write(run_dir, saved["title"], saved["sections"], saved.get("intro", []))
    mpath = run_dir / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
    history = _log_history(run_dir, metrics)
    if not metrics and not history:
        raise FileNotFoundError(f"{run_dir}: no metrics.json, sections.json or trainer_state.json to report on")
    sections = []
    if metrics:
        sections.append({"title": "Summary", "columns": ["metric", "value"],
                         "rows": [list(r) for r in flatten(metrics)], "plots": [], "notes": []})
    curves = history_curves(history)
    if curves:
        plot_curves(curves, run_dir / "training.png", f"{run_dir.name}: logged over training")
        sections.append({"title": "Training curves", "columns": ["metric", "first", "last", "points"],
                         "rows": [[k, v[0][1], v[-1][1], len(v)] for k, v in curves.items()],
                         "plots": ["training.png"], "notes": []})
    name = "summary.md" if (run_dir / "report.md").exists() else "report.md"
    return write(run_dir, f"ponder run: {run_dir.name}", sections, name=name)


def plot_by_turn(evals: dict[str, dict[str, Any]], path: Path):
    """Accuracy at each turn alone, majority over turns 1..k (m1@tk) and any-correct (p1@tk), one line per
    model (base, iter-1, ...), with the parallel baselines at equal compute (m{k}@t1, p{k}@t1) dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    panels = [("accuracy_by_turn", "accuracy of turn k alone", None),
              ("majority_by_turn", "m1@tk: majority over turns 1..k (dashed: parallel)", "m"),
              ("pass_by_turn", "p1@tk: some turn in 1..k correct (dashed: parallel)", "p")]
    for ax, (key, title, baseline) in zip(axes, panels):
        for j, (name, r) in enumerate(evals.items()):
            ys = [100 * y for y in r[key]]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name, color=f"C{j}")
            parallel = [x for x in r if baseline and x.startswith(baseline) and x.endswith("@t1") and x != "m1@t1"]
            if parallel:
                ax.axhline(100 * r[parallel[0]], color=f"C{j}", ls="--", lw=1, label=f"{name} {parallel[0]}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("turn k")
        ax.set_xticks(range(1, len(ys) + 1))
        # fixed 0-100 %: matplotlib would zoom into all-equal data (e.g. all 0: a 1e-17 axis, negative %)
        ax.set_ylim(-2, 102)
        ax.set_yticks(range(0, 101, 20))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("% of problems")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig  # closed, still inspectable (tests read its axes)
