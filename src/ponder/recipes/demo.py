"""`ponder demo`: the four methods end to end on the CPU testbed, from the same starting model, evaluated on
the same held-out problems, written up in `runs/demo/report.md` with one table and plot per method.

Each method contributes ``demo(run_dir, base, problems, quick) -> section`` (``ponder.rise.demo``,
``ponder.latro.demo``, ``ponder.ssft.demo``, and `onepass_demo` below); a section is
``{"title", "columns", "rows", "plots", "notes", "metrics"}`` with numbers computed in this run.
"""

from __future__ import annotations

import json
import time
import traceback
from importlib import import_module
from pathlib import Path
from typing import Any

METHODS = ("onepass", "rise", "latro", "ssft")


def onepass_demo(run_dir: Path, base: str, problems: list, quick: bool = False) -> dict[str, Any]:
    """One-pass vs N-pass (arXiv 2504.18246): the same short SFT run on multi-turn testbed conversations in both
    modes (the loss curves must match to fp32 noise), and forward+backward time by conversation depth."""
    import random

    from ponder import models, testbed
    from ponder.data import load_conversations
    from ponder.trainers.onepass import OnePassConfig, OnePassTrainer, compare
    run_dir = Path(run_dir)
    steps, bs = (2, 2) if quick else (12, 4)
    data = load_conversations("testbed:multi", n=steps * bs, seed=0)
    loss, secs, tokens = {}, {}, {}
    for mode in ("onepass", "npass"):
        cfg = OnePassConfig(model=base, mode=mode, max_steps=steps, per_device_train_batch_size=bs,
                            learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                            report_to="none", output_dir=str(run_dir / mode), seed=0)
        trainer = OnePassTrainer(args=cfg, train_dataset=data)
        t = time.perf_counter()
        trainer.train()
        secs[mode] = time.perf_counter() - t
        loss[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tokens[mode] = trainer.data_stats["train"]["tokens_forwarded"]
        del trainer
    dloss = max(abs(a - b) for a, b in zip(loss["onepass"], loss["npass"]))

    model, tok = models.load(base)
    model.train()
    rng = random.Random(0)
    by_depth = []
    for depth in (2,) if quick else (2, 4, 8):
        msgs = testbed.multi_turn(testbed.sample_problem(rng), rng, depth)
        by_depth.append(compare(model, tok, msgs, repeats=1 if quick else 2))

    rows = [["final train loss", loss["onepass"][-1], loss["npass"][-1], ""],
            ["largest loss difference at any step", dloss, "", ""],
            ["training seconds", secs["onepass"], secs["npass"], secs["npass"] / secs["onepass"]],
            ["tokens forwarded", tokens["onepass"], tokens["npass"], tokens["npass"] / tokens["onepass"]]]
    rows += [[f"depth {r['depth']}: fwd+bwd seconds (ideal ratio {r['ideal']:.2f})", r["onepass_s"], r["npass_s"],
              r["speedup"]] for r in by_depth]
    _plot(run_dir / "onepass.png", loss, by_depth)
    grows = all(a["speedup"] < b["speedup"] for a, b in zip(by_depth, by_depth[1:]))
    same = dloss < 1e-4  # fp32 noise is ~1e-6 here; anything near 1e-4 means the two modes differ
    notes = [f"{steps} steps x {bs} conversations in each mode from the same seed: the loss curves "
             + (f"agree to {dloss:.1e} (fp32 noise; the two modes compute the same loss)." if same else
                f"DIFFER by up to {dloss:.1e}, more than fp32 noise: the modes should compute the same loss."),
             f"Speedup at depth {by_depth[-1]['depth']}: {by_depth[-1]['speedup']:.2f}x measured vs "
             f"{by_depth[-1]['ideal']:.2f}x ideal (token ratio); "
             + ("it grows with depth, as in the paper." if grows else "it did not grow with depth in this run "
                "(the machine is noisy; see bench/onepass.py for repeated timings).")]
    return {"title": "One-pass multi-turn SFT vs N-pass (arXiv 2504.18246)",
            "columns": ["", "one-pass", "N-pass", "N-pass / one-pass"], "rows": rows, "plots": ["onepass.png"],
            "notes": notes, "metrics": {"loss": loss, "seconds": secs, "tokens": tokens, "max_loss_diff": dloss,
                                        "by_depth": by_depth}}


def _plot(path: Path, loss: dict[str, list[float]], by_depth: list[dict[str, float]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for mode, style in (("npass", "s--"), ("onepass", "o-")):
        ax[0].plot(range(1, len(loss[mode]) + 1), loss[mode], style, ms=4, label=mode)
    ax[0].set(xlabel="training step", ylabel="train loss", title="loss: one-pass vs N-pass")
    d = [r["depth"] for r in by_depth]
    ax[1].plot(d, [r["npass_s"] for r in by_depth], "s--", label="N-pass")
    ax[1].plot(d, [r["onepass_s"] for r in by_depth], "o-", label="one-pass")
    ax[1].set(xlabel="conversation depth (assistant turns)", ylabel="fwd+bwd seconds", title="time per conversation")
    ax[2].plot(d, [r["speedup"] for r in by_depth], "o-", label="measured")
    ax[2].plot(d, [r["ideal"] for r in by_depth], "k:", label="ideal (token ratio)")
    ax[2].set(xlabel="conversation depth (assistant turns)", ylabel="N-pass time / one-pass time", title="speedup")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _headline(note: str, width: int = 140) -> str:
    """The first sentence of a note, cut at a word boundary to fit the terminal summary."""
    first = note.split(". ")[0].rstrip(".")
    return first if len(first) <= width else first[:width].rsplit(" ", 1)[0] + " …"


def _method(name: str):
    if name == "onepass":
        return onepass_demo
    return import_module(f"ponder.{name}").demo


def run(out: Path = Path("runs/demo"), only: list[str] | None = None, quick: bool = False, n: int = 200
        ) -> dict[str, Any]:
    """Build or load the testbed, evaluate it, run each method's demo, write metrics.json and report.md.
    A method that fails is reported (with its traceback in `<method>/error.txt`) and the others still run."""
    from ponder import data, metrics, models, report, testbed, ui
    methods = list(only or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    out = Path(out)
    t0 = time.time()
    total = len(methods) + 2
    ui.info(f"[bold]1/{total}[/] testbed model (pre-trained on first use, then cached)")
    base = testbed.ensure()
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
            sec = _method(name)(out / name, str(base), problems, quick)
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
    from ponder.recipes import write_json
    write_json(out / "metrics.json", results)
    intro = [f"`ponder demo{' --quick' if quick else ''}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{results['seconds']:.0f} s in total.",
             f"Starting model: the testbed ({built['params']:,} parameters, {built['steps']} pre-training steps); "
             f"every method starts from it and is evaluated on the same {n} held-out problems."]
    path = report.write(out, "ponder demo", sections, intro)
    ui.print_table(f"ponder demo: {results['seconds']:.0f} s", ["method", "seconds", "result"], summary)
    ui.info(f"report: {path}" + (f"   [red]failed: {', '.join(failed)}[/]" if failed else ""))
    return results
