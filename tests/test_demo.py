"""`ponder demo` in a reduced mode (seconds, tiny budgets): real numbers, the report's structure; `ponder report`."""

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ponder import runtime
from ponder.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_onepass(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--quick", "--only", "onepass", "--n", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 8 and 0 <= m["base"]["greedy_accuracy"] <= 1 and m["failed"] == []
    op = m["methods"]["onepass"]["metrics"]
    assert len(op["loss"]["onepass"]) == len(op["loss"]["npass"]) == 2
    assert op["max_loss_diff"] < 1e-3  # same loss in both modes
    assert op["tokens"]["npass"] > op["tokens"]["onepass"]
    report = (out / "report.md").read_text()
    assert report.startswith("# ponder demo")
    assert "## Starting model" in report and "| greedy_accuracy |" in report
    assert "## One-pass multi-turn SFT vs N-pass" in report and "![onepass](onepass/onepass.png)" in report
    assert (out / "onepass" / "onepass.png").stat().st_size > 10_000
    # `ponder report` re-renders the same report from the saved sections
    (out / "report.md").unlink()
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "report.md").read_text() == report


def test_demo_reports_a_failing_method(tmp_path, monkeypatch):
    import ponder.recipes.demo

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setitem(ponder.recipes.demo.DEMOS, "onepass", broken)
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--quick", "--only", "onepass", "--n", "4", "--out", str(out)])
    assert r.exit_code == 1
    assert "FAILED: RuntimeError: boom" in (out / "report.md").read_text()
    assert "boom" in (out / "onepass" / "error.txt").read_text()


def test_demo_rejects_unknown_method(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--only", "grpo", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "unknown method" in str(r.exception)


def test_report_of_a_training_run(tmp_path):
    run = tmp_path / "sft-run"
    run.mkdir()
    hist = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3, "epoch": 0.1 * s} for s in (1, 2, 3)]
    (run / "metrics.json").write_text(json.dumps({"train_loss": 1.1, "steps": 3, "data": {"train": {"examples": 9}},
                                                  "log_history": hist}))
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    text = (run / "report.md").read_text()
    assert "| train_loss | 1.1 |" in text and "| data.train.examples | 9 |" in text
    assert "| loss | 2 | 0.6667 | 3 |" in text and "![training](training.png)" in text
    assert (run / "training.png").exists()


def test_report_of_an_empty_dir_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "error: " in r.output and "no metrics.json" in r.output  # one line, no traceback


def test_demo_quick_all_methods(tmp_path):
    """The whole pipeline, every method, tiny budgets: each section present with a table, notes and its plots."""
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--quick", "--n", "6", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["failed"] == [] and list(m["methods"]) == ["onepass", "rise", "latro", "ssft"]
    saved = json.loads((out / "sections.json").read_text())["sections"]
    assert len(saved) == 5  # the starting model + one per method
    for sec in saved[1:]:
        assert sec["rows"] and sec["notes"] and sec["plots"], sec["title"]
        for plot in sec["plots"]:
            assert (out / plot).stat().st_size > 5_000, plot
    report = (out / "report.md").read_text()
    for title in ("One-pass", "RISE", "LaTRO", "SSFT"):
        assert f"## {title}" in report
    # the README's table: one row per method, each accuracy method with its start -> end and interval, the CPU named
    summary = (out / "summary.md").read_text()
    assert runtime.machine()["cpu"] in summary and "load" in summary
    rows = [x for x in summary.splitlines() if x.startswith("| ") and not x.startswith("| method")]
    assert len(rows) == 4 and "— (an equivalence" in rows[0]
    for name, row in zip(("rise", "latro", "ssft"), rows[1:]):
        vs = m["methods"][name]["vs_start"]
        assert vs["lo"] <= vs["diff"] <= vs["hi"] and abs(vs["end"] - vs["start"] - vs["diff"]) < 1e-9
        assert f"{vs['start']:.1f} → {vs['end']:.1f}" in row, row
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-table: written by `make readme-demo` -->\nold table\n<!-- /demo-table -->\nafter\n")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "readme-demo.py"), str(out), str(readme)], check=True)
    text = readme.read_text()
    assert "old table" not in text and summary.strip() in text and text.startswith("intro\n") and \
        text.endswith("<!-- /demo-table -->\nafter\n")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme-demo.py"), str(tmp_path / "none"),
                          str(readme)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr
