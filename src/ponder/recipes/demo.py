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
from ponder.engine import data, models, testbed
from ponder.methods import metrics
from ponder.recipes import latro, onepass, report, rise, ssft
from ponder.recipes.common import write_json

DEMOS = {"onepass": onepass.demo, "rise": rise.demo, "latro": latro.demo, "ssft": ssft.demo}
METHODS = tuple(DEMOS)


def _headline(note: str, width: int = 140) -> str:
    """The first sentence of a note, cut at a word boundary to fit the terminal summary."""
    first = note.split(". ")[0].rstrip(".")
    return first if len(first) <= width else first[:width].rsplit(" ", 1)[0] + " …"


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
    summary, failed = [], []
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
        sec["plots"] = [p if "/" in p else f"{name}/{p}" for p in sec.get("plots", [])]
        sec["notes"] = list(sec.get("notes", [])) + [f"{secs:.0f} s on this machine."]
        results["methods"][name] = {"seconds": secs, "metrics": sec.pop("metrics", {})}
        sections.append(sec)
        summary.append([name, f"{secs:.0f}", _headline(sec["notes"][0])])
    results["seconds"] = time.time() - t0
    results["failed"] = failed
    write_json(out / "metrics.json", results)
    intro = [f"`ponder demo{' --quick' if quick else ''}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{results['seconds']:.0f} s in total.",
             f"Starting model: the testbed ({built['params']:,} parameters, {built['steps']} pre-training steps); "
             f"every method starts from it and is evaluated on the same {n} held-out problems."]
    path = report.write(out, "ponder demo", sections, intro)
    ui.print_table(f"ponder demo: {results['seconds']:.0f} s", ["method", "seconds", "result"], summary)
    ui.info(f"report: {path}" + (f"   [red]failed: {', '.join(failed)}[/]" if failed else ""))
    return results
