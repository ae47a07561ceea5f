"""`ponder demo`: the four methods end to end on the CPU testbed, from the same starting model, evaluated on
the same held-out problems, written up in `runs/demo/report.md` with one table and plot per method.

Each method's recipe contributes ``demo(run_dir, base, problems, quick) -> section`` (`ponder.recipes.onepass`,
`.rise`, `.latro`, `.ssft`); a section is
``{"title", "columns", "rows", "plots", "notes", "metrics"}`` with numbers computed in this run.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from ponder import ui
from ponder.engine import data, models, runtime, testbed
from ponder.methods import metrics, stats
from ponder.recipes import latro, onepass, report, rise, ssft
from ponder.recipes.common import write_json

DEMOS = {"onepass": onepass.demo, "rise": rise.demo, "latro": latro.demo, "ssft": ssft.demo}
METHODS = tuple(DEMOS)


def _headline(note: str, width: int = 140) -> str:
    """The first sentence of a note, cut at a word boundary to fit the terminal summary."""
    first = note.split(". ")[0].rstrip(".")
    return first if len(first) <= width else first[:width].rsplit(" ", 1)[0] + " …"


def _vs_start(vs: dict[str, Any] | None) -> dict[str, Any] | None:
    """A method's headline metric at its start and its end, per problem -> the means and the paired difference
    (points, 95% over the problems)."""
    if not vs:
        return None
    d = stats.paired_items(vs["end"], vs["start"])
    mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    return {"metric": vs["metric"], "start": mean(vs["start"]), "end": mean(vs["end"]), "diff": 100 * d["mean"],
            "lo": 100 * d["lo"], "hi": 100 * d["hi"]}


def _vs_cell(vs: dict[str, Any] | None) -> str:
    if vs is None:
        return "— (an equivalence, not an accuracy)"
    word = "below its start" if vs["hi"] < 0 else "above its start" if vs["lo"] > 0 else "within noise"
    return (f"{vs['metric']}: {vs['start']:.1f} → {vs['end']:.1f} ({vs['diff']:+.1f} "
            f"[{vs['lo']:+.1f}, {vs['hi']:+.1f}], {word})")


def _write_summary(path: Path, results: dict[str, Any], table: list[list[str]], n: int) -> None:
    """The demo's table as the README shows it (`make readme-demo` copies it there), naming the machine."""
    m0, m1 = results["machine"]["start"], results["machine"]["end"]
    lines = [f"One `ponder demo` run, {time.strftime('%Y-%m-%d', time.gmtime())}: {runtime.describe(m0)} at the "
             f"start, load {m1['load']} at the end; {results['seconds']:.0f} s in all. Every method starts from the "
             f"same testbed and is evaluated on the same {n} held-out problems; intervals are 95% over the problems.",
             "", "| method | seconds | start → end (this run) | this run's claim |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run(out: Path = Path("runs/demo"), only: list[str] | None = None, quick: bool = False, n: int = 200
        ) -> dict[str, Any]:
    """Load the testbed, evaluate it, run each method's demo, write metrics.json and report.md.
    A method that fails is reported (with its traceback in `<method>/error.txt`) and the others still run."""
    methods = list(only or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    out = Path(out)
    t0 = time.time()
    at_start = runtime.machine()
    total = len(methods) + 2
    ui.info(f"[bold]1/{total}[/] testbed model (shipped with the package)")
    base = testbed.weights_dir()
    built = json.loads((base / "testbed.json").read_text())
    problems = data.load_problems("testbed", n=n, split="test")
    ui.info(f"[bold]2/{total}[/] evaluating the starting model on {n} held-out problems")
    model, tok = models.load(str(base))
    ev = metrics.evaluate(model, tok, problems, samples=8, max_new_tokens=96, batch_size=128)
    ev.pop("records")
    del model
    sections = [{"title": f"Starting model: the testbed on {n} held-out problems", "columns": ["metric", "value"],
                 "rows": [[k, v] for k, v in ev.items() if k != "n"], "plots": [], "notes": []}]
    results: dict[str, Any] = {"testbed": built, "n": n, "quick": quick, "base": ev, "methods": {}}
    summary, failed, table = [], [], []
    for i, name in enumerate(methods, start=3):
        ui.info(f"[bold]{i}/{total}[/] {name}")
        t = time.time()
        try:
            sec = DEMOS[name](out / name, str(base), problems, quick)
        except Exception as e:  # keep going: one broken method must not hide the others' results
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "error.txt").write_text(traceback.format_exc())
            sec = {"title": name, "columns": [], "rows": [], "plots": [],
                   "notes": [f"FAILED: {type(e).__name__}: {e} (traceback in {name}/error.txt)"], "metrics": {}}
            failed.append(name)
        secs = time.time() - t
        vs = _vs_start(sec.pop("vs_start", None))
        sec["plots"] = [p if "/" in p else f"{name}/{p}" for p in sec.get("plots", [])]
        sec["notes"] = list(sec.get("notes", [])) + [f"{secs:.0f} s on this machine."]
        results["methods"][name] = {"seconds": secs, "metrics": sec.pop("metrics", {}), "vs_start": vs}
        sections.append(sec)
        summary.append([name, f"{secs:.0f}", _headline(sec["notes"][0])])
        table.append([sec["title"], f"{secs:.0f}", _vs_cell(vs), _headline(sec["notes"][0], 400)])
    results["seconds"] = time.time() - t0
    results["failed"] = failed
    results["machine"] = {"start": at_start, "end": runtime.machine()}
    write_json(out / "metrics.json", results)
    _write_summary(out / "summary.md", results, table, n)
    intro = [f"`ponder demo{' --quick' if quick else ''}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{results['seconds']:.0f} s in total.",
             f"Starting model: the testbed ({built['params']:,} parameters, {built['steps']} pre-training steps); "
             f"every method starts from it and is evaluated on the same {n} held-out problems."]
    path = report.write(out, "ponder demo", sections, intro)
    ui.print_table(f"ponder demo: {results['seconds']:.0f} s", ["method", "seconds", "result"], summary)
    ui.info(f"report: {path}" + (f"   [red]failed: {', '.join(failed)}[/]" if failed else ""))
    return results
